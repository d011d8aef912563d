"""Configuration: one YAML file and a few CLI flags, parsed once into frozen dataclasses.

Each component receives only its own section, already typed and validated, so no other module
touches `yaml` or a raw dict. Every key is declared once, on its dataclass field below (default,
kind of value with its bounds, help text), and read through that declaration (resolver.ops.schema);
docs/configuration.md and deploy/resolver.yaml are generated from it (resolver.ops.configdoc).
Every problem is reported at once as 'file:line: dotted.path: what is wrong', because an
operator fixing a broken file should see all its mistakes in one run, not one per restart.
"""

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from resolver.message.constants import MAX_TTL
from resolver.ops.errors import ConfigError
from resolver.ops.schema import (
    MISSING_VALUE,
    Nested,
    Problems,
    ReadNode,
    field_reader,
    has_key,
    read_mapping,
    readers,
    required,
    section,
    setting,
    value_node,
)
from resolver.ops.shipped import SHIPPED_RULES
from resolver.ops.values import (
    BOOLEAN,
    CA_FILE,
    FRACTION,
    NAME,
    PATH,
    SECONDS,
    TTL,
    Invalid,
    Kind,
    Parse,
    choice,
    domain_name,
    integer,
    kind,
    list_of,
    text,
)
from resolver.ops.yamlnodes import NULL, compose
from resolver.upstream.selection import EXPLORE, STRATEGIES

RESOLV_CONF = "/etc/resolv.conf"
FALLBACK_UPSTREAMS = ("9.9.9.9", "1.1.1.1")
TLS_PORT = 853  # RFC 7858
TLS_SCHEME = "tls://"
PROTOCOLS = ("udp", "tls")


# --- addresses -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """An IP literal and port to bind; hostnames are refused so startup never depends on DNS."""

    host: str
    port: int


def parse_address(text: str, default_port: int, *, min_port: int = 1) -> Address:
    """Parse 'host', 'host:port', '[v6]', '[v6]:port' or a bare v6 literal (no port).

    A bare IPv6 address cannot carry a port: '::1:53' is itself a valid address, so brackets
    are the only unambiguous form. Raises ValueError with a message naming the text.
    """
    if not text.strip():
        raise ValueError("expected an address, got an empty string")
    host, port = _split_host_port(text.strip(), default_port)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address (hostnames are not accepted here)"
        ) from None
    if not (port and port.isascii() and port.isdigit() and min_port <= int(port) <= 65535):
        raise ValueError(f"{text!r}: port must be a number from {min_port} to 65535")
    return Address(str(ip), int(port))


def format_address(address: Address) -> str:
    """The address as parse_address reads it back: 'host:port', '[v6]:port'."""
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}"


