"""Access control: which client networks are answered, and the answer everyone else gets.

A resolver that answers anyone becomes a DDoS amplifier, so the default (`server.allow`) is
the networks no one outside the site can reach, and serving the world takes `0.0.0.0/0` and
`::/0` written out. The list is checked on a query's source address before any other stage
and before the packet cache (server/front.py), for TCP once per connection (server/tcp.py),
and for the metrics listener's control endpoint (ops/http.py) with its own list.

Pure: no sockets, no clock. Checking an address here parses it (a microsecond or two); the
callers on the query path keep a bounded verdict per address, so a client pays it once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from resolver.message import wire
from resolver.message.constants import REFUSED

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(host: str) -> IpAddress | None:
    """The address a client's host text names, None if it names none. An IPv6 zone index
    (`fe80::1%eth0`) is left out, and an IPv4 client seen on an IPv6 socket (`::ffff:a.b.c.d`)
    is its IPv4 address, so one list serves sockets of both families."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_network(host: str, ipv4_prefix: int, ipv6_prefix: int
                   ) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network of the given prefix length (by family) that a client's address is in:
    what the rate limiter keys its buckets by and the query log truncates addresses to;
    None for text that is no address."""
    address = client_address(host)
    if address is None:
        return None
    bits = ipv4_prefix if address.version == 4 else ipv6_prefix
    return ipaddress.ip_network((address, bits), strict=False)


class Networks:
    """A set of networks, asked whether it holds a client's address (`host in networks`)."""

    def __init__(self, cidrs: Iterable[str]):
        self.cidrs = tuple(cidrs)
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for text in self.cidrs:
            network = ipaddress.ip_network(text)
            (v4 if network.version == 4 else v6).append(
                (int(network.network_address), int(network.netmask)))
        self._by_version = {4: tuple(v4), 6: tuple(v6)}

    @property
    def open(self) -> tuple[str, ...]:
        """The catch-all networks among these (`0.0.0.0/0`, `::/0`): anyone is answered."""
        return tuple(text for text in self.cidrs if ipaddress.ip_network(text).prefixlen == 0)

    def __contains__(self, host: object) -> bool:
        if not isinstance(host, str):
            return False
        address = client_address(host)
        if address is None:
            return False
        number = int(address)
        return any(number & mask == base for base, mask in self._by_version[address.version])


def refusal(data: bytes, client: tuple[str, int], transport: str) -> bytes | None:
    """The REFUSED answer to a query from a client outside the allowed networks: the header
    and question echoed (with an OPT if the query had one), so it is never larger than the
    query and amplifies nothing. A packet that is no query we would answer gets nothing: a
    stranger's junk is not worth an error answer."""
    try:
        q = wire.parse_query(data, client, transport)
    except wire.FormError:
        return None
    return wire.error_answer(q, REFUSED)
