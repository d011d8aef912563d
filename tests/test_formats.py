"""Table tests of the feed parsers (resolver/rules/formats.py): per format, lines in, items out."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from resolver.rules.formats import FORMATS, Item, is_usable, parse

pytestmark = pytest.mark.unit


def items(format_name: str, text: str) -> list[Item]:
    return list(parse(format_name, io.StringIO(text)))


def reasons(format_name: str, text: str) -> list[tuple[int, str]]:
    """The unusable items, by line and a word of the reason each must contain."""
    return [(item[0], str(item[1])) for item in items(format_name, text) if not is_usable(item)]


@pytest.mark.parametrize(("text", "expected"), [
    ("a.example\n", [(1, "a.example", False)]),
    ("A.Example.\n", [(1, "a.example", False)]),  # case and the trailing dot
    ("bücher.example\n", [(1, "xn--bcher-kva.example", False)]),
    ("# comment\n! comment\n\n   \nb.example\n", [(5, "b.example", False)]),
    ("c.example # why\n", [(1, "c.example", False)]),
    ("c.example#why\n", [(1, "c.example", False)]),
    ("*.d.example\n", [(1, "d.example", False)]),
    ("\ufeffe.example\r\n", [(1, "e.example", False)]),  # a BOM and CRLF
    ("\ufeff# comment\nf.example\n", [(2, "f.example", False)]),
])
def test_domains(text: str, expected: list[Item]) -> None:
    assert items("domains", text) == expected


@pytest.mark.parametrize(("text", "line", "word"), [
    ("ok.example\nbad..example\n", 2, "empty label"),
    ("0.0.0.0 a.example\n", 1, "hosts file"),
    ("a.example/path\n", 1, "bad character"),
    ("a*.example\n", 1, "bad character"),
])
def test_domains_unusable(text: str, line: int, word: str) -> None:
    [(number, reason)] = reasons("domains", text)
    assert number == line and word in reason


@pytest.mark.parametrize(("text", "expected"), [
    ("0.0.0.0 a.example\n", [(1, "a.example", False)]),
    ("127.0.0.1 a.example b.example # two\n", [(1, "a.example", False), (1, "b.example", False)]),
    (":: a.example\n::1\tb.example\n", [(1, "a.example", False), (2, "b.example", False)]),
    ("# only a comment\n\n", []),
    ("0.0.0.0 Bücher.Example.\n", [(1, "xn--bcher-kva.example", False)]),
])
def test_hosts(text: str, expected: list[Item]) -> None:
    assert items("hosts", text) == expected


@pytest.mark.parametrize(("text", "word"), [
    ("127.0.0.1 localhost\n", "local host name"),
    ("::1 ip6-localhost\n", "local host name"),
    ("255.255.255.255 broadcasthost\n", "not one that blocks"),
    ("192.0.2.1 a.example\n", "not one that blocks"),
    ("a.example\n", "domains list"),
    ("0.0.0.0\n", "without a name"),
    ("0.0.0.0 bad_name!.example\n", "bad character"),
])
def test_hosts_unusable(text: str, word: str) -> None:
    [(number, reason)] = reasons("hosts", text)
    assert number == 1 and word in reason


def test_hosts_line_with_local_and_real_names() -> None:
    assert items("hosts", "127.0.0.1 localhost a.example\n") == [
        (1, "'localhost' is a local host name, not one to block"), (1, "a.example", False)]


@pytest.mark.parametrize(("text", "expected"), [
    ("||a.example^\n", [(1, "a.example", False)]),
    ("@@||a.example^\n", [(1, "a.example", True)]),
    ("||a.example^|\n", [(1, "a.example", False)]),
    ("||a.example^$important\n", [(1, "a.example", False)]),
    ("@@||a.example^$important,all\n", [(1, "a.example", True)]),
    ("[Adblock Plus 2.0]\n! Title: x\n# comment\n\nb.example\n", [(5, "b.example", False)]),
    ("||Bücher.example^\n", [(1, "xn--bcher-kva.example", False)]),
])
def test_adblock(text: str, expected: list[Item]) -> None:
    assert items("adblock", text) == expected


@pytest.mark.parametrize(("text", "word"), [
    ("||a.example^$third-party\n", "option $third-party"),
    ("||a.example^$domain=b.example\n", "option $domain=b.example"),
    ("@@||a.example^$badfilter\n", "option $badfilter"),
    ("||a.example^$dnsrewrite=1.2.3.4\n", "option $dnsrewrite"),
    ("/^ads[0-9]+\\.example$/\n", "regular expression"),
    ("/ads/$important\n", "regular expression"),
    ("example.org##.banner\n", "cosmetic"),
    ("##.banner\n", "cosmetic"),
    ("example.org#@#.banner\n", "cosmetic"),
    ("||a.example/ads/\n", "path"),
    ("||a.example^/ads\n", "path"),
    ("|https://a.example/\n", "URL"),
    ("||*.a.example^\n", "wildcard"),
    ("||ads*.example^\n", "wildcard"),
    ("ads*.example\n", "wildcard"),
    ("||a.example\n", "no ^"),
    ("||a.example^x\n", "after ^"),
    ("||a..example^\n", "empty label"),
])
def test_adblock_unusable(text: str, word: str) -> None:
    [(number, reason)] = reasons("adblock", text)
    assert number == 1 and word in reason


RPZ_ZONE = """\
$TTL 300
$ORIGIN rpz.example.
@ IN SOA ns.rpz.example. hostmaster.rpz.example. (
    2026010101 ; serial
    3600 600 86400 300 )
    IN NS ns.rpz.example.
