"""Config loading: every error message exactly, defaults, overrides, addresses, resolv.conf."""

from dataclasses import replace
from pathlib import Path

import pytest

from resolver.ops.config import (
    Address,
    BlockingConfig,
    CacheConfig,
    ConditionalForward,
    Config,
    MetricsConfig,
    Overrides,
    RateLimitConfig,
    ServerConfig,
    UpstreamConfig,
    UpstreamServer,
    load_config,
    parse_address,
    system_upstreams,
)
from resolver.ops.errors import ConfigError
from tests.tls import make_tls_files

REPO = Path(__file__).resolve().parent.parent
NO_RESOLV_CONF = "/nonexistent/resolv.conf"
FALLBACK = (UpstreamServer("9.9.9.9"), UpstreamServer("1.1.1.1"))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Work in an empty directory so error messages carry the short name 'c.yaml'."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load_text(text: str, overrides: Overrides = Overrides()) -> Config:
    Path("c.yaml").write_text(text, encoding="utf-8")
    return load_config("c.yaml", overrides, resolv_conf=NO_RESOLV_CONF)


def problems_of(text: str, overrides: Overrides = Overrides()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_text(text, overrides)
    return caught.value.problems


# --- file errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    # structure
    ("- server\n", "c.yaml:1: expected a mapping"),
    ("bogus: 1\n", "c.yaml:1: bogus: unknown key"),
    ("server:\n  lisen: []\n", "c.yaml:2: server.lisen: unknown key"),
    ("server: 3\n", "c.yaml:1: server: expected a mapping"),
    ("cache: [1]\n", "c.yaml:1: cache: expected a mapping"),
    ("server: {}\nserver: {}\n", "c.yaml:2: server: duplicate key"),
    ("cache:\n  min_ttl: 1\n  min_ttl: 2\n", "c.yaml:3: cache.min_ttl: duplicate key"),
    # YAML syntax
    ("server: [\n", "c.yaml:2: YAML syntax error: while parsing a flow node, "
                    "expected the node content, but found '<stream end>'"),
    ("a: 1\n---\nb: 2\n", "c.yaml:2: YAML syntax error: expected a single document in the "
                          "stream, but found another document"),
    ("\tserver: {}\n", "c.yaml:1: YAML syntax error: while scanning for the next token, "
                       "found character '\\t' that cannot start any token"),
    ("server: *x\n", "c.yaml:1: YAML syntax error: found undefined alias 'x'"),
    ("upstream:\n  timeout: !seconds 3\n",
     "c.yaml:2: upstream.timeout: could not determine a constructor for the tag '!seconds'"),
    # server
    ("server:\n  listen: 127.0.0.1\n", "c.yaml:2: server.listen: expected a list of addresses"),
    ("server:\n  listen: []\n", "c.yaml:2: server.listen: expected at least one address"),
    ("server:\n  listen:\n    - 127.0.0.1\n    - localhost:53\n",
     "c.yaml:4: server.listen[1]: 'localhost:53' is not an IP address "
     "(hostnames are not accepted here)"),
    ("server:\n  listen: [53]\n", "c.yaml:2: server.listen[0]: expected an address such as "
                                  "'127.0.0.1:53' or '[::1]:53'"),
    ("server:\n  listen: ['127.0.0.1:65536']\n",
     "c.yaml:2: server.listen[0]: '127.0.0.1:65536': port must be a number from 0 to 65535"),
    ("server:\n  listen: ['[127.0.0.1]:53']\n",
     "c.yaml:2: server.listen[0]: '[127.0.0.1]:53': brackets are only for IPv6 addresses, "
     "as '[::1]:53'"),
    ("server:\n  tcp_idle_timeout: soon\n", "c.yaml:2: server.tcp_idle_timeout: expected a number"),
    ("server:\n  tcp_idle_timeout:\n", "c.yaml:2: server.tcp_idle_timeout: expected a number"),
    ("server:\n  tcp_idle_timeout: true\n",
     "c.yaml:2: server.tcp_idle_timeout: expected a number"),
    ("server:\n  tcp_idle_timeout: 0\n",
     "c.yaml:2: server.tcp_idle_timeout: expected seconds > 0"),
    ("server:\n  tcp_max_connections: 0\n",
     "c.yaml:2: server.tcp_max_connections: expected an integer >= 1"),
    ("server:\n  tcp_max_connections: 1.5\n",
     "c.yaml:2: server.tcp_max_connections: expected an integer >= 1"),
    ("server:\n  max_inflight: '10'\n",
     "c.yaml:2: server.max_inflight: expected an integer from 1 to 65535"),
    # upstream
    ("upstream:\n  servers: 192.0.2.1\n",
     "c.yaml:2: upstream.servers: expected a list of servers"),
    ("upstream:\n  servers: [dns.example.org]\n",
     "c.yaml:2: upstream.servers[0]: 'dns.example.org' is not an IP address "
     "(hostnames are not accepted here)"),
    ("upstream:\n  servers: ['192.0.2.1:0']\n",
     "c.yaml:2: upstream.servers[0]: '192.0.2.1:0': port must be a number from 1 to 65535"),
    ("upstream:\n  timeout: -1\n", "c.yaml:2: upstream.timeout: expected seconds > 0"),
    ("upstream:\n  timeout: .nan\n", "c.yaml:2: upstream.timeout: expected seconds > 0"),
    ("server:\n  max_inflight: 65536\n",
     "c.yaml:2: server.max_inflight: expected an integer from 1 to 65535"),
    ("blocking:\n  watch_interval: 0.01\n",  # each look stats every file: no busy loop
     "c.yaml:2: blocking.watch_interval: expected seconds >= 0.1, or 0 to turn watching off"),
    ("upstream:\n  deadline: .inf\n",  # a query must end: never a hang
     "c.yaml:2: upstream.deadline: expected at most 86400 seconds (a day)"),
    ("upstream:\n  timeout: 1.0e+300\n",
     "c.yaml:2: upstream.timeout: expected at most 86400 seconds (a day)"),
    ("upstream:\n  deadline: 1\n",
     "c.yaml:2: upstream.deadline: expected seconds >= upstream.timeout (2)"),
    ("upstream:\n  udp_size: 511\n",
     "c.yaml:2: upstream.udp_size: expected an integer from 512 to 65535"),
    ("upstream:\n  udp_size: 65536\n",
     "c.yaml:2: upstream.udp_size: expected an integer from 512 to 65535"),
    # blocking
    ("blocking:\n  rules: x.yaml\n", "c.yaml:2: blocking.rules: expected a list of paths"),
    ("blocking:\n  rules:\n    - a.yaml\n    - ''\n",
     "c.yaml:4: blocking.rules[1]: expected a path"),
    ("blocking:\n  ttl: -1\n", "c.yaml:2: blocking.ttl: expected an integer from 0 to 2147483647"),
    ("blocking:\n  soa_mname: bad..example.org\n",
     "c.yaml:2: blocking.soa_mname: 'bad..example.org' is not a valid name: empty label"),
    ("blocking:\n  soa_rname: 'a b.example.org'\n",
     "c.yaml:2: blocking.soa_rname: 'a b.example.org' is not a valid name: bad character ' '"),
    ("blocking:\n  soa_rname: 7\n", "c.yaml:2: blocking.soa_rname: expected a domain name"),
    ("blocking:\n  ede: sometimes\n", "c.yaml:2: blocking.ede: expected true or false"),
    ("server:\n  [a, b]: 1\n", "c.yaml:2: server: expected a string key, got a list"),
    ("server:\n  300: 2\n", "c.yaml:2: server: expected a string key, got a number (300)"),
    # cache
    ("cache:\n  max_entries: -1\n", "c.yaml:2: cache.max_entries: expected an integer >= 0"),
    ("cache:\n  negative_ttl: 1h\n",
     "c.yaml:2: cache.negative_ttl: expected an integer from 0 to 2147483647"),
    # TTLs go into answers as 32-bit fields; RFC 2181 caps them at 2^31 - 1.
    ("blocking:\n  ttl: 5000000000\n",
     "c.yaml:2: blocking.ttl: expected an integer from 0 to 2147483647"),
    ("cache:\n  stale_ttl: 2147483648\n",
     "c.yaml:2: cache.stale_ttl: expected an integer from 1 to 2147483647"),
    # one mistake, one message: no cross-check against the default standing in for it
    ("upstream:\n  timeout: 10\n  deadline: soon\n",
     "c.yaml:3: upstream.deadline: expected a number"),
    ("cache:\n  servfail_ttl: -5\n",
     "c.yaml:2: cache.servfail_ttl: expected an integer from 0 to 2147483647"),
    ("cache:\n  max_ttl: 10\n  min_ttl: 60\n",
     "c.yaml:3: cache.min_ttl: expected at most cache.max_ttl (10)"),
    ("cache:\n  max_bytes: 64M\n", "c.yaml:2: cache.max_bytes: expected an integer >= 0"),
    ("cache:\n  prefetch: yes please\n", "c.yaml:2: cache.prefetch: expected true or false"),
    ("cache:\n  prefetch_min_hits: 0\n",
     "c.yaml:2: cache.prefetch_min_hits: expected an integer >= 1"),
    ("cache:\n  prefetch_window: 1\n",
     "c.yaml:2: cache.prefetch_window: expected a fraction from 0 up to (not including) 1"),
    ("cache:\n  prefetch_window: -0.1\n",
     "c.yaml:2: cache.prefetch_window: expected a fraction from 0 up to (not including) 1"),
    ("cache:\n  prefetch_window: 10%\n",
     "c.yaml:2: cache.prefetch_window: expected a fraction from 0 up to (not including) 1"),
    ("cache:\n  serve_stale: 1\n", "c.yaml:2: cache.serve_stale: expected true or false"),
    ("cache:\n  stale_window: 1.5\n", "c.yaml:2: cache.stale_window: expected an integer >= 0"),
    ("cache:\n  stale_ttl: 0\n",
     "c.yaml:2: cache.stale_ttl: expected an integer from 1 to 2147483647"),
    ("cache:\n  stale_client_timeout: 0\n",
     "c.yaml:2: cache.stale_client_timeout: expected seconds > 0"),
    ("cache:\n  stale_ttl: 30\n  stale: true\n", "c.yaml:3: cache.stale: unknown key"),
    # metrics
    ("metrics:\n  listen: 9153\n", "c.yaml:2: metrics.listen: expected an address such as "
                                   "'127.0.0.1:53' or '[::1]:53'"),
    ("metrics:\n  listen: off\n",
     "c.yaml:2: metrics.listen: expected an address, or null to turn the endpoint off"),
    ("metrics:\n  listen: 'localhost:9153'\n", "c.yaml:2: metrics.listen: 'localhost:9153' "
                                               "is not an IP address (hostnames are not "
                                               "accepted here)"),
])
def test_file_error(in_tmp, text, problem):
    assert problems_of(text) == [problem]


