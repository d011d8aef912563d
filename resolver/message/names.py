"""Domain names in the two forms the resolver uses: normalized text and wire form.

Rule files and tools speak text; the hot path speaks wire bytes, so that a query name read
from a packet can be matched without decoding it. Both forms are lowercase and ASCII
(international names in punycode), which is what makes matching a plain dict lookup.
"""

import re

import idna

# A valid normalized name, checked in one regex call because rule files can hold a million
# names. Underscore is allowed for SRV-like names; '*' is not, since subdomains are implied.
_VALID = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")
_LABEL_CHAR = re.compile(r"[a-z0-9_-]")
# IDNA treats these full-width and ideographic full stops as dots (RFC 3490 section 3.1).
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_MAX_TEXT = 253  # 255 octets in wire form, less the first length octet and the root label
_MAX_LABEL = 63
_LENGTH_OCTET = [bytes((length,)) for length in range(_MAX_LABEL + 1)]  # IndexError past 63


def normalize(text: str) -> str:
    """Return the canonical form of a name: lowercase ASCII, no trailing dot, punycode labels.

    Raises ValueError("'x..test' is not a valid name: empty label") so that loaders can
    prefix the file and line and show the name exactly as the user wrote it.
    """
    shown = text.strip()
    name = shown.lower()
    ascii_only = name.isascii()
    if not ascii_only:
        name = name.translate(_DOTS)
    if name.endswith("."):
        name = name[:-1]
    if not ascii_only:
        name = ".".join(_to_ascii(label, shown) for label in name.split("."))
    if len(name) > _MAX_TEXT or not _VALID.fullmatch(name):
        raise ValueError(f"{shown!r} is not a valid name: {_problem(name)}")
    return name


def _to_ascii(label: str, shown: str) -> str:
    """Punycode one label as browsers do (IDNA2008 with UTS #46 mapping, non-transitional:
    'faß' is xn--fa-hia, not 'fass' as Python's IDNA2003 codec has it); ASCII and empty
    labels pass through for the validator to judge."""
    if label.isascii():
        return label
    try:
        return idna.encode(label, uts46=True, transitional=False).decode("ascii")
    except UnicodeError:  # idna.IDNAError is one
        problem = f"bad international label {label!r}"
        raise ValueError(f"{shown!r} is not a valid name: {problem}") from None


def _problem(name: str) -> str:
    """Say why a name failed the fast check; only called on the error path."""
    if not name:
        return "empty name"
    if len(name) > _MAX_TEXT:
        return f"longer than {_MAX_TEXT} characters"
    for label in name.split("."):
        if not label:
            return "empty label"
        if len(label) > _MAX_LABEL:
            return f"label longer than {_MAX_LABEL} characters"
        for char in label:
            if not _LABEL_CHAR.match(char):
                return f"bad character {char!r}"
    raise AssertionError(f"no problem found in {name!r}")


def to_wire(name: str) -> bytes:
    """Encode a normalized name (the output of normalize) as uncompressed wire form.

    'example.org' -> b'\\x07example\\x03org\\x00'; '' is the root, b'\\x00'. The name is not
    re-validated: loaders call normalize first, and doing it twice would slow big lists.
    """
    if not name:
        return b"\x00"
    parts: list[bytes] = []
    for label in name.encode("ascii").split(b"."):
        parts += (_LENGTH_OCTET[len(label)], label)  # a list and one join: 2x faster than +
    parts.append(b"\x00")
    return b"".join(parts)


def from_wire(wire: bytes) -> str:
    """Decode an uncompressed wire name to text without the trailing dot (root is '').

    For tools and explanations, not the hot path. Octets that are not printable, and '.' and
    '\\' inside a label, are written as \\DDD (RFC 1035 section 5.1) so the text is unambiguous.
    """
    labels = []
    for offset in label_offsets(wire):
        length = wire[offset]
        label = wire[offset + 1 : offset + 1 + length]
        labels.append("".join(_presentation(octet) for octet in label))
    return ".".join(labels)


def label_offsets(wire: bytes) -> tuple[int, ...]:
    """Offsets of the labels of an uncompressed wire name, most specific first, root excluded.

    b'\\x03www\\x07example\\x03org\\x00' -> (0, 4, 12), the shape RuleSet.lookup takes.
    Raises ValueError for a truncated name, a compression pointer or bytes after the root
    label, so callers never slice garbage.
    """
    offsets: list[int] = []
    offset = 0
    while offset < len(wire):
        length = wire[offset]
        if length == 0:
            if offset + 1 != len(wire):
                raise ValueError("bytes after the root label")
            return tuple(offsets)
        if length > _MAX_LABEL:
            raise ValueError(f"label length {length} at offset {offset} (compressed or corrupt)")
        offsets.append(offset)
        offset += 1 + length
    raise ValueError("name is truncated")


def _presentation(octet: int) -> str:
    """One octet of a label in master-file presentation form."""
    if 0x21 <= octet <= 0x7E and octet not in (0x2E, 0x5C):
        return chr(octet)
    return f"\\{octet:03d}"
