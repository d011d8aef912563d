"""Table tests for resolver/names.py: the canonical text and wire forms rules are matched in."""

import pytest

from resolver.message.names import from_wire, label_offsets, normalize, to_wire

LABEL_63 = "a" * 63
NAME_253 = ".".join(["b" * 63, "c" * 63, "d" * 63, "e" * 61])  # 253 characters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org", "example.org"),
        ("Example.ORG", "example.org"),
        ("example.org.", "example.org"),
        ("  www.example.org \n", "www.example.org"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("ｂücher。example", "xn--bcher-kva.example"),  # full-width letter, ideographic dot  # noqa: RUF001
        ("bücher.example。", "xn--bcher-kva.example"),
        # IDNA2008 + UTS #46, non-transitional, as browsers ask: not IDNA2003's 'fass.de'
        ("faß.de", "xn--fa-hia.de"),
        ("ελλάς.gr", "xn--hxarsa0b.gr"),
        ("ＡＢＣ.test", "abc.test"),  # full-width ASCII maps to ASCII  # noqa: RUF001
        ("_sip._tcp.example.org", "_sip._tcp.example.org"),
        ("-edge-.test", "-edge-.test"),
        ("123.test", "123.test"),
        ("test", "test"),
        (f"{LABEL_63}.test", f"{LABEL_63}.test"),
        (NAME_253, NAME_253),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("example..org", "'example..org' is not a valid name: empty label"),
        (".example.org", "'.example.org' is not a valid name: empty label"),
        ("example.org..", "'example.org..' is not a valid name: empty label"),
        ("", "'' is not a valid name: empty name"),
        (".", "'.' is not a valid name: empty name"),
        ("*.example.org", "'*.example.org' is not a valid name: bad character '*'"),
        ("ex ample.org", "'ex ample.org' is not a valid name: bad character ' '"),
        ("example.org/x", "'example.org/x' is not a valid name: bad character '/'"),
        (f"{LABEL_63}a.test",
         f"'{LABEL_63}a.test' is not a valid name: label longer than 63 characters"),
        (NAME_253 + "e", f"'{NAME_253}e' is not a valid name: longer than 253 characters"),
        ("\ufffd.test", "'\ufffd.test' is not a valid name: bad international label '\ufffd'"),
        # a joiner outside the scripts that use it: IDNA2003 dropped it, naming another domain
        ("a\u200db.test",  # shown escaped, as repr() shows an invisible character
         "'a\\u200db.test' is not a valid name: bad international label 'a\\u200db'"),
    ],
)
def test_normalize_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        normalize(text)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("name", "wire", "offsets"),
    [
        ("example.org", b"\x07example\x03org\x00", (0, 8)),
        ("www.example.org", b"\x03www\x07example\x03org\x00", (0, 4, 12)),
        ("test", b"\x04test\x00", (0,)),
        ("", b"\x00", ()),
        ("xn--bcher-kva.example", b"\x0dxn--bcher-kva\x07example\x00", (0, 14)),
    ],
)
def test_wire_round_trip(name: str, wire: bytes, offsets: tuple[int, ...]) -> None:
    assert to_wire(name) == wire
    assert from_wire(wire) == name
    assert label_offsets(wire) == offsets


@pytest.mark.parametrize(
    ("wire", "text"),
    [
        (b"\x03a.b\x04test\x00", "a\\046b.test"),
        (b"\x02a\x00\x04test\x00", "a\\000.test"),
        (b"\x03a\\b\x00", "a\\092b"),
        (b"\x03A-b\x00", "A-b"),
    ],
)
def test_from_wire_escapes(wire: bytes, text: str) -> None:
    assert from_wire(wire) == text


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x07example\x03org", "name is truncated"),
        (b"\x07exam", "name is truncated"),
        (b"", "name is truncated"),
        (b"\x03www\xc0\x0c", "label length 192 at offset 4 (compressed or corrupt)"),
        (b"\x04test\x00\x00", "bytes after the root label"),
    ],
)
def test_label_offsets_rejects(wire: bytes, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        label_offsets(wire)
    assert str(raised.value) == message