def test_every_bad_list_element_is_reported(in_tmp):
    text = 'server:\n  listen: ["127.0.0.1:99999", "127.0.0.1:53", "[::1]:x"]\n'
    assert problems_of(text) == [
        "c.yaml:2: server.listen[0]: '127.0.0.1:99999': port must be a number from 0 to 65535",
        "c.yaml:2: server.listen[2]: '[::1]:x': port must be a number from 0 to 65535",
    ]


def test_deep_nesting_is_a_syntax_error_not_a_crash(in_tmp):
    text = "server:\n  listen: " + "[" * 5000 + "]" * 5000 + "\n"
    assert problems_of(text) == ["c.yaml: YAML syntax error: nested too deeply"]


def test_all_problems_reported_in_file_order(in_tmp):
    text = (
        "upstream:\n"
        "  deadline: 1\n"
        "  timeout: 3\n"
        "server:\n"
        "  tcp_idle_timeout: 0\n"
        "  lisen: []\n"
        "bogus: 1\n"
    )
    assert problems_of(text) == [
        "c.yaml:2: upstream.deadline: expected seconds >= upstream.timeout (3)",
        "c.yaml:5: server.tcp_idle_timeout: expected seconds > 0",
        "c.yaml:6: server.lisen: unknown key",
        "c.yaml:7: bogus: unknown key",
    ]