a.test CNAME .
*.a.test CNAME .
b.test 60 IN CNAME *.
*.c.test IN 60 CNAME .
ok.a.test CNAME rpz-passthru.
d.test.rpz.example. CNAME rpz-drop.
"""


def test_rpz_qname_triggers() -> None:
    assert items("rpz", RPZ_ZONE) == [
        (7, "a.test", False), (9, "b.test", False), (10, "c.test", False),
        (11, "ok.a.test", True), (12, "d.test", False)]


def test_rpz_origin_from_the_soa_of_a_transferred_zone() -> None:
    zone = ("rpz.example. 300 IN SOA ns.rpz.example. h.rpz.example. 1 2 3 4 5\n"
            "rpz.example. 300 IN NS ns.rpz.example.\n"
            "a.test.rpz.example. 300 IN CNAME .\n")
    assert items("rpz", zone) == [(3, "a.test", False)]


@pytest.mark.parametrize(("text", "word"), [
    ("32.1.2.0.192.rpz-ip CNAME .\n", "IP (response address) trigger"),
    ("24.0.2.0.192.rpz-nsip CNAME .\n", "NSIP"),
    ("ns.bad.test.rpz-nsdname CNAME .\n", "NSDNAME"),
    ("32.7.2.0.192.rpz-client-ip CNAME rpz-passthru.\n", "client IP"),
    ("a.test A 192.0.2.1\n", "local data"),
    ("a.test CNAME walled.example.\n", "rewrites"),
    ("a.test CNAME rpz-tcp-only.\n", "rewrites"),
    ("a.test.other.example. CNAME .\n", "outside the zone"),
    ("$INCLUDE other.zone\n", "$INCLUDE is not supported"),
    ("a.test CNAME (\n", "unbalanced"),
    ("a..test CNAME .\n", "empty label"),
    ("a.test 300 IN\n", "no record type"),
])
def test_rpz_unusable(text: str, word: str) -> None:
    [(number, reason)] = reasons("rpz", f"$ORIGIN rpz.example.\n{text}")
    assert number == 2 and word in reason


def test_rpz_owner_carries_over_blank_owners() -> None:
    zone = "$ORIGIN rpz.example.\na.test CNAME .\n  TXT \"why\"\n"
    assert items("rpz", zone) == [(2, "a.test", False), (3, "TXT record: local data answers "
                                  "with records of its own; only CNAME policies (. *. "
                                  "rpz-drop. rpz-passthru.) can be used")]


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="'csv' is not one of"):
        parse("csv", [])
    assert FORMATS == ("domains", "hosts", "adblock", "rpz")


@pytest.mark.parametrize("format_name", FORMATS)
def test_parsers_stream(format_name: str) -> None:
    """A parser reads lines as it is asked for items: the first comes before the input ends."""
    first = {"domains": "a.example", "hosts": "0.0.0.0 a.example", "adblock": "||a.example^",
             "rpz": "a.example CNAME ."}[format_name]

    def lines() -> Iterator[str]:
        yield f"{first}\n"
        raise AssertionError("read past the first item")

    assert next(parse(format_name, lines())) == (1, "a.example", False)