def _split_host_port(text: str, default_port: int) -> tuple[str, str | None]:
    """Split text into host and port text; port None means malformed brackets."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or ":" not in host:
            raise ValueError(f"{text!r}: brackets are only for IPv6 addresses, as '[::1]:53'")
        if not rest:
            return host, str(default_port)
        return host, rest[1:] if rest.startswith(":") else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port
    return text, str(default_port)


def _address(default_port: int, min_port: int) -> Parse[Address]:
    def parse(value: object) -> Address:
        if not isinstance(value, str):
            raise Invalid("expected an address such as '127.0.0.1:53' or '[::1]:53'")
        try:
            return parse_address(value, default_port, min_port=min_port)
        except ValueError as error:
            raise Invalid(str(error)) from None

    return parse


LISTEN = list_of("addresses", kind("an address", _address(53, 0)),
                 if_empty="expected at least one address")
_metrics_address = _address(9153, 0)


def _metrics_listen(value: object) -> Address | None:
    if value is None:
        return None
    if value is False:  # YAML reads a bare off or no as false
        raise Invalid("expected an address, or null to turn the endpoint off")
    return _metrics_address(value)


def _metrics_flag(value: object) -> Address | None:
    return None if value == "off" else _metrics_address(value)


def _network(value: object) -> str:
    """A client network, as `10.0.0.0/8`, `2001:db8::/32` or a single address; kept as its
    normal text (stages/access.py compiles it). Host bits set are an error: `10.1.2.3/8` is
    more likely a typo than a wish for 10.0.0.0/8."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise Invalid("expected a network such as '192.0.2.0/24' or '2001:db8::/32'")
    try:
        network = ipaddress.ip_network(value.strip())
    except ValueError as error:
        raise Invalid(f"{value!r} is not a network: {error}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
        raise Invalid(f"{value!r}: write IPv4 networks as IPv4 ('192.0.2.0/24'); IPv4 "
                      "clients of an IPv6 socket are matched by their IPv4 address")
    return str(network)


def _optional_name(value: object) -> str | None:
    """A user or group name (checked against the system when privileges are dropped), or null."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise Invalid("expected a name, or null")
    return value.strip()


NETWORKS = list_of("networks (CIDR)", kind("a network", _network))
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
# Networks no one outside the site can reach: loopback, RFC 1918 private, RFC 6598 shared
# (carrier-grade NAT), IPv6 unique local (RFC 4193) and link-local.
LOCAL_NETWORKS = (*LOOPBACK_NETWORKS, "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                  "100.64.0.0/10", "fc00::/7", "fe80::/10")


# --- upstream servers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpstreamServer:
    """One upstream resolver, as `upstream.servers` and a conditional group's servers list it.
    The file's `address` fills both host and port: the port's default depends on protocol."""

    host: str = required(
        text("an address such as '192.0.2.1' or '[2001:db8::1]:853'"),
        f"`HOST[:PORT]`, an IP literal; the port is 53, or {TLS_PORT} with `protocol: tls`.",
        key="address")
    port: int = 53
    protocol: str = setting(
        "udp", choice(*PROTOCOLS),
        "`udp` (TCP when an answer is truncated) or `tls` (DNS over TLS, RFC 7858).")
    tls_name: str | None = setting(
        None, NAME,
        "The name the server's certificate must carry. Only with `tls`, and required there: "
        "addresses are IP literals, so there is no host name to check the certificate by.",
        shown="none; required with `tls`")
    ca_file: str | None = setting(
        None, CA_FILE,
        "A CA bundle (PEM) to trust instead of the system's CAs, e.g. a private CA; only with "
        "`tls`.", shown="system CAs")
    timeout: float | None = setting(
        None, SECONDS, "Seconds for one attempt to this server.", shown="`upstream.timeout`")


def _upstream_string(value: object) -> UpstreamServer:
    """'HOST[:PORT]' over UDP, or 'tls://HOST[:PORT]#NAME' over TLS (port 853), NAME being
    the name on the server's certificate: the one form `--upstream` has for DNS over TLS."""
    if not (isinstance(value, str) and value.startswith(TLS_SCHEME)):
        address = _address(53, 1)(value)
        return UpstreamServer(address.host, address.port)
    where, _, name = value.removeprefix(TLS_SCHEME).partition("#")
    if not name:
        raise Invalid(f"{value!r}: expected 'tls://HOST[:PORT]#NAME', NAME being the name "
                      f"on the server's certificate")
    address = _address(TLS_PORT, 1)(where)
    return UpstreamServer(address.host, address.port, "tls", domain_name(name))


_UPSTREAM = kind("an address", _upstream_string)


def _server(base: Path) -> ReadNode:
    """One upstream: an address string (see _upstream_string), or a mapping of the declared
    keys. The default port depends on the protocol, so the address is parsed after the rest."""
    by_name = readers(UpstreamServer, base)
    string = field_reader(_UPSTREAM, base)

    def read(node: yaml.Node, path: str, problems: Problems) -> object:
        if not isinstance(node, yaml.MappingNode):
            return string(node, path, problems)
        values = read_mapping(node, path, by_name, problems)
        if not has_key(node, "address"):
            problems.add(node, f"{path}.address", "required")
        if "address" not in values:
            return MISSING_VALUE
        if has_key(node, "protocol") and "protocol" not in values:
            return MISSING_VALUE  # reported; tls_name and ca_file depend on what it should be
        tls = values.get("protocol") == "tls"
        if tls and not has_key(node, "tls_name"):
            problems.add(node, f"{path}.tls_name", "required with tls for an IP address")
        for key in ("tls_name", "ca_file"):
            if not tls and has_key(node, key):
                problems.add(value_node(node, key), f"{path}.{key}", "only with protocol tls")
        try:
            address = parse_address(values.pop("address"), TLS_PORT if tls else 53)
        except ValueError as error:
            problems.add(value_node(node, "address"), f"{path}.address", str(error))
            return MISSING_VALUE
        return UpstreamServer(address.host, address.port, **values)

    return read


def _servers(*, required: bool) -> Nested[tuple[UpstreamServer, ...]]:
    """A list of upstreams; required: at least one (a conditional group has no fallback)."""

    def reader(base: Path) -> ReadNode:
        server = _server(base)

        def read(node: yaml.Node, path: str, problems: Problems) -> object:
            if node.tag == NULL and not required:  # `servers:` left empty, as `servers: []`
                return ()
            if not isinstance(node, yaml.SequenceNode):
                problems.add(node, path, "expected a list of servers")
                return MISSING_VALUE
            if required and not node.value:
                problems.add(node, path, "expected at least one server")
                return MISSING_VALUE
            servers = [server(item, f"{path}[{index}]", problems)
                       for index, item in enumerate(node.value)]
            return MISSING_VALUE if MISSING_VALUE in servers else tuple(servers)

        return read

    return Nested("a list of servers" + (", at least one" if required else ""), reader,
                  UpstreamServer)


@dataclass(frozen=True, slots=True)
class ConditionalForward:
    """Names at or under `domains` go to `servers` only (never to the default servers)."""

    domains: tuple[str, ...] = required(  # normalized names
        list_of("domain names", NAME, if_empty="expected at least one domain"),
        "Names at or under these domains go to this group's servers only; the most specific "
        "domain wins.")
    servers: tuple[UpstreamServer, ...] = required(
        _servers(required=True), "The group's servers, written as in `upstream.servers`.")


def _conditional(base: Path) -> ReadNode:
    """Conditional forwarding groups. A domain in two groups is an error: which group wins
    would otherwise depend on the order of the file."""
    by_name = readers(ConditionalForward, base)

    def read(node: yaml.Node, path: str, problems: Problems) -> object:
        if not isinstance(node, yaml.SequenceNode):
            problems.add(node, path, "expected a list of {domains, servers} mappings")
            return MISSING_VALUE
        groups: list[ConditionalForward] = []
        seen: dict[str, str] = {}  # domain: the group it is in
        for index, item in enumerate(node.value):
            where = f"{path}[{index}]"
            if not isinstance(item, yaml.MappingNode):
                problems.add(item, where, "expected a mapping with domains and servers")
                continue
            values = read_mapping(item, where, by_name, problems)
            for key in by_name:
                if not has_key(item, key):
                    problems.add(item, f"{where}.{key}", "required")
            for position, domain in enumerate(values.get("domains", ())):
                if domain in seen:
                    problems.add(value_node(item, "domains").value[position],
                                 f"{where}.domains[{position}]",
                                 f"{domain!r} is already in {seen[domain]}")
                seen.setdefault(domain, where)
            if len(values) == len(by_name):
                groups.append(ConditionalForward(**values))
        return tuple(groups)

    return read


# --- the sections ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[Address, ...] = setting(
        (Address("127.0.0.1", 1053),), LISTEN,
        "Addresses to serve UDP and TCP on: `HOST:PORT` or `[v6]:PORT`, IP literals only. A "
        "port left out means 53; port 0 picks a free port (for tests). Use `0.0.0.0:53` and "
        "`[::]:53` to serve a network.")
    tcp_idle_timeout: float = setting(
        10.0, SECONDS, "Seconds a TCP connection may stay quiet: one without a query for this "
        "long is closed.")
    tcp_max_connections: int = setting(
        1000, integer(1), "Open TCP connections; new ones beyond this are closed at once.")
    max_inflight: int = setting(
        10000, integer(1, 65535),
        "Forwarded queries in flight; beyond it, new ones are dropped, so an overload sheds "
        "queries instead of growing memory. At most 65535: one DNS-over-TLS connection carries "
        "them all under 16-bit IDs.")
    tcp_max_connections_per_client: int = setting(
        32, integer(1), "Open TCP connections from one client address; new ones beyond this "
        "are closed at once, so one client cannot take every connection.")
    tcp_max_pipelined: int = setting(
        100, integer(1, 65535), "Forwarded queries in flight on one TCP connection (RFC 7766 "
        "pipelining); at the cap the connection is not read until an answer goes out.")
    allow: tuple[str, ...] = setting(
        LOCAL_NETWORKS, NETWORKS,
        "Client networks that are answered; everyone else is refused before any other stage "
        "(see `server.refuse_action`). The default is the networks no one outside the site "
        "can reach: loopback, RFC 1918, RFC 6598 (100.64.0.0/10), IPv6 unique local "
        "(fc00::/7) and link-local (fe80::/10). Serving everyone takes `0.0.0.0/0` and "
        "`::/0` written out, and the startup line then warns: an open resolver is a DDoS "
        "amplifier (docs/hardening.md).",
        example='[127.0.0.0/8, "::1/128", 192.0.2.0/24, "2001:db8::/32"]')
    refuse_action: str = setting(
        "refuse", choice("refuse", "drop"),
        "What a client outside `server.allow` gets: `refuse` answers REFUSED (outcome "
        "`refused`; a TCP connection stays open for its answers), `drop` answers nothing "
        "(outcome `dropped`; a TCP connection is closed at once).")
    any: str = setting(
        "minimal", choice("minimal", "forward"),
        "ANY queries over UDP: `minimal` answers them with the one HINFO record of RFC 8482 "
        "(small, so no amplifier); `forward` treats them as any other query. Over TCP, ANY "
        "is always forwarded: no one can spoof a TCP source address.")
    user: str | None = setting(
        None, kind("a user name, or null", _optional_name),
        "Drop to this user once the ports are bound (as root), before any query is answered: "
        "supplementary groups cleared, then the group, then the user, for good. Workers run "
        "as it too. `null`: keep the user started as (a warning when that is root).",
        example="resolver")
    group: str | None = setting(
        None, kind("a group name, or null", _optional_name),
        "The group to drop to with `server.user`; `null`: the user's own group.")