def test_file_and_override_problems_together(in_tmp):
    assert problems_of("cache:\n  max_entries: -1\n", Overrides(listen=("localhost",))) == [
        "c.yaml:2: cache.max_entries: expected an integer >= 0",
        "--listen: 'localhost' is not an IP address (hostnames are not accepted here)",
    ]


@pytest.mark.parametrize("make, problem", [
    (lambda d: None, "missing.yaml: cannot read: No such file or directory"),
    (lambda d: (d / "missing.yaml").mkdir(), "missing.yaml: cannot read: Is a directory"),
    (lambda d: (d / "missing.yaml").write_bytes(b"server: {}\n\xff\n"),
     "missing.yaml: cannot read: not UTF-8 text"),
    (lambda d: (d / "missing.yaml").write_bytes(b"a: \x01\n"),
     "missing.yaml: YAML syntax error: unacceptable character #x0001: special characters are "
     "not allowed"),
])
def test_unreadable_file(in_tmp, make, problem):
    make(in_tmp)
    with pytest.raises(ConfigError) as caught:
        load_config("missing.yaml", resolv_conf=NO_RESOLV_CONF)
    assert caught.value.problems == [problem]


# --- defaults and values -------------------------------------------------------------------


def test_defaults():
    config = load_config(None, resolv_conf=NO_RESOLV_CONF)
    assert config == Config(
        server=ServerConfig(
            listen=(Address("127.0.0.1", 1053),),
            tcp_idle_timeout=10.0,
            tcp_max_connections=1000,
            max_inflight=10000,
        ),
        upstream=UpstreamConfig(servers=FALLBACK, timeout=2.0, deadline=5.0, udp_size=1232),
        blocking=BlockingConfig(
            rules=(str(REPO / "rules" / "exchanges.yaml"),),
            ttl=300,
            soa_mname="resolver.invalid",
            soa_rname="hostmaster.resolver.invalid",
            ede=True,
        ),
        cache=CacheConfig(
            max_entries=100_000, max_bytes=128 * 1024 * 1024, min_ttl=0, max_ttl=86400,
            negative_ttl=3600, servfail_ttl=5, prefetch=True, prefetch_min_hits=3,
            prefetch_window=0.1, serve_stale=True, stale_window=86400, stale_ttl=30,
            stale_client_timeout=1.8, packet_entries=100_000,
        ),
        metrics=MetricsConfig(listen=Address("127.0.0.1", 9153)),
        source=None,
    )


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "---\n", "server:\ncache: ~\n",
                                  "upstream:\n  servers:\n", "upstream:\n  servers: []\n"])
