"""resolver/stages/access.py: which client addresses a network list holds, and what a
refused client gets."""

from __future__ import annotations

import dns.message
import dns.rcode
import pytest

from resolver.ops.config import LOCAL_NETWORKS, LOOPBACK_NETWORKS
from resolver.stages.access import Networks, client_address, refusal
from tests.e2e import make_query

DEFAULT = Networks(LOCAL_NETWORKS)


@pytest.mark.parametrize(("host", "inside"), [
    ("127.0.0.1", True),
    ("127.255.255.254", True),
    ("10.1.2.3", True),
    ("172.16.0.1", True),
    ("172.31.255.255", True),
    ("172.32.0.1", False),  # just past 172.16.0.0/12
    ("192.168.1.1", True),
    ("192.169.0.1", False),
    ("100.64.0.1", True),  # RFC 6598 shared address space
    ("100.127.255.255", True),
    ("100.128.0.1", False),
    ("::1", True),
    ("fd00::1", True),  # unique local
    ("fc00::1", True),
    ("fe80::1", True),
    ("fe80::1%eth0", True),  # a zone index is left out
    ("febf::1", True),
    ("fec0::1", False),  # just past fe80::/10
    ("::ffff:192.168.0.1", True),  # an IPv4 client of an IPv6 socket
    ("::ffff:192.0.2.1", False),
    ("192.0.2.1", False),
    ("8.8.8.8", False),
    ("2001:db8::1", False),
    ("0.0.0.0", False),
    ("::", False),
    ("localhost", False),  # a peer is never a name: what is no address is outside
    ("", False),
])
def test_the_default_allows_the_networks_no_outsider_reaches(host: str, inside: bool) -> None:
    assert (host in DEFAULT) is inside


@pytest.mark.parametrize(("cidrs", "host", "inside"), [
    (("127.0.0.1/32",), "127.0.0.1", True),
    (("127.0.0.1/32",), "127.0.0.2", False),
    (("192.0.2.0/25",), "192.0.2.127", True),
    (("192.0.2.0/25",), "192.0.2.128", False),
    (("2001:db8::/32",), "2001:db8:ffff::1", True),
    (("2001:db8::/32",), "2001:db9::1", False),
    (("0.0.0.0/0",), "203.0.113.9", True),
    (("0.0.0.0/0",), "2001:db8::1", False),  # IPv4's open list says nothing of IPv6
    (("::/0",), "2001:db8::1", True),
    (("::/0",), "::ffff:192.0.2.1", False),  # mapped: judged as the IPv4 address it is
    ((), "127.0.0.1", False),
])
def test_networks(cidrs: tuple[str, ...], host: str, inside: bool) -> None:
    assert (host in Networks(cidrs)) is inside


@pytest.mark.parametrize(("cidrs", "open_to"), [
    (LOCAL_NETWORKS, ()),
    (LOOPBACK_NETWORKS, ()),
    (("0.0.0.0/0", "::1/128"), ("0.0.0.0/0",)),
    (("10.0.0.0/8", "::/0", "0.0.0.0/0"), ("::/0", "0.0.0.0/0")),
])
def test_open_lists_are_recognized(cidrs: tuple[str, ...], open_to: tuple[str, ...]) -> None:
    assert Networks(cidrs).open == open_to


def test_a_mapped_address_is_its_ipv4_address() -> None:
    assert str(client_address("::ffff:10.0.0.1")) == "10.0.0.1"
    assert client_address("not an address") is None


@pytest.mark.parametrize("edns", [None, 0])
def test_a_refusal_echoes_the_question_and_is_no_larger(edns: int | None) -> None:
    query = make_query("www.example.org", "A", edns=edns, qid=0x4242).to_wire()
    answer = refusal(query, ("192.0.2.1", 53), "udp")
    assert answer is not None and len(answer) <= len(query)
    response = dns.message.from_wire(answer)
    assert response.id == 0x4242 and response.rcode() == dns.rcode.REFUSED
    assert str(response.question[0].name) == "www.example.org."
    assert response.answer == response.authority == []
    assert response.edns == (-1 if edns is None else 0)


@pytest.mark.parametrize("data", [b"", b"\x00" * 11, make_query("x.test").to_wire()[:15],
                                  b"\x12\x34\x81\x80" + bytes(8)])
def test_junk_from_a_stranger_gets_nothing(data: bytes) -> None:
    assert refusal(data, ("192.0.2.1", 53), "udp") is None
