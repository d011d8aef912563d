"""Who and when a staged list applies to: client networks, the rollout slice, the time window.

Pure logic: the client address and the time are arguments (the time is wall-clock epoch
seconds, since windows are written as calendar instants), nothing here reads a clock or a
socket. The matcher (rules/matcher.py) asks `Staging.applies` only for a list whose domain
matched the query name, so none of this costs anything on names no staged list names.

Rollout: a client is in a list's rollout when the first 64 bits of a BLAKE2b digest of its
address, keyed with a digest of the list's name, fall below N% of 2**64. That makes the
slice
- sticky: the same client is in or out for as long as N stays the same, in every worker
  process and after every restart (unlike Python's `hash`, which is salted per process);
- monotonic: raising N only moves the threshold up, so it only adds clients;
- independent per list: another list's 10% is another 10% of clients, not the same ones;
- by /64 for IPv6: a host's privacy addresses change within its /64, and it must not flap.
"""

from __future__ import annotations

import datetime
import hashlib
import socket

from resolver.rules.model import ALLOW, ENFORCE, EVERYONE, Network, RuleList

# A client address as the scope checks use it: (4 or 6, the address as an integer, the bytes
# the rollout hashes: the whole IPv4 address, the /64 of an IPv6 one). None: not an address.
Address = tuple[int, int, bytes]
_SPACE = 1 << 64  # buckets: the rollout hash is 64 bits
_MAPPED = "::ffff:"


def client_address(host: str) -> Address | None:
    """Parse a client's host text once per query (inet_pton: a fraction of ipaddress's cost).

    An IPv4-mapped IPv6 address is its IPv4 address, so one client is one client whichever
    socket it came in on; an IPv6 zone index (fe80::1%eth0) is dropped.
    """
    try:
        if ":" not in host:
            packed = socket.inet_pton(socket.AF_INET, host)
            return 4, int.from_bytes(packed, "big"), packed
        if host.startswith(_MAPPED) and "." in host:
            return client_address(host[len(_MAPPED):])
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        return 6, int.from_bytes(packed, "big"), packed[:8]
    except (OSError, ValueError):  # not an IP literal (a test's fake client, a Unix socket)
        return None


class Scope:
    """A set of networks, checked with one set lookup per distinct prefix length in use (so
    a thousand /32s cost one lookup, not a thousand comparisons)."""

    __slots__ = ("_tables",)

    def __init__(self, networks: tuple[Network, ...]):
        by_length: dict[tuple[int, int], set[int]] = {}
        for network in networks:
            bits = network.max_prefixlen
            mask = ((1 << bits) - 1) ^ ((1 << (bits - network.prefixlen)) - 1)
            by_length.setdefault((network.version, mask), set()).add(
                int(network.network_address))
        tables: dict[int, list[tuple[int, frozenset[int]]]] = {4: [], 6: []}
        for (version, mask), starts in sorted(by_length.items()):
            tables[version].append((mask, frozenset(starts)))
        self._tables = {version: tuple(table) for version, table in tables.items()}

    def __contains__(self, address: Address) -> bool:
        value = address[1]
        return any(value & mask in starts for mask, starts in self._tables[address[0]])


def rollout_key(list_name: str) -> bytes:
    """The hash key of a list's rollout: a digest of its name (BLAKE2b keys are at most 64
    bytes; list names have no length limit)."""
    return hashlib.blake2b(list_name.encode(), digest_size=32).digest()


def bucket(key: bytes, address: Address) -> int:
    """The client's place in [0, 2**64) for the list whose rollout_key is key."""
    digest = hashlib.blake2b(address[2], digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big")


def threshold(rollout: float) -> int:
    """Buckets below this are in a rollout of `rollout` percent (0: nobody)."""
    return int(rollout * _SPACE / EVERYONE)


def in_rollout(list_name: str, rollout: float, host: str) -> bool:
    """Text form for tools and tests: is the client at host in list_name's rollout?"""
    address = client_address(host)
    if rollout >= EVERYONE:
        return True
    return address is not None and bucket(rollout_key(list_name), address) < threshold(rollout)


class Staging:
    """One staged list's conditions, compiled for the matcher: applies(address, now)."""

    __slots__ = ("dry_run", "allow", "_clients", "_excepted", "_key", "_threshold", "_starts",
                 "_expires")

    def __init__(self, rule_list: RuleList):
        self.dry_run = rule_list.mode != ENFORCE
        self.allow = rule_list.action == ALLOW
        self._clients = Scope(rule_list.clients) if rule_list.clients else None
        self._excepted = Scope(rule_list.except_clients) if rule_list.except_clients else None
        everyone = rule_list.rollout >= EVERYONE
        self._key = b"" if everyone else rollout_key(rule_list.name)
        self._threshold = None if everyone else threshold(rule_list.rollout)
        self._starts = rule_list.starts
        self._expires = rule_list.expires

    def active(self, now: float) -> bool:
        """Inside the window: from starts (inclusive) to expires (exclusive)."""
        return ((self._starts is None or now >= self._starts)
                and (self._expires is None or now < self._expires))

    def applies(self, address: Address | None, now: float) -> bool:
        """Whether the list applies to this client at this time. A client whose address
        cannot be read is outside every client list and every rollout slice below 100%."""
        if not self.active(now):
            return False
        if self._clients is not None and (address is None or address not in self._clients):
            return False
        if self._excepted is not None and address is not None and address in self._excepted:
            return False
        return self._threshold is None or (
            address is not None and bucket(self._key, address) < self._threshold)


def utc(epoch: float) -> str:
    """An instant as an RFC 3339 UTC time, for messages and log lines (epoch seconds for one
    no calendar can show: a message must never fail)."""
    try:
        moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    except (ValueError, OverflowError, OSError):
        return f"{epoch:.0f} seconds after the epoch"
    return moment.isoformat().replace("+00:00", "Z")