def test_empty_file_or_sections_mean_defaults(in_tmp, text):
    assert load_text(text) == replace(load_config(None, resolv_conf=NO_RESOLV_CONF),
                                      source="c.yaml")


@pytest.mark.parametrize("text, section, expected", [
    ("server:\n  listen: ['0.0.0.0:53', '[::]:53', '::1', '127.0.0.1']\n", "server",
     ServerConfig(listen=(Address("0.0.0.0", 53), Address("::", 53), Address("::1", 53),
                          Address("127.0.0.1", 53)))),
    ("server:\n  listen: ['127.0.0.1:0']\n  tcp_idle_timeout: 1\n  max_inflight: 5\n", "server",
     ServerConfig(listen=(Address("127.0.0.1", 0),), tcp_idle_timeout=1.0, max_inflight=5)),
    ("upstream:\n  servers: [192.0.2.1, '192.0.2.2:5353', '[2001:db8::1]:53']\n"
     "  timeout: 0.5\n  deadline: 0.5\n  udp_size: 4096\n", "upstream",
     UpstreamConfig(servers=(UpstreamServer("192.0.2.1"), UpstreamServer("192.0.2.2", 5353),
                             UpstreamServer("2001:db8::1")),
                    timeout=0.5, deadline=0.5, udp_size=4096)),
    ("blocking:\n  rules: []\n  ttl: 0\n  soa_mname: NS.Example.ORG.\n  ede: false\n",
     "blocking", BlockingConfig(rules=(), ttl=0, soa_mname="ns.example.org", ede=False)),
    ("cache:\n  max_entries: 0\n  min_ttl: 30\n  max_ttl: 30\n", "cache",
     CacheConfig(max_entries=0, min_ttl=30, max_ttl=30)),
    ("cache:\n  max_bytes: 1048576\n  servfail_ttl: 0\n  prefetch: false\n"
     "  prefetch_min_hits: 1\n  prefetch_window: 0\n  serve_stale: false\n"
     "  stale_window: 0\n  stale_ttl: 1\n  stale_client_timeout: 0.25\n", "cache",
     CacheConfig(max_bytes=1048576, servfail_ttl=0, prefetch=False, prefetch_min_hits=1,
                 prefetch_window=0.0, serve_stale=False, stale_window=0, stale_ttl=1,
                 stale_client_timeout=0.25)),
    ("cache:\n  prefetch_window: 0.25\n", "cache", CacheConfig(prefetch_window=0.25)),
    ("metrics:\n  listen: null\n", "metrics", MetricsConfig(listen=None)),
    ("metrics:\n  listen: '[::1]'\n", "metrics", MetricsConfig(listen=Address("::1", 9153))),
])
def test_values(in_tmp, text, section, expected):
    assert getattr(load_text(text), section) == expected


