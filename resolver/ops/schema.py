"""Config keys declared once, on the fields of the config dataclasses, and YAML read by them.

A field declared with `setting` (or `required`, or `section`) carries everything about its key:
the default, the kind of value with its bounds, and the help an operator reads. The readers here
walk a dataclass's declared fields to learn its keys; resolver.ops.configdoc walks the same
fields to write the configuration reference and the example config. A key added, renamed or
re-bounded so changes the parser, the docs and the example at once.

Values are read from YAML nodes rather than plain data so every problem keeps its line, and
problems are collected rather than raised: an operator fixing a broken file should see all its
mistakes in one run, listed in file order.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import yaml

from resolver.ops.values import Invalid, Kind
from resolver.ops.yamlnodes import NULL, known_keys, line_of, problem_text

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
_SETTING = "setting"  # the key of a declared field's metadata


class Problems:
    """Problems found in one file, kept with their line so they can be listed in file order."""

    def __init__(self, file: str):
        self.file = file
        self._found: list[tuple[int, str]] = []

    def add(self, node: yaml.Node, path: str, message: str) -> None:
        line = line_of(node)
        self._found.append((line, problem_text(f"{self.file}:{line}", path, message)))

    def __len__(self) -> int:
        return len(self._found)

    def in_file_order(self) -> list[str]:
        return [problem for _, problem in sorted(self._found, key=lambda found: found[0])]


MISSING_VALUE = object()  # what a reader returns for a value it reported as bad
ReadNode = Callable[[yaml.Node, str, Problems], Any]  # (value node, dotted path, problems)


@dataclass(frozen=True, slots=True)
class Nested(Generic[T_co]):
    """A value read node by node, not as one plain value, so that the problems inside it carry
    their own line and dotted path (a list of upstream mappings, say)."""

    words: str  # what the key takes, for the docs
    reader: Callable[[Path], ReadNode]  # given the config file's directory
    item: type | None = None  # the dataclass of its list's elements, whose keys the docs list


@dataclass(frozen=True, slots=True)
class Setting:
    """What a field declares about its key, beyond the field's own name and default."""

    help: str  # for an operator: the reference's meaning column, the example config's comment
    words: str  # what values it takes, in the words of its errors
    reader: Callable[[Path], ReadNode]
    key: str | None  # the key's name in the file, where it is not the field's
    shown: str | None  # the reference's default where no value can show it ('required')
    note: str | None  # a reading aid after the default ('128 MiB')
    example: str | None  # a YAML value for the key, for the reference and the example
    item: type | None  # see Nested


@dataclass(frozen=True, slots=True)
class Key:
    """A declared key of one dataclass, as the readers and the docs see it."""

    name: str  # as written in the file
    attribute: str  # the dataclass field it fills
    default: object  # dataclasses.MISSING for a required key
    setting: Setting


def setting(default: T, kind: Kind[T] | Nested[T], help: str, *, shown: str | None = None,
            note: str | None = None, example: str | None = None) -> T:
    """A key with a default. shown: how the reference shows a default that is not the same
    everywhere (a path into the installation); the example config then leaves the key out."""
    declared = _setting(kind, help, shown=shown, note=note, example=example)
    return field(default=default, metadata={_SETTING: declared})


def required(kind: Kind[T] | Nested[T], help: str, *, key: str | None = None) -> T:
    """A key without a default, in a mapping of a list (a conditional group's domains)."""
    declared = _setting(kind, help, key=key, shown="required")
    return cast(T, field(metadata={_SETTING: declared}))


def section(cls: type[T], help: str,
            check: Callable[[T], Iterable[tuple[str, str]]] = lambda _: (),
            *, example: str | None = None) -> T:
    """A section of the file, filled by its own declared keys; check yields (key, message)
    for problems between keys, looked for only when each key was fine on its own. A section
    inside a section (blocking.guard) has its keys documented as its `item`'s."""
    reader: Nested[T] = Nested("a mapping", lambda base: _section_reader(cls, base, check), cls)
    return setting(cls(), reader, help, example=example)


def _setting(kind: Kind[T] | Nested[T], help: str, *, key: str | None = None,
             shown: str | None = None, note: str | None = None,
             example: str | None = None) -> Setting:
    if isinstance(kind, Nested):
        reader, item = kind.reader, kind.item
    else:
        reader, item = (lambda base: field_reader(kind, base)), None
    return Setting(help, kind.words, reader, key, shown, note, example, item)


def keys(cls: type) -> tuple[Key, ...]:
    """The declared keys of a config dataclass, in declaration order."""
    found = []
    for item in fields(cls):
        declared = item.metadata.get(_SETTING)
        if isinstance(declared, Setting):
            found.append(Key(declared.key or item.name, item.name, item.default, declared))
    return tuple(found)


def readers(cls: type, base: Path) -> dict[str, ReadNode]:
    """A reader for each declared key of cls, by the key's name in the file."""
    return {key.name: key.setting.reader(base) for key in keys(cls)}


def _section_reader(cls: type[T], base: Path,
                    check: Callable[[T], Iterable[tuple[str, str]]]) -> ReadNode:
    declared = keys(cls)
    by_name = readers(cls, base)

    def read(node: yaml.Node, path: str, problems: Problems) -> T:
        before = len(problems)
        values = read_mapping(node, path, by_name, problems)
        section = cls(**{key.attribute: values[key.name]
                         for key in declared if key.name in values})
        if len(problems) == before:  # no cross-check against a default for a bad value
            for key, message in check(section):
                problems.add(value_node(node, key), f"{path}.{key}", message)
        return section

    return read


def read_mapping(node: yaml.Node | None, path: str, by_name: Mapping[str, ReadNode],
                 problems: Problems) -> dict[str, Any]:
    """Read a mapping with known keys; unknown and duplicate keys are reported, bad values are
    left out so the dataclass default stands in while the remaining keys are still checked."""
    if node is None or node.tag == NULL:
        return {}
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, path, "expected a mapping")
        return {}
    values = {
        key: by_name[key](value, key_path, problems)
        for key, key_path, value in known_keys(node, path, by_name, problems.add)
    }
    return {key: value for key, value in values.items() if value is not MISSING_VALUE}


def field_reader(kind: Kind[T], base: Path) -> ReadNode:
    """Read one plain value; a bad list element is reported at the element's own line."""
    parse = kind.parser(base)

    def read(node: yaml.Node, path: str, problems: Problems) -> object:
        try:
            return parse(_construct(node))
        except Invalid as error:
            for index, message in error.elements:
                problems.add(node.value[index], f"{path}[{index}]", message)
            if not error.elements:
                problems.add(node, path, str(error))
            return MISSING_VALUE

    return read


def _construct(node: yaml.Node) -> object:
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except yaml.YAMLError as error:
        raise Invalid(str(getattr(error, "problem", error))) from None


def value_node(node: yaml.Node, key: str) -> yaml.Node:
    """The node holding key's value, for a line number; the mapping itself if key is absent."""
    if isinstance(node, yaml.MappingNode):
        pairs: list[tuple[yaml.Node, yaml.Node]] = node.value
        for key_node, value in pairs:
            if key_node.value == key:
                return value
    return node


def has_key(node: yaml.MappingNode, key: str) -> bool:
    return any(key_node.value == key for key_node, _ in node.value)
