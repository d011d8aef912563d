"""Configuration: one YAML file and a few CLI flags, parsed once into frozen dataclasses.

Each component receives only its own section, already typed and validated, so no other module
touches `yaml` or a raw dict. Every problem is reported at once as 'file:line: dotted.path: what
is wrong' (line numbers from the YAML node marks), because an operator fixing a broken file
should see all its mistakes in one run, not one per restart.
"""

import ipaddress
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from resolver.ops.errors import ConfigError
from resolver.ops.shipped import SHIPPED_RULES
from resolver.message.names import normalize
from resolver.message.constants import MAX_TTL
from resolver.upstream.selection import STRATEGIES
from resolver.ops.yamlnodes import NULL, compose, known_keys, line_of, problem_text

RESOLV_CONF = "/etc/resolv.conf"
FALLBACK_UPSTREAMS = ("9.9.9.9", "1.1.1.1")
TLS_PORT = 853  # RFC 7858
TLS_SCHEME = "tls://"
PROTOCOLS = ("udp", "tls")


@dataclass(frozen=True, slots=True)
class Address:
    """An IP literal and port to bind; hostnames are refused so startup never depends on DNS."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[Address, ...] = (Address("127.0.0.1", 1053),)
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 1000
    max_inflight: int = 10000  # forwarded queries in flight; beyond it, new ones are dropped


@dataclass(frozen=True, slots=True)
class UpstreamServer:
    host: str
    port: int = 53  # 853 when written without a port and protocol is tls
    protocol: str = "udp"  # "udp" (TCP when truncated) or "tls" (DNS over TLS, RFC 7858)
    tls_name: str | None = None  # the name the TLS certificate must carry; required for tls
    ca_file: str | None = None  # absolute path of the CA bundle to trust; None = the system's
    timeout: float | None = None  # per attempt; None = upstream.timeout


@dataclass(frozen=True, slots=True)
class ConditionalForward:
    """Names at or under `domains` go to `servers` only (never to the default servers)."""

    domains: tuple[str, ...]  # normalized names
    servers: tuple[UpstreamServer, ...]


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    servers: tuple[UpstreamServer, ...] = ()  # empty in the file = taken from resolv.conf
    timeout: float = 2.0  # per attempt
    deadline: float = 5.0  # whole query; then SERVFAIL
    udp_size: int = 1232  # EDNS payload size advertised upstream
    strategy: str = "failover"  # failover | random | fastest (see resolver.upstream.selection)
    unhealthy_after: int = 3  # consecutive failures before an upstream is backed off
    backoff: float = 1.0  # first backoff (seconds); doubles with each further failure
    max_backoff: float = 60.0
    tls_idle_timeout: float = 10.0  # close a DNS-over-TLS connection idle this long
    conditional: tuple[ConditionalForward, ...] = ()


@dataclass(frozen=True, slots=True)
class BlockingConfig:
    rules: tuple[str, ...] = (SHIPPED_RULES,)  # absolute paths of rule files or directories
    ttl: int = 300  # SOA minimum of blocked answers, and sinkhole record TTL
    soa_mname: str = "resolver.invalid"
    soa_rname: str = "hostmaster.resolver.invalid"
    ede: bool = True  # attach an Extended DNS Error (RFC 8914, code 15 'Blocked') to blocks


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = 100_000  # 0 disables the cache
    max_bytes: int = 128 * 1024 * 1024  # answer bytes plus a fixed overhead per entry
    min_ttl: int = 0
    max_ttl: int = 86400
    negative_ttl: int = 3600  # cap for NXDOMAIN/NODATA TTLs taken from the SOA
    servfail_ttl: int = 5  # failures cached (RFC 9520); also how long a failed refresh serves stale
    prefetch: bool = True  # refresh popular answers in the background before they expire
    prefetch_min_hits: int = 3  # hits an answer needs to be refreshed early
    prefetch_window: float = 0.1  # the last fraction of its TTL in which a hit refreshes it
    serve_stale: bool = True  # RFC 8767: answer with expired data when upstreams fail
    stale_window: int = 86400  # seconds past expiry an answer is kept for that
    stale_ttl: int = 30  # TTL of a stale answer
    stale_client_timeout: float = 1.8  # seconds a client waits for upstream before stale data
    packet_entries: int = 100_000  # whole UDP answers kept by query bytes; 0 disables


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Address | None = Address("127.0.0.1", 9153)  # None disables the HTTP endpoint


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    blocking: BlockingConfig = BlockingConfig()
    cache: CacheConfig = CacheConfig()
    metrics: MetricsConfig = MetricsConfig()
    source: str | None = None  # the config file as given, for reloads; None = defaults only


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values from CLI flags; an empty tuple or None means the flag was not given.
    Given lists replace the config file's lists rather than extend them."""

    listen: tuple[str, ...] = ()
    upstreams: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    metrics: str | None = None  # an address, or 'off'


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