def test_relative_rule_paths_follow_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "c.yaml").write_text(
        "blocking:\n  rules: [rules.d, ../shared/x.yaml, /srv/y.txt]\n", encoding="utf-8"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the working directory must not matter
    config = load_config("../etc/c.yaml", resolv_conf=NO_RESOLV_CONF)
    assert config.blocking.rules == (
        str(tmp_path / "etc" / "rules.d"),
        str(tmp_path / "shared" / "x.yaml"),
        "/srv/y.txt",
    )
    assert config.source == "../etc/c.yaml"


# --- CLI overrides -------------------------------------------------------------------------

CONFIG_WITH_LISTS = """\
server:
  listen: ['127.0.0.1:5300', '[::1]:5300']
upstream:
  servers: [192.0.2.1, 192.0.2.2]
blocking:
  rules: [a.yaml, b.yaml]
metrics:
  listen: '127.0.0.1:9999'
"""


@pytest.mark.parametrize("overrides, section, field, expected", [
    (Overrides(listen=("127.0.0.1:0",)), "server", "listen", (Address("127.0.0.1", 0),)),
    (Overrides(listen=("::1", "0.0.0.0")), "server", "listen",
     (Address("::1", 53), Address("0.0.0.0", 53))),
    (Overrides(upstreams=("[2001:db8::53]:5353",)), "upstream", "servers",
     (UpstreamServer("2001:db8::53", 5353),)),
    (Overrides(rules=("mine.yaml",)), "blocking", "rules", "CWD/mine.yaml"),
    (Overrides(metrics="127.0.0.1"), "metrics", "listen", Address("127.0.0.1", 9153)),
    (Overrides(metrics="off"), "metrics", "listen", None),
    (Overrides(), "server", "listen", (Address("127.0.0.1", 5300), Address("::1", 5300))),
])
def test_overrides_replace_the_file_values(in_tmp, overrides, section, field, expected):
    if expected == "CWD/mine.yaml":
        expected = (str(in_tmp / "mine.yaml"),)
    config = load_text(CONFIG_WITH_LISTS, overrides)
    assert getattr(getattr(config, section), field) == expected


def test_overrides_without_a_file():
    config = load_config(None, Overrides(listen=("127.0.0.1:0",), upstreams=("127.0.0.1:5353",)),
                         resolv_conf=NO_RESOLV_CONF)
    assert config.server.listen == (Address("127.0.0.1", 0),)
    assert config.upstream.servers == (UpstreamServer("127.0.0.1", 5353),)


@pytest.mark.parametrize("overrides, problem", [
    (Overrides(listen=("127.0.0.1:x",)), "--listen: '127.0.0.1:x': port must be a number from "
                                          "0 to 65535"),
    (Overrides(listen=("127.0.0.1", "localhost")),
     "--listen: 'localhost' is not an IP address (hostnames are not accepted here)"),
    (Overrides(upstreams=("192.0.2.1:0",)),
     "--upstream: '192.0.2.1:0': port must be a number from 1 to 65535"),
    (Overrides(upstreams=("dns.example.org",)),
     "--upstream: 'dns.example.org' is not an IP address (hostnames are not accepted here)"),
    (Overrides(rules=("",)), "--rules: expected a path"),
    (Overrides(metrics="metrics.test:9153"),
     "--metrics: 'metrics.test:9153' is not an IP address (hostnames are not accepted here)"),
])
def test_override_errors(overrides, problem):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides, resolv_conf=NO_RESOLV_CONF)
    assert caught.value.problems == [problem]


# --- addresses -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", Address("127.0.0.1", 53)),
    ("192.0.2.1:5353", Address("192.0.2.1", 5353)),
    (" 192.0.2.1:53 ", Address("192.0.2.1", 53)),
    ("::1", Address("::1", 53)),
    ("2001:db8::1", Address("2001:db8::1", 53)),
    ("2001:DB8:0:0::1", Address("2001:db8::1", 53)),  # normalised, so comparisons work
    ("[::1]", Address("::1", 53)),
    ("[::1]:1053", Address("::1", 1053)),
    ("[2001:db8::1]:65535", Address("2001:db8::1", 65535)),
    ("::1:53", Address("::1:53", 53)),  # a bare v6 address never carries a port
])
def test_parse_address(text, expected):
    assert parse_address(text, 53) == expected


@pytest.mark.parametrize("text, message", [
    ("", "expected an address, got an empty string"),
    ("localhost", "'localhost' is not an IP address (hostnames are not accepted here)"),
    ("dns.example.org:53", "'dns.example.org:53' is not an IP address "
                           "(hostnames are not accepted here)"),
    ("256.0.0.1", "'256.0.0.1' is not an IP address (hostnames are not accepted here)"),
    ("192.0.2.1:", "'192.0.2.1:': port must be a number from 1 to 65535"),
    ("192.0.2.1:0", "'192.0.2.1:0': port must be a number from 1 to 65535"),
    ("192.0.2.1:65536", "'192.0.2.1:65536': port must be a number from 1 to 65535"),
    ("192.0.2.1:-1", "'192.0.2.1:-1': port must be a number from 1 to 65535"),
    ("[::1]53", "'[::1]53': port must be a number from 1 to 65535"),
    ("[::1", "'[::1': brackets are only for IPv6 addresses, as '[::1]:53'"),
    ("[192.0.2.1]:53", "'[192.0.2.1]:53': brackets are only for IPv6 addresses, as '[::1]:53'"),
    ("[localhost]:53", "'[localhost]:53': brackets are only for IPv6 addresses, as '[::1]:53'"),
])
def test_parse_address_errors(text, message):
    with pytest.raises(ValueError) as caught:
        parse_address(text, 53)
    assert str(caught.value) == message


def test_parse_address_port_zero_only_when_allowed():
    assert parse_address("127.0.0.1:0", 53, min_port=0) == Address("127.0.0.1", 0)
    with pytest.raises(ValueError):
        parse_address("127.0.0.1:0", 53)


# --- upstreams from resolv.conf ------------------------------------------------------------

RESOLV_CONF = """\
# generated by something
; old-style comment
search example.org
nameserver 127.0.0.1
nameserver   192.0.2.53   # inline comment
nameserver 127.0.0.53
nameserver 2001:db8::53
nameserver not-an-address
options edns0 trust-ad
#nameserver 192.0.2.99
"""


