"""The kinds of value a config key takes: each a parser plus the words that describe it.

The words are those the errors use ('expected an integer from 1 to 65535'), and the
configuration reference says with them what a key takes, so the two cannot drift apart. A parser
is made for the config file's directory, which only kinds holding paths use: relative paths
follow the file, not the working directory the resolver was started in.
"""

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from resolver.message.constants import MAX_TTL
from resolver.message.names import normalize

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
Parse = Callable[[object], T]  # a plain value from YAML in, the typed value out, or Invalid

MAX_SECONDS = 86400  # a day: longer than any wait here should be, and finite (.inf is YAML)


class Invalid(ValueError):
    """A bad value; for a list, `elements` holds (index, message) of every bad element."""

    def __init__(self, message: str, elements: tuple[tuple[int, str], ...] = ()):
        super().__init__(message)
        self.elements = elements


@dataclass(frozen=True, slots=True)
class Kind(Generic[T_co]):
    """What a key accepts: its words, and its parser for a config file's directory."""

    words: str
    parser: Callable[[Path], Callable[[object], T_co]]


def kind(words: str, parse: Parse[T]) -> Kind[T]:
    """A kind whose values do not depend on where the config file is."""
    return Kind(words, lambda _base: parse)


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid("expected a number")
    if not value > 0:  # NaN too
        raise Invalid("expected seconds > 0")
    if value > MAX_SECONDS:
        raise Invalid(f"expected at most {MAX_SECONDS} seconds (a day)")
    return float(value)


SECONDS = kind("seconds", _seconds)


def integer(low: int, high: int | None = None) -> Kind[int]:
    words = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(value: object) -> int:
        if (not isinstance(value, int) or isinstance(value, bool) or value < low
                or (high is not None and value > high)):
            raise Invalid(f"expected {words}")
        return value

    return kind(words, parse)


TTL = integer(0, MAX_TTL)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid("expected true or false")
    return value


BOOLEAN = kind("true or false", _boolean)


def domain_name(value: object) -> str:
    """A domain name, normalized as names.to_wire expects it."""
    if not isinstance(value, str):
        raise Invalid("expected a domain name")
    try:
        return normalize(value)
    except ValueError as error:
        raise Invalid(str(error)) from None


NAME = kind("a domain name", domain_name)


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise Invalid("expected a fraction from 0 up to (not including) 1")
    return float(value)


FRACTION = kind("a fraction from 0 up to (not including) 1", _fraction)


def choice(*choices: str) -> Kind[str]:
    words = f"one of {', '.join(choices)}"

    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise Invalid(f"expected {words}")
        return value

    return kind(words, parse)


def text(words: str) -> Kind[str]:
    """Any non-blank string, for values another step parses further."""

    def parse(value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise Invalid(f"expected {words}")
        return value

    return kind(words, parse)


def list_of(what: str, item: Kind[T], *, if_empty: str | None = None) -> Kind[tuple[T, ...]]:
    """A list of items; an element's error names its index. if_empty: the error for []."""
    words = f"a list of {what}" + (", at least one" if if_empty else "")

    def parser(base: Path) -> Parse[tuple[T, ...]]:
        parse_item = item.parser(base)

        def parse(value: object) -> tuple[T, ...]:
            if not isinstance(value, list | tuple):
                raise Invalid(f"expected a list of {what}")
            if not value and if_empty:
                raise Invalid(if_empty)
            parsed: list[T] = []
            bad: list[tuple[int, str]] = []
            for index, element in enumerate(value):
                try:
                    parsed.append(parse_item(element))
                except Invalid as error:  # every bad element is reported, not just the first
                    bad.append((index, str(error)))
            if bad:
                raise Invalid(bad[0][1], tuple(bad))
            return tuple(parsed)

        return parse

    return Kind(words, parser)


def _path(base: Path) -> Parse[str]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or not value:
            raise Invalid("expected a path")
        return str((base / value).resolve())

    return parse


PATH = Kind("a path", _path)


def _ca_file(base: Path) -> Parse[str]:
    """A CA bundle, loaded here so that a wrong path or a file without certificates is a
    config error with its line rather than a failure at the first query."""
    resolve = _path(base)

    def parse(value: object) -> str:
        path = resolve(value)
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as error:  # before OSError, which it is too
            raise Invalid(
                f"{value!r} holds no usable PEM certificate ({error.reason})") from None
        except OSError as error:
            raise Invalid(f"cannot read {value!r}: {error.strerror}") from None
        return path

    return parse


CA_FILE = Kind("a path to a PEM file", _ca_file)