def _check_server(section: ServerConfig) -> Iterable[tuple[str, str]]:
    if section.group is not None and section.user is None:
        yield "group", "only with server.user"


def _qps(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1e7:
        raise Invalid("expected queries per second from 0 to 10000000 (0 turns limiting off)")
    return float(value)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Per-client-prefix limits on UDP queries (resolver/stages/ratelimit.py)."""

    qps: float = setting(
        0.0, kind("queries per second >= 0", _qps),
        "Queries per second each client prefix may send over UDP, on average; 0 turns rate "
        "limiting off. Clients are grouped by prefix (`ratelimit.ipv4_prefix`, "
        "`ratelimit.ipv6_prefix`), as Unbound's and BIND's limits are.", example="100")
    burst: int = setting(
        200, integer(1), "Queries a prefix may send at once above `ratelimit.qps` (the token "
        "bucket's size).")
    slip: int = setting(
        2, integer(0, 100),
        "Every Nth limited query is answered with an empty truncated (TC=1) answer, so a real "
        "client retries over TCP, which is not limited; the rest get nothing. 1 answers every "
        "limited query so, 0 none.")
    ipv4_prefix: int = setting(
        24, integer(8, 32), "IPv4 clients share a bucket per prefix of this many bits.")
    ipv6_prefix: int = setting(
        56, integer(16, 128), "IPv6 clients share a bucket per prefix of this many bits.")
    max_tracked: int = setting(
        65536, integer(1, 10_000_000),
        "Prefixes tracked at once; beyond it, the one heard from least recently is forgotten. "
        "Bounds the limiter's memory whatever the number of source addresses: about 300 bytes "
        "a prefix (docs/hardening.md).", note="about 19 MiB")
    exempt: tuple[str, ...] = setting(
        (), NETWORKS, "Client networks never limited (a NAT'd office, a monitoring probe).",
        example="[192.0.2.0/24]")
    dry_run: bool = setting(
        False, BOOLEAN,
        "Count and log what would be limited (`resolver_would_ratelimit_total`) without "
        "limiting it, to size `ratelimit.qps` on real traffic first.")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    servers: tuple[UpstreamServer, ...] = setting(
        (), _servers(required=False),
        "Upstream resolvers to forward queries to, each `HOST[:PORT]` (UDP, port 53; TCP when "
        f"an answer is truncated), `tls://HOST[:PORT]#NAME` (DNS over TLS, port {TLS_PORT}, "
        "NAME being the name the server's certificate must carry), or a mapping with the keys "
        f"of `upstream.servers[i]`. Empty means the nameservers of `{RESOLV_CONF}`, minus this "
        "resolver's own listen addresses (to avoid a forwarding loop); if none remain, "
        f"{' and '.join(FALLBACK_UPSTREAMS)}.",
        note=f"the nameservers of `{RESOLV_CONF}`",
        example='- 192.0.2.53\n- "[2001:db8::53]:5353"\n- tls://9.9.9.9#dns.quad9.net\n'
                "- {address: 192.0.2.54, protocol: tls, tls_name: dns.example.net, timeout: 1.0}")
    strategy: str = setting(
        "failover", choice(*STRATEGIES),
        "The order servers are tried in for each query: `failover` (as configured), `random` "
        "(shuffled per query) or `fastest` (lowest smoothed round-trip time first; about 1 "
        f"query in {round(1 / EXPLORE)} tries another first, so a recovered server is measured "
        "again).")
    timeout: float = setting(
        2.0, SECONDS, "Seconds for one attempt; a server's own `timeout` takes precedence.")
    deadline: float = setting(
        5.0, SECONDS, "Seconds for the whole query, all attempts included, before the client "
        "gets SERVFAIL; at least `upstream.timeout`.")
    udp_size: int = setting(
        1232, integer(512, 65535),
        "EDNS UDP payload size advertised upstream, in bytes; 1232 avoids IP fragmentation.")
    unhealthy_after: int = setting(
        3, integer(1),
        "Failures in a row (timeouts, broken exchanges; a SERVFAIL or REFUSED moves the query "
        "on to the next server but is no failure) before a server is backed off: skipped for "
        "`upstream.backoff` seconds, then probed by one query. When every server is backed "
        "off, they are tried anyway.")
    backoff: float = setting(
        1.0, SECONDS, "Seconds a server is first backed off for; doubles with each further "
        "failure.")
    max_backoff: float = setting(
        60.0, SECONDS, "The cap on a server's backoff, in seconds; at least `upstream.backoff`.")
    tls_idle_timeout: float = setting(
        10.0, SECONDS, "Seconds a DNS-over-TLS connection with no query in flight stays open "
        "for reuse.")
    conditional: tuple[ConditionalForward, ...] = setting(
        (), Nested("a list of {domains, servers} mappings", _conditional, ConditionalForward),
        "Conditional forwarding, as `[{domains: [corp.example], servers: [...]}]`: names at or "
        "under a group's `domains` go only to its `servers` (written as in `upstream.servers`), "
        "never to the default servers, even when those fail. A domain may appear in one group "
        "only.",
        example="- domains: [corp.example, 10.in-addr.arpa]\n"
                '  servers: ["192.0.2.10", "192.0.2.11"]')


def _check_upstream(section: UpstreamConfig) -> Iterable[tuple[str, str]]:
    if section.deadline < section.timeout:
        yield "deadline", f"expected seconds >= upstream.timeout ({section.timeout:g})"
    if section.max_backoff < section.backoff:
        yield "max_backoff", f"expected seconds >= upstream.backoff ({section.backoff:g})"


def _max_change(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        raise Invalid("expected a fraction >= 0 (0.5 is 50%), or null to turn the check off")
    return float(value)


MIN_WATCH_INTERVAL = 0.1  # seconds between looks at the rule files, at the least


def _watch_interval(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid("expected seconds, or 0 to turn watching off")
    if value == 0:
        return 0.0
    if 0 < value < MIN_WATCH_INTERVAL:  # each look stats every rule file: not a busy loop
        raise Invalid(f"expected seconds >= {MIN_WATCH_INTERVAL:g}, or 0 to turn watching off")
    return SECONDS.parser(Path())(value)


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """What a reload may change before it is refused (resolver/server/reload.py)."""

    max_change: float | None = setting(
        0.5, kind("a fraction >= 0, or null", _max_change),
        "Refuse a reload that would change any list's domain count by more than this fraction "
        "of its count in force (0.5: half); a list that disappears is a change of 1. A new "
        "list, or one that held no domains, is not checked. `null` turns this check off.")
    must_resolve: tuple[str, ...] = setting(
        (), list_of("domain names", NAME),
        "Names that must never be blocked: a reload under which any of them would be blocked "
        "is refused. Checked on reloads only; at startup such a name is logged as a warning.")


@dataclass(frozen=True, slots=True)
class BlockingConfig:
    rules: tuple[str, ...] = setting(  # absolute paths
        (SHIPPED_RULES,), list_of("paths", PATH),
        "Rule files (YAML, or plain text with one domain per line) or directories of them, "
        "loaded together into one rule set (list names unique across them); when two lists "
        "name the same domain, the list first by name answers (docs/rules.md, precedence).",
        shown=f"`[the shipped {'/'.join(Path(SHIPPED_RULES).parts[-2:])}]`",
        example="[rules.d, my-list.yaml]")
    ttl: int = setting(
        300, TTL, "TTL of blocked answers: the SOA minimum of NXDOMAIN/NODATA answers (how long "
        "clients cache the negative answer) and the TTL of sinkhole addresses. A rule list's "
        "own `ttl` takes precedence.")
    soa_mname: str = setting(
        "resolver.invalid", NAME,
        "The primary server name written into the SOA record of blocked answers.")
    soa_rname: str = setting(
        "hostmaster.resolver.invalid", NAME,
        "The mailbox name written into the SOA record of blocked answers.")
    ede: bool = setting(
        True, BOOLEAN,
        "Attach an Extended DNS Error (RFC 8914, code 15 'Blocked') to blocked answers.")
    watch_interval: float = setting(
        2.0, kind("seconds >= 0.1, or 0 for off", _watch_interval),
        "Seconds between looks at the rule files, the files in rule directories and the config "
        "file; a change that stays the same for one interval reloads the rules (as SIGHUP "
        "does). 0 turns watching off.")
    state_dir: str | None = setting(
        None, PATH,
        "A directory where the last good copy of each URL rule source is kept (with its ETag), "
        "so that a restart while a feed is down still serves it, and a restart within a "
        "source's refresh interval does not download it again. Without it, copies are kept "
        "in a temporary directory for the life of the process (docs/rules.md, lists from "
        "files and URLs).",
        shown="none", example="/var/lib/resolver")
    guard: GuardConfig = section(
        GuardConfig, "Checks a reload must pass, or it is refused and the rules in force stay "
        "(SIGHUP, a file change, `POST /-/reload`); `POST /-/reload?force=1` skips them.",
        example="max_change: 0.2\nmust_resolve: [www.example.com, login.example.net]")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = setting(
        100_000, integer(0), "Most answers kept in memory; 0 disables the cache.")
    max_bytes: int = setting(
        128 * 2**20, integer(0),
        "Most bytes of cached answers, each counting its size plus 1,050 bytes of bookkeeping. "
        "The least recently used answers go first when this or `cache.max_entries` is reached.",
        note="128 MiB")
    min_ttl: int = setting(
        0, TTL, "Lower bound on the TTLs of cached answers; at most `cache.max_ttl`.")
    max_ttl: int = setting(86400, TTL, "Upper bound on the TTLs of cached answers.")
    negative_ttl: int = setting(
        3600, TTL, "Upper bound on caching NXDOMAIN/NODATA answers, whose TTL comes from their "
        "SOA.")
    servfail_ttl: int = setting(
        5, TTL, "Seconds a failure (SERVFAIL, or no upstream answering) is cached, so a failing "
        "name does not send every query upstream again (RFC 9520); also how long an expired "
        "answer is served stale straight from the cache after a failed refresh, before upstream "
        "is tried again. 0 disables both.")
    prefetch: bool = setting(
        True, BOOLEAN, "Refresh popular answers in the background before they expire, so "
        "clients keep getting them from the cache.")
    prefetch_min_hits: int = setting(
        3, integer(1), "Hits an answer needs before it is prefetched.")
    prefetch_window: float = setting(
        0.1, FRACTION, "The last fraction of its TTL in which a hit prefetches an answer.")
    serve_stale: bool = setting(
        True, BOOLEAN, "Serve-stale (RFC 8767): answer with expired data when the upstreams "
        "fail, or have not answered within `cache.stale_client_timeout`.")
    stale_window: int = setting(
        86400, integer(0), "Seconds past expiry an answer is kept for serve-stale.")
    stale_ttl: int = setting(30, integer(1, MAX_TTL), "TTL of stale answers.")
    stale_client_timeout: float = setting(
        1.8, SECONDS, "Seconds a client waits for upstream before it gets the stale answer, if "
        "there is one; the refresh goes on in the background.")
    packet_entries: int = setting(
        100_000, integer(0),
        "Whole UDP answers kept by the query's bytes (after its ID), the packet cache: a "
        "repeated question is answered before any decoding, a blocked answer until the rules "
        "change, a cached one until its TTLs tick down. Oldest out first; about 560 bytes each, "
        "never more than about 2 KiB (queries over 512 bytes and answers over 1,232 are not "
        "kept). 0 disables it.")


def _check_cache(section: CacheConfig) -> Iterable[tuple[str, str]]:
    if section.min_ttl > section.max_ttl:
        yield "min_ttl", f"expected at most cache.max_ttl ({section.max_ttl})"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Address | None = setting(
        Address("127.0.0.1", 9153),
        kind("an address, or null to turn the endpoint off", _metrics_listen),
        "Where to serve Prometheus metrics over HTTP (`/metrics`); a port left out means 9153. "
        "`null` (or `--metrics off`) disables the endpoint.")
    allow: tuple[str, ...] = setting(
        LOOPBACK_NETWORKS, NETWORKS,
        "Client networks that may use the control endpoint `POST /-/reload` (others get 403); "
        "`/metrics` is served to anyone who can reach `metrics.listen`.")


STDOUT, STDERR = "-", "stderr"  # query_log.path values that are not files


def _log_destination(base: Path) -> Parse[str | None]:
    """`-` (or `stdout`), `stderr`, a file path (relative to the config file), or null."""
    resolve = PATH.parser(base)

    def parse(value: object) -> str | None:
        if value is None:
            return None
        if value in (STDOUT, "stdout", STDERR):
            return STDERR if value == STDERR else STDOUT
        return resolve(value)

    return parse


LOG_DESTINATION = Kind("a path, `-` for stdout, `stderr`, or null for off", _log_destination)


@dataclass(frozen=True, slots=True)
class QueryLogConfig:
    """One JSON object per answered query (docs/querylog.md), written by a thread."""

    path: str | None = setting(
        None, LOG_DESTINATION,
        "Where the query log goes: a file (rotated by size), `-` for stdout, `stderr`; `null` "
        "turns it off (`--query-log PATH` sets it). With `--workers N`, worker K writes "
        "`PATH.worker-K` (and rotates only that), so no two processes share a file; stdout and "
        "stderr are shared, each line written whole.", example="/var/log/resolver/queries.jsonl")
    sample: int = setting(
        1, integer(1), "Log 1 query in this many (counted, not random: 100 logs the 1st, 101st, "
        "...), of those `query_log.only_blocked` keeps.")
    only_blocked: bool = setting(
        False, BOOLEAN, "Log only blocked answers and those a dry-run list would have blocked.")
    truncate_clients: bool = setting(
        True, BOOLEAN, "Log client addresses with their host bits zeroed, to the prefixes "
        "below, for privacy; false logs them whole.")
    ipv4_prefix: int = setting(
        24, integer(0, 32), "Bits of an IPv4 client address kept when truncating.")
    ipv6_prefix: int = setting(
        56, integer(0, 128), "Bits of an IPv6 client address kept when truncating.")
    max_bytes: int = setting(
        100 * 2**20, integer(0), "Size at which a log file is rotated: renamed to `PATH.1` "
        "(`PATH.1` to `PATH.2`, ...), and a new one begun; 0 never rotates. Files only.",
        note="100 MiB")
    backups: int = setting(
        5, integer(0, 1000), "Rotated files kept (`PATH.1` the newest); the oldest beyond are "
        "deleted, so a file log holds at most (backups + 1) x max_bytes.")
    queue: int = setting(
        10_000, integer(1), "Records waiting for the writer thread at most; when it falls "
        "behind, further ones are dropped and counted (`resolver_querylog_dropped_total`), "
        "so answering never waits for the log.")


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = section(
        ServerConfig, "Where clients are served (the same addresses over UDP and TCP), who "
        "may ask, and the limits that protect the server.", _check_server)
    upstream: UpstreamConfig = section(
        UpstreamConfig, "Where queries that are neither blocked nor cached are forwarded, and "
        "what happens when upstream servers fail.", _check_upstream)
    blocking: BlockingConfig = section(
        BlockingConfig, "Which names are blocked, and what blocked answers carry.")
    cache: CacheConfig = section(
        CacheConfig, "Answers kept in memory, so repeated questions are not asked upstream "
        "again.", _check_cache)
    metrics: MetricsConfig = section(MetricsConfig, "The Prometheus endpoint.")
    query_log: QueryLogConfig = section(
        QueryLogConfig, "An optional log of answered queries, one JSON object a line "
        "(docs/querylog.md).")
    ratelimit: RateLimitConfig = section(
        RateLimitConfig, "Per-client rate limits on UDP, with RRL-style slip; off until "
        "`ratelimit.qps` is set.")
    source: str | None = None  # the config file as given, for reloads; None = defaults only


# --- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values from CLI flags; an empty tuple or None means the flag was not given.
    Given lists replace the config file's lists rather than extend them."""

    listen: tuple[str, ...] = ()
    upstreams: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    metrics: str | None = None  # an address, or 'off'
    query_log: str | None = None  # a path, or '-' for stdout
    user: str | None = None
    group: str | None = None


@dataclass(frozen=True, slots=True)
class Flag:
    """A CLI flag that replaces one key, validated like it; paths follow the working
    directory, as on any command line."""

    name: str
    given: str  # the Overrides field holding its value
    section: str
    key: str
    kind: Kind[object]


FLAGS = (
    Flag("--listen", "listen", "server", "listen", LISTEN),
    Flag("--upstream", "upstreams", "upstream", "servers", list_of("addresses", _UPSTREAM)),
    Flag("--rules", "rules", "blocking", "rules", list_of("paths", PATH)),
    Flag("--metrics", "metrics", "metrics", "listen", kind("an address, or off", _metrics_flag)),
    Flag("--query-log", "query_log", "query_log", "path", LOG_DESTINATION),
    Flag("--user", "user", "server", "user", text("a user name")),
    Flag("--group", "group", "server", "group", text("a group name")),
)


def load_config(
    path: str | None, overrides: Overrides = Overrides(), *, resolv_conf: str = RESOLV_CONF
) -> Config:
    """Read the file (None = all defaults), apply CLI overrides, fill upstreams from resolv.conf
    when none are configured. Raises ConfigError listing every problem found."""
    problems: list[str] = []
    config = Config()
    if path is not None:
        config = replace(_read_file(path, problems), source=path)
    config = _apply_overrides(config, overrides, problems)
    if problems:
        raise ConfigError(problems)
    if not config.upstream.servers:
        servers = system_upstreams(resolv_conf, config.server.listen)
        config = replace(config, upstream=replace(config.upstream, servers=servers))
    return config


def _read_file(path: str, problems: list[str]) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text"]) from None
    root, problem = compose(path, text)
    if problem is not None:
        raise ConfigError([problem])
    found = Problems(path)
    values = read_mapping(root, "", readers(Config, Path(path).parent), found)
    problems.extend(found.in_file_order())
    return Config(**values)


def _apply_overrides(config: Config, overrides: Overrides, problems: list[str]) -> Config:
    """Validate each given flag like its YAML key, prefixed '--flag:', and replace the value."""
    for flag in FLAGS:
        value = getattr(overrides, flag.given)
        if value is None or value == ():
            continue
        try:
            parsed = flag.kind.parser(Path.cwd())(value)
        except Invalid as error:
            problems.append(f"{flag.name}: {error}")
            continue
        section_value = replace(getattr(config, flag.section), **{flag.key: parsed})
        config = replace(config, **{flag.section: section_value})
    return config


# --- upstreams from resolv.conf --------------------------------------------------------------


def system_upstreams(
    resolv_conf: str = RESOLV_CONF, exclude: Sequence[Address] = ()
) -> tuple[UpstreamServer, ...]:
    """The nameservers of resolv.conf, minus any that would be this resolver itself.

    Forwarding to our own listen address would loop every query until the deadline, so a
    nameserver equal to a listen address on port 53 is dropped; a wildcard listen address
    (0.0.0.0, or :: which on Linux also accepts IPv4) stands for the loopback addresses.
    Other addresses of the host's interfaces are not detected. With nothing left, falls back
    to well-known public resolvers so the service still starts.
    """
    servers = [UpstreamServer(ip) for ip in _nameservers(resolv_conf) if not _is_own(ip, exclude)]
    return tuple(servers) or tuple(UpstreamServer(host) for host in FALLBACK_UPSTREAMS)


def _nameservers(resolv_conf: str) -> list[str]:
    try:
        lines = Path(resolv_conf).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(words[1])))
            except ValueError:
                continue  # the C resolver skips unparsable entries too
    return found


def _is_own(host: str, listen: Sequence[Address]) -> bool:
    ip = ipaddress.ip_address(host)
    for address in listen:
        if address.port != 53:
            continue
        if address.host == host:
            return True
        if address.host == "::" and ip.is_loopback:
            return True
        if address.host == "0.0.0.0" and ip.version == 4 and ip.is_loopback:
            return True
    return False