@pytest.mark.parametrize("text, listen, expected", [
    (RESOLV_CONF, (), ("127.0.0.1", "192.0.2.53", "127.0.0.53", "2001:db8::53")),
    (RESOLV_CONF, (Address("127.0.0.1", 53),), ("192.0.2.53", "127.0.0.53", "2001:db8::53")),
    (RESOLV_CONF, (Address("127.0.0.1", 1053),),  # another port: no loop
     ("127.0.0.1", "192.0.2.53", "127.0.0.53", "2001:db8::53")),
    (RESOLV_CONF, (Address("0.0.0.0", 53),), ("192.0.2.53", "2001:db8::53")),
    (RESOLV_CONF, (Address("::", 53),), ("192.0.2.53", "2001:db8::53")),
    ("nameserver ::1\nnameserver 192.0.2.53\n", (Address("0.0.0.0", 53),), ("::1", "192.0.2.53")),
    ("nameserver ::1\nnameserver 192.0.2.53\n", (Address("::", 53),), ("192.0.2.53",)),
    ("nameserver 2001:db8::53\n", (Address("2001:db8::53", 53),), ("9.9.9.9", "1.1.1.1")),
    ("nameserver 127.0.0.1\n", (Address("127.0.0.1", 53),), ("9.9.9.9", "1.1.1.1")),
    ("", (), ("9.9.9.9", "1.1.1.1")),
    ("# nothing\nsearch example.org\n", (), ("9.9.9.9", "1.1.1.1")),
])
def test_system_upstreams(tmp_path, text, listen, expected):
    path = tmp_path / "resolv.conf"
    path.write_text(text, encoding="utf-8")
    assert system_upstreams(str(path), listen) == tuple(UpstreamServer(h) for h in expected)


def test_system_upstreams_without_resolv_conf():
    assert system_upstreams(NO_RESOLV_CONF) == FALLBACK


def test_load_config_takes_upstreams_from_resolv_conf_minus_own_listen(in_tmp):
    (in_tmp / "resolv.conf").write_text("nameserver 127.0.0.1\nnameserver 192.0.2.53\n")
    (in_tmp / "c.yaml").write_text("server:\n  listen: ['127.0.0.1:53']\n")
    config = load_config("c.yaml", resolv_conf=str(in_tmp / "resolv.conf"))
    assert config.upstream.servers == (UpstreamServer("192.0.2.53"),)
    # --listen replaces the file's listen before resolv.conf is filtered
    config = load_config("c.yaml", Overrides(listen=("127.0.0.1:5300",)),
                         resolv_conf=str(in_tmp / "resolv.conf"))
    assert config.upstream.servers == (UpstreamServer("127.0.0.1"), UpstreamServer("192.0.2.53"))