def load_config(
    path: str | None, overrides: Overrides = Overrides(), *, resolv_conf: str = RESOLV_CONF
) -> Config:
    """Read the file (None = all defaults), apply CLI overrides, fill upstreams from resolv.conf
    when none are configured. Raises ConfigError listing every problem found."""
    problems: list[str] = []
    config = Config()
    if path is not None:
        config = Config(**_read_file(path, problems), source=path)
    config = _apply_overrides(config, overrides, problems)
    if problems:
        raise ConfigError(problems)
    if not config.upstream.servers:
        servers = system_upstreams(resolv_conf, config.server.listen)
        config = replace(config, upstream=replace(config.upstream, servers=servers))
    return config


def _read_file(path: str, problems: list[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text"]) from None
    root, problem = compose(path, text)
    if problem is not None:
        raise ConfigError([problem])
    report = _Report(path)
    sections = _read_mapping(root, "", _sections(Path(path).parent), report)
    problems.extend(report.problems())
    return sections


# --- value parsers: plain Python value in, typed value out, _Invalid on a bad value ----------


class _Invalid(ValueError):
    """A bad value; for a list, `elements` holds (index, message) of every bad element."""

    def __init__(self, message: str, elements: tuple[tuple[int, str], ...] = ()):
        super().__init__(message)
        self.elements = elements


Parse = Callable[[Any], Any]


MAX_SECONDS = 86400  # a day: longer than any wait here should be, and finite (.inf is YAML)


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid("expected a number")
    if not value > 0:  # NaN too
        raise _Invalid("expected seconds > 0")
    if value > MAX_SECONDS:
        raise _Invalid(f"expected at most {MAX_SECONDS} seconds (a day)")
    return float(value)


def _integer(low: int, high: int | None = None) -> Parse:
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(value: Any) -> int:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not is_int or value < low or (high is not None and value > high):
            raise _Invalid(f"expected {expected}")
        return value

    return parse


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("expected true or false")
    return value


def _name(value: Any) -> str:
    """A domain name for the synthetic SOA, normalized as names.to_wire expects it."""
    if not isinstance(value, str):
        raise _Invalid("expected a domain name")
    try:
        return normalize(value)
    except ValueError as error:
        raise _Invalid(str(error)) from None


def _list_of(what: str, item: Parse, *, if_empty: str | None = None) -> Parse:
    """A list of items; an element's error names its index. if_empty: the error for []."""

    def parse(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise _Invalid(f"expected a list of {what}")
        if not value and if_empty:
            raise _Invalid(if_empty)
        parsed, bad = [], []
        for index, element in enumerate(value):
            try:
                parsed.append(item(element))
            except _Invalid as error:  # every bad element is reported, not just the first
                bad.append((index, str(error)))
        if bad:
            raise _Invalid(bad[0][1], tuple(bad))
        return tuple(parsed)

    return parse


def _address(default_port: int, min_port: int) -> Parse:
    def parse(value: Any) -> Address:
        if not isinstance(value, str):
            raise _Invalid("expected an address such as '127.0.0.1:53' or '[::1]:53'")
        try:
            return parse_address(value, default_port, min_port=min_port)
        except ValueError as error:
            raise _Invalid(str(error)) from None

    return parse


_upstream_address = _address(53, 1)
_tls_address = _address(TLS_PORT, 1)


def _upstream(value: Any) -> UpstreamServer:
    """'HOST[:PORT]' over UDP, or 'tls://HOST[:PORT]#NAME' over TLS (port 853), NAME being
    the name on the server's certificate: the one form `--upstream` has for DNS over TLS."""
    if not (isinstance(value, str) and value.startswith(TLS_SCHEME)):
        address = _upstream_address(value)
        return UpstreamServer(address.host, address.port)
    text, _, name = value.removeprefix(TLS_SCHEME).partition("#")
    if not name:
        raise _Invalid(f"{value!r}: expected 'tls://HOST[:PORT]#NAME', NAME being the name "
                       f"on the server's certificate")
    address = _tls_address(text)
    return UpstreamServer(address.host, address.port, "tls", _name(name))


def _choice(*choices: str) -> Parse:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Invalid(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _text(what: str) -> Parse:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(f"expected {what}")
        return value

    return parse


def _ca_file(base: Path) -> Parse:
    """A CA bundle, loaded here so that a wrong path or a file without certificates is a
    config error with its line rather than a failure at the first query."""
    resolve = _path(base)

    def parse(value: Any) -> str:
        path = resolve(value)
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as error:  # before OSError, which it is too
            raise _Invalid(f"{value!r} holds no usable PEM certificate ({error.reason})")
        except OSError as error:
            raise _Invalid(f"cannot read {value!r}: {error.strerror}") from None
        return path

    return parse


def _optional(parse: Parse) -> Parse:
    return lambda value: None if value is None else parse(value)


def _path(base: Path) -> Parse:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise _Invalid("expected a path")
        return str((base / value).resolve())

    return parse


_listen = _list_of("addresses", _address(53, 0), if_empty="expected at least one address")
_upstreams = _list_of("addresses", _upstream)


_metrics_address = _address(9153, 0)


def _metrics_listen(value: Any) -> Address:
    if value is False:  # YAML reads a bare off or no as false
        raise _Invalid("expected an address, or null to turn the endpoint off")
    return _metrics_address(value)


def _metrics_flag(value: str) -> Address | None:
    return None if value == "off" else _metrics_address(value)


# --- reading the YAML node tree --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Report:
    """Problems found in one file, kept with their line so they can be listed in file order."""

    file: str
    found: list[tuple[int, str]] = field(default_factory=list)

    def add(self, node: yaml.Node, path: str, message: str) -> None:
        line = line_of(node)
        self.found.append((line, problem_text(f"{self.file}:{line}", path, message)))

    def problems(self) -> list[str]:
        return [problem for _, problem in sorted(self.found, key=lambda found: found[0])]


_MISSING = object()
ReadNode = Callable[[yaml.Node, str, _Report], Any]  # returns _MISSING after reporting


def _read_mapping(
    node: yaml.Node | None, path: str, readers: dict[str, ReadNode], report: _Report
) -> dict[str, Any]:
    """Read a mapping with known keys; unknown and duplicate keys are reported, bad values are
    left out so the dataclass default stands in while the remaining keys are still checked."""
    if node is None or node.tag == NULL:
        return {}
    if not isinstance(node, yaml.MappingNode):
        report.add(node, path, "expected a mapping")
        return {}
    values = {
        key: readers[key](value_node, key_path, report)
        for key, key_path, value_node in known_keys(node, path, readers, report.add)
    }
    return {key: value for key, value in values.items() if value is not _MISSING}


def _field(parse: Parse) -> ReadNode:
    def read(node: yaml.Node, path: str, report: _Report) -> Any:
        try:
            return parse(_construct(node))
        except _Invalid as error:
            for index, message in error.elements:
                report.add(node.value[index], f"{path}[{index}]", message)
            if not error.elements:
                report.add(node, path, str(error))
            return _MISSING

    return read


def _construct(node: yaml.Node) -> Any:
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except yaml.YAMLError as error:
        raise _Invalid(str(getattr(error, "problem", error))) from None


Check = Callable[[Any], Iterable[tuple[str, str]]]  # yields (field, message)


def _section(cls: type, parsers: dict[str, Parse], check: Check = lambda _: (),
             nested: dict[str, ReadNode] | None = None) -> ReadNode:
    """A section of plain values (parsers) and of nested structures read node by node, so
    their problems carry their own line and dotted path (nested)."""
    readers = {key: _field(parse) for key, parse in parsers.items()} | (nested or {})

    def read(node: yaml.Node, path: str, report: _Report) -> Any:
        problems = len(report.found)
        section = cls(**_read_mapping(node, path, readers, report))
        if len(report.found) == problems:  # no cross-check against a default for a bad value
            for key, message in check(section):
                report.add(_value_node(node, key), f"{path}.{key}", message)
        return section

    return read


def _value_node(node: yaml.Node, key: str) -> yaml.Node:
    """The node holding key's value, for a line number; the section itself if key is absent."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == key:
                return value_node
    return node


def _check_upstream(section: UpstreamConfig) -> Iterable[tuple[str, str]]:
    if section.deadline < section.timeout:
        yield "deadline", f"expected seconds >= upstream.timeout ({section.timeout:g})"
    if section.max_backoff < section.backoff:
        yield "max_backoff", f"expected seconds >= upstream.backoff ({section.backoff:g})"


def _has(node: yaml.MappingNode, key: str) -> bool:
    return any(key_node.value == key for key_node, _ in node.value)


def _server(base: Path) -> ReadNode:
    """One upstream: an address string (see _upstream), or a mapping with per-server keys.
    The default port depends on the protocol, so the address is parsed after the rest."""
    readers = {
        "address": _field(_text("an address such as '192.0.2.1' or '[2001:db8::1]:853'")),
        "protocol": _field(_choice(*PROTOCOLS)),
        "tls_name": _field(_name),
        "ca_file": _field(_ca_file(base)),
        "timeout": _field(_seconds),
    }
    string = _field(_upstream)

    def read(node: yaml.Node, path: str, report: _Report) -> Any:
        if not isinstance(node, yaml.MappingNode):
            return string(node, path, report)
        values = _read_mapping(node, path, readers, report)
        if not _has(node, "address"):
            report.add(node, f"{path}.address", "required")
        if "address" not in values:
            return _MISSING
        if _has(node, "protocol") and "protocol" not in values:
            return _MISSING  # reported; tls_name and ca_file depend on what it should be
        tls = values.get("protocol") == "tls"
        if tls and not _has(node, "tls_name"):
            # Addresses are IP literals, so there is no host name to check the certificate by.
            report.add(node, f"{path}.tls_name", "required with tls for an IP address")
        for key in ("tls_name", "ca_file"):
            if not tls and _has(node, key):
                report.add(_value_node(node, key), f"{path}.{key}", "only with protocol tls")
        try:
            address = parse_address(values.pop("address"), TLS_PORT if tls else 53)
        except ValueError as error:
            report.add(_value_node(node, "address"), f"{path}.address", str(error))
            return _MISSING
        return UpstreamServer(address.host, address.port, **values)

    return read


def _servers(base: Path, *, required: bool) -> ReadNode:
    """A list of upstreams; required: at least one (a conditional group has no fallback)."""
    server = _server(base)

    def read(node: yaml.Node, path: str, report: _Report) -> Any:
        if node.tag == NULL and not required:  # `servers:` left empty, as `servers: []`
            return ()
        if not isinstance(node, yaml.SequenceNode):
            report.add(node, path, "expected a list of servers")
            return _MISSING
        if required and not node.value:
            report.add(node, path, "expected at least one server")
            return _MISSING
        servers = [server(item, f"{path}[{index}]", report)
                   for index, item in enumerate(node.value)]
        return _MISSING if _MISSING in servers else tuple(servers)

    return read


def _conditional(base: Path) -> ReadNode:
    """Conditional forwarding groups. A domain in two groups is an error: which group wins
    would otherwise depend on the order of the file."""
    readers = {
        "domains": _field(_list_of("domain names", _name,
                                   if_empty="expected at least one domain")),
        "servers": _servers(base, required=True),
    }

    def read(node: yaml.Node, path: str, report: _Report) -> Any:
        if not isinstance(node, yaml.SequenceNode):
            report.add(node, path, "expected a list of {domains, servers} mappings")
            return _MISSING
        groups, seen = [], {}
        for index, item in enumerate(node.value):
            where = f"{path}[{index}]"
            if not isinstance(item, yaml.MappingNode):
                report.add(item, where, "expected a mapping with domains and servers")
                continue
            values = _read_mapping(item, where, readers, report)
            for key in readers:
                if not _has(item, key):
                    report.add(item, f"{where}.{key}", "required")
            for position, domain in enumerate(values.get("domains", ())):
                if domain in seen:
                    report.add(_value_node(item, "domains").value[position],
                               f"{where}.domains[{position}]",
                               f"{domain!r} is already in {seen[domain]}")
                seen.setdefault(domain, where)
            if len(values) == len(readers):
                groups.append(ConditionalForward(values["domains"], values["servers"]))
        return tuple(groups)

    return read


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise _Invalid("expected a fraction from 0 up to (not including) 1")
    return float(value)


def _check_cache(section: CacheConfig) -> Iterable[tuple[str, str]]:
    if section.min_ttl > section.max_ttl:
        yield "min_ttl", f"expected at most cache.max_ttl ({section.max_ttl})"


def _sections(base: Path) -> dict[str, ReadNode]:
    """The file's schema; base is the config file's directory, for relative rule paths."""
    return {
        "server": _section(ServerConfig, {
            "listen": _listen,
            "tcp_idle_timeout": _seconds,
            "tcp_max_connections": _integer(1),
            "max_inflight": _integer(1, 65535),  # a DoT connection's IDs must not run out
        }),
        "upstream": _section(UpstreamConfig, {
            "timeout": _seconds,
            "deadline": _seconds,
            "udp_size": _integer(512, 65535),
            "strategy": _choice(*STRATEGIES),
            "unhealthy_after": _integer(1),
            "backoff": _seconds,
            "max_backoff": _seconds,
            "tls_idle_timeout": _seconds,
        }, _check_upstream, {
            "servers": _servers(base, required=False),
            "conditional": _conditional(base),
        }),
        "blocking": _section(BlockingConfig, {
            "rules": _list_of("paths", _path(base)),
            "ttl": _integer(0, MAX_TTL),
            "soa_mname": _name,
            "soa_rname": _name,
            "ede": _boolean,
        }),
        "cache": _section(CacheConfig, {
            "max_entries": _integer(0),
            "min_ttl": _integer(0, MAX_TTL),
            "max_ttl": _integer(0, MAX_TTL),
            "negative_ttl": _integer(0, MAX_TTL),
            "servfail_ttl": _integer(0, MAX_TTL),
            "max_bytes": _integer(0),
            "prefetch": _boolean,
            "prefetch_min_hits": _integer(1),
            "prefetch_window": _fraction,
            "serve_stale": _boolean,
            "stale_window": _integer(0),
            "stale_ttl": _integer(1, MAX_TTL),
            "stale_client_timeout": _seconds,
            "packet_entries": _integer(0),
        }, _check_cache),
        "metrics": _section(MetricsConfig, {"listen": _optional(_metrics_listen)}),
    }


# --- CLI overrides ---------------------------------------------------------------------------


def _apply_overrides(config: Config, overrides: Overrides, problems: list[str]) -> Config:
    """Validate each given flag like its YAML key, prefixed '--flag:', and replace the value."""
    flags = (
        ("--listen", overrides.listen, "server", "listen", _listen),
        ("--upstream", overrides.upstreams, "upstream", "servers", _upstreams),
        ("--rules", overrides.rules, "blocking", "rules", _list_of("paths", _path(Path.cwd()))),
        ("--metrics", overrides.metrics, "metrics", "listen", _metrics_flag),
    )
    for flag, value, section, key, parse in flags:
        if value is None or value == ():
            continue
        try:
            parsed = parse(value)
        except _Invalid as error:
            problems.append(f"{flag}: {error}")
            continue
        config = replace(config, **{section: replace(getattr(config, section), **{key: parsed})})
    return config