def test_configured_upstreams_ignore_resolv_conf(in_tmp):
    (in_tmp / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    (in_tmp / "c.yaml").write_text("upstream:\n  servers: ['192.0.2.1']\n")
    config = load_config("c.yaml", resolv_conf=str(in_tmp / "resolv.conf"))
    assert config.upstream.servers == (UpstreamServer("192.0.2.1"),)


# --- the shipped example -------------------------------------------------------------------


def test_deploy_example_is_the_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    example = load_config("deploy/resolver.yaml", resolv_conf=NO_RESOLV_CONF)
    assert example.source == "deploy/resolver.yaml"
    assert replace(example, source=None) == load_config(None, resolv_conf=NO_RESOLV_CONF)


def test_deploy_example_mentions_every_key():
    text = (REPO / "deploy" / "resolver.yaml").read_text(encoding="utf-8")
    for section in (ServerConfig, UpstreamConfig, BlockingConfig, CacheConfig, MetricsConfig,
                    RateLimitConfig):
        for key in section.__dataclass_fields__:
            assert f"{key}:" in text, key


# --- upstream servers, strategies and conditional forwarding --------------------------------

@pytest.mark.parametrize("text, problem", [
    ("upstream:\n  strategy: quickest\n",
     "c.yaml:2: upstream.strategy: expected one of failover, random, fastest"),
    ("upstream:\n  unhealthy_after: 0\n",
     "c.yaml:2: upstream.unhealthy_after: expected an integer >= 1"),
    ("upstream:\n  backoff: 0\n", "c.yaml:2: upstream.backoff: expected seconds > 0"),
    ("upstream:\n  backoff: 10\n  max_backoff: 5\n",
     "c.yaml:3: upstream.max_backoff: expected seconds >= upstream.backoff (10)"),
    ("upstream:\n  tls_idle_timeout: never\n",
     "c.yaml:2: upstream.tls_idle_timeout: expected a number"),
    # a server as a string
    ("upstream:\n  servers: ['tls://192.0.2.1']\n",
     "c.yaml:2: upstream.servers[0]: 'tls://192.0.2.1': expected 'tls://HOST[:PORT]#NAME', "
     "NAME being the name on the server's certificate"),
    ("upstream:\n  servers: ['tls://192.0.2.1#bad..name']\n",
     "c.yaml:2: upstream.servers[0]: 'bad..name' is not a valid name: empty label"),
    ("upstream:\n  servers: ['tls://dns.example#dns.example']\n",
     "c.yaml:2: upstream.servers[0]: 'dns.example' is not an IP address "
     "(hostnames are not accepted here)"),
    ("upstream:\n  servers:\n    - [192.0.2.1]\n",
     "c.yaml:3: upstream.servers[0]: expected an address such as '127.0.0.1:53' or '[::1]:53'"),
    # a server as a mapping
    ("upstream:\n  servers:\n    - 192.0.2.1\n    - {address: 192.0.2.2, protocol: tls}\n",
     "c.yaml:4: upstream.servers[1].tls_name: required with tls for an IP address"),
    ("upstream:\n  servers:\n    - protocol: tls\n      tls_name: dns.example\n",
     "c.yaml:3: upstream.servers[0].address: required"),
    ("upstream:\n  servers:\n    - address: dns.example\n",
     "c.yaml:3: upstream.servers[0].address: 'dns.example' is not an IP address "
     "(hostnames are not accepted here)"),
    ("upstream:\n  servers:\n    - address: 53\n",
     "c.yaml:3: upstream.servers[0].address: expected an address such as '192.0.2.1' or "
     "'[2001:db8::1]:853'"),
    ("upstream:\n  servers:\n    - address: 192.0.2.1\n      protocol: https\n",
     "c.yaml:4: upstream.servers[0].protocol: expected one of udp, tls"),
    # one mistake, one message: tls_name is not also blamed on the bad protocol
    ("upstream:\n  servers:\n    - {address: 192.0.2.1, protocol: tcp, tls_name: dns.example}\n",
     "c.yaml:3: upstream.servers[0].protocol: expected one of udp, tls"),
    ("upstream:\n  servers:\n    - {address: 192.0.2.1, tls_name: dns.example}\n",
     "c.yaml:3: upstream.servers[0].tls_name: only with protocol tls"),
    ("upstream:\n  servers:\n    - {address: 192.0.2.1, protocol: tls, tls_name: 'a..b'}\n",
     "c.yaml:3: upstream.servers[0].tls_name: 'a..b' is not a valid name: empty label"),
    ("upstream:\n  servers:\n    - address: 192.0.2.1\n      protocol: tls\n"
     "      tls_name: dns.example\n      ca_file: missing.pem\n",
     "c.yaml:6: upstream.servers[0].ca_file: cannot read 'missing.pem': "
     "No such file or directory"),
    ("upstream:\n  servers:\n    - {address: 192.0.2.1, timeout: 0}\n",
     "c.yaml:3: upstream.servers[0].timeout: expected seconds > 0"),
    ("upstream:\n  servers:\n    - {address: 192.0.2.1, tls: true}\n",
     "c.yaml:3: upstream.servers[0].tls: unknown key"),
    # conditional forwarding
    ("upstream:\n  conditional: {domains: [corp.example]}\n",
     "c.yaml:2: upstream.conditional: expected a list of {domains, servers} mappings"),
    ("upstream:\n  conditional: [corp.example]\n",
     "c.yaml:2: upstream.conditional[0]: expected a mapping with domains and servers"),
    ("upstream:\n  conditional:\n    - domains: [corp.example]\n",
     "c.yaml:3: upstream.conditional[0].servers: required"),
    ("upstream:\n  conditional:\n    - servers: [192.0.2.53]\n",
     "c.yaml:3: upstream.conditional[0].domains: required"),
    ("upstream:\n  conditional:\n    - {domains: [], servers: [192.0.2.53]}\n",
     "c.yaml:3: upstream.conditional[0].domains: expected at least one domain"),
    ("upstream:\n  conditional:\n    - {domains: [corp.example, 'a..example'],"
     " servers: [192.0.2.53]}\n",
     "c.yaml:3: upstream.conditional[0].domains[1]: 'a..example' is not a valid name: "
     "empty label"),
    ("upstream:\n  conditional:\n    - {domains: [corp.example], servers: []}\n",
     "c.yaml:3: upstream.conditional[0].servers: expected at least one server"),
    ("upstream:\n  conditional:\n    - {domains: [corp.example], servers: [dns.example]}\n",
     "c.yaml:3: upstream.conditional[0].servers[0]: 'dns.example' is not an IP address "
     "(hostnames are not accepted here)"),
    ("upstream:\n  conditional:\n    - {domains: [corp.example], servers: [192.0.2.53]}\n"
     "    - domains:\n        - lab.example\n        - Corp.Example.\n"
     "      servers: [192.0.2.54]\n",
     "c.yaml:6: upstream.conditional[1].domains[1]: 'corp.example' is already in "
     "upstream.conditional[0]"),
    ("upstream:\n  conditional:\n    - {domains: [corp.example], servers: [192.0.2.53],"
     " strategy: random}\n",
     "c.yaml:3: upstream.conditional[0].strategy: unknown key"),
])
def test_upstream_error(in_tmp, text, problem):
    assert problems_of(text) == [problem]


def test_a_ca_file_without_certificates_is_an_error(in_tmp):
    (in_tmp / "not-a-ca.pem").write_text("hello\n")
    [problem] = problems_of("upstream:\n  servers:\n    - address: 192.0.2.1\n"
                            "      protocol: tls\n      tls_name: dns.example\n"
                            "      ca_file: not-a-ca.pem\n")
    assert problem.startswith("c.yaml:6: upstream.servers[0].ca_file: 'not-a-ca.pem' holds no "
                              "usable PEM certificate")


@pytest.mark.parametrize("text, expected", [
    ("['192.0.2.1', 'tls://192.0.2.2#Dns.Example.', 'tls://[2001:db8::2]:8853#dns.example']",
     (UpstreamServer("192.0.2.1"), UpstreamServer("192.0.2.2", 853, "tls", "dns.example"),
      UpstreamServer("2001:db8::2", 8853, "tls", "dns.example"))),
    ("[{address: 192.0.2.1, timeout: 0.25}, {address: '192.0.2.2:5353', protocol: udp}]",
     (UpstreamServer("192.0.2.1", timeout=0.25), UpstreamServer("192.0.2.2", 5353))),
    ("[{address: 192.0.2.1, protocol: tls, tls_name: dns.example, timeout: 1}]",
     (UpstreamServer("192.0.2.1", 853, "tls", "dns.example", timeout=1.0),)),
])
def test_upstream_servers(in_tmp, text, expected):
    assert load_text(f"upstream:\n  servers: {text}\n").upstream.servers == expected


def test_ca_file_is_resolved_against_the_config_file(in_tmp):
    (in_tmp / "etc").mkdir()
    files = make_tls_files(in_tmp / "etc")
    (in_tmp / "etc" / "c.yaml").write_text(
        "upstream:\n  servers:\n    - address: 192.0.2.1\n      protocol: tls\n"
        "      tls_name: dns.example\n      ca_file: ca.pem\n", encoding="utf-8")
    config = load_config("etc/c.yaml", resolv_conf=NO_RESOLV_CONF)
    assert config.upstream.servers[0].ca_file == str(files.ca)


def test_upstream_settings(in_tmp):
    text = ("upstream:\n  strategy: fastest\n  unhealthy_after: 5\n  backoff: 0.5\n"
            "  max_backoff: 30\n  tls_idle_timeout: 20\n  conditional:\n"
            "    - domains: [Corp.Example., 10.in-addr.arpa]\n"
            "      servers: [192.0.2.53, {address: 192.0.2.54, timeout: 0.5}]\n"
            "    - {domains: [lab.example], servers: ['tls://192.0.2.55#dns.lab.example']}\n")
    Path("c.yaml").write_text(text, encoding="utf-8")
    upstream = load_config("c.yaml", resolv_conf=NO_RESOLV_CONF).upstream
    assert upstream == UpstreamConfig(
        servers=FALLBACK, strategy="fastest", unhealthy_after=5, backoff=0.5, max_backoff=30.0,
        tls_idle_timeout=20.0, conditional=(
            ConditionalForward(("corp.example", "10.in-addr.arpa"),
                               (UpstreamServer("192.0.2.53"),
                                UpstreamServer("192.0.2.54", timeout=0.5))),
            ConditionalForward(("lab.example",),
                               (UpstreamServer("192.0.2.55", 853, "tls", "dns.lab.example"),)),
        ))


@pytest.mark.parametrize("value, expected", [
    ("tls://192.0.2.1#dns.example", UpstreamServer("192.0.2.1", 853, "tls", "dns.example")),
    ("192.0.2.1:5353", UpstreamServer("192.0.2.1", 5353)),
])
def test_upstream_flag_takes_the_string_forms(value, expected):
    config = load_config(None, Overrides(upstreams=(value,)), resolv_conf=NO_RESOLV_CONF)
    assert config.upstream.servers == (expected,)


def test_upstream_flag_error():
    with pytest.raises(ConfigError) as caught:
        load_config(None, Overrides(upstreams=("tls://192.0.2.1",)), resolv_conf=NO_RESOLV_CONF)
    assert caught.value.problems == [
        "--upstream: 'tls://192.0.2.1': expected 'tls://HOST[:PORT]#NAME', NAME being the name "
        "on the server's certificate"]
