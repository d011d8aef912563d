"""Fixtures shared by all tests: the upstream servers, and the resolver under test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypedDict, Unpack

import pytest

from resolver.message.constants import Clock
from resolver.ops.config import Address, Config, UpstreamServer
from resolver.rules.loader import load_rules
from resolver.server.app import RunningServer, running_server
from tests.servers import LOOPBACK, FaultUpstream, NsdServer, run_nsd
from tests.tls import TlsFiles, UnboundDot, make_tls_files, run_unbound_dot


@pytest.fixture(scope="session")
def nsd_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsdServer]:
    """A real NSD serving tests.servers.ZONE on 127.0.0.1, started once per test session."""
    with run_nsd(tmp_path_factory.mktemp("nsd")) as server:
        yield server


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A test CA and a certificate for tests.tls.TLS_NAME."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def unbound_dot(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles,
                nsd_upstream: NsdServer) -> Iterator[UnboundDot]:
    """Unbound serving DNS over TLS on 127.0.0.1, forwarding to the NSD fixture."""
    with run_unbound_dot(tmp_path_factory.mktemp("unbound"), tls_files, nsd_upstream) as server:
        yield server


class FaultSettings(TypedDict, total=False):
    """How a FaultUpstream misbehaves, besides its mode (see tests.servers.FaultUpstream)."""

    delay: float
    ttl: int
    then_answer: bool


class StartFault(Protocol):
    def __call__(self, mode: str, **settings: Unpack[FaultSettings]) -> FaultUpstream: ...


@pytest.fixture
def fault_upstream() -> Iterator[StartFault]:
    """Factory: fault_upstream(mode, **settings) starts a FaultUpstream, stopped after the
    test."""
    with contextlib.ExitStack() as stack:

        def start(mode: str, **settings: Unpack[FaultSettings]) -> FaultUpstream:
            return stack.enter_context(FaultUpstream(mode, **settings))

        yield start


# --------------------------------------------------------------------------------------------
# The resolver under test, in-process, on 127.0.0.1 port 0.

BLOCK_TTL = 42  # blocking.ttl in test configs: distinct from every zone TTL, so it is recognisable
# The metrics endpoint is off unless a test asks for it with `metrics=METRICS_ON`: stopping
# prometheus-client's HTTP server waits out its 0.5 s poll interval, on every server stop.
METRICS_ON = {"listen": Address(LOOPBACK, 0)}

# Rules for the end-to-end tests: one list per action. example.org is blocked (the brief's
# look-alikes are notexample.org and example.org.evil.test); example.test is never blocked, so
# forwarding tests can use the NSD zone freely.
RULES_YAML = """\
lists:
  - name: tracking
    entries:
      - id: example
        name: Example Org
        domains: [example.org]
      - blocked.test
  - name: sinks
    action: sinkhole
    domains: [sink.test]
  - name: custom_sinks
    action: sinkhole
    ttl: 60
    sinkhole: [192.0.2.53, 192.0.2.54, "2001:db8::53"]
    domains: [custom.test]
  - name: empty
    action: nodata
    domains: [nodata.test]
  - name: deny
    action: refused
    domains: [refused.test]
  - name: exceptions
    action: allow
    domains: [allowed.example.org]
"""


class Listening(Protocol):
    """A test upstream: NsdServer, FaultUpstream, UnboundDot."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


# A test upstream, or UpstreamServer's first fields: (host, port), or (host, port, protocol,
# TLS name, CA file).
Upstream = Listening | tuple[str, int] | tuple[str, int, str, str, str]


def resolver_config(upstreams: Sequence[Upstream], rules: Sequence[str],
                    **sections: Mapping[str, object]) -> Config:
    """A Config for tests: listen on 127.0.0.1:0, no metrics endpoint, forward only to the given
    loopback upstreams (anything with .host and .port, or (host, port)), short upstream
    timeouts; `sections` replaces fields per section, e.g. server={"tcp_idle_timeout": 0.5}."""
    servers = tuple(UpstreamServer(*u) if isinstance(u, tuple) else UpstreamServer(u.host, u.port)
                    for u in upstreams)
    if not servers or any(s.host != LOOPBACK for s in servers):
        raise ValueError("tests forward only to upstreams on 127.0.0.1, and need at least one")
    config = Config()
    config = replace(
        config,
        server=replace(config.server, listen=(Address(LOOPBACK, 0),)),
        upstream=replace(config.upstream, servers=servers, timeout=0.5, deadline=1.5),
        blocking=replace(config.blocking, rules=tuple(rules), ttl=BLOCK_TTL),
        metrics=replace(config.metrics, listen=None),
    )
    for name, changes in sections.items():
        config = replace(config, **{name: replace(getattr(config, name), **changes)})
    return config


class StartServer(Protocol):
    def __call__(self, *upstreams: Upstream, rules: str = ..., clock: Clock | None = ...,
                 **sections: Mapping[str, object]) -> Awaitable[RunningServer]: ...


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    """Factory: `await start_server(*upstreams, rules=RULES_YAML, clock=None, **sections)`
    starts the resolver (see resolver_config) and returns its RunningServer; all are closed
    after the test."""
    async with contextlib.AsyncExitStack() as stack:
        count = 0

        async def start(*upstreams: Upstream, rules: str = RULES_YAML, clock: Clock | None = None,
                        **sections: Mapping[str, object]) -> RunningServer:
            nonlocal count
            count += 1
            path = tmp_path / f"rules-{count}.yaml"
            path.write_text(rules)
            config = resolver_config(upstreams, [str(path)], **sections)
            return await stack.enter_async_context(
                running_server(config, load_rules([str(path)]), clock=clock))

        yield start


@pytest.fixture
async def server(start_server: StartServer, nsd_upstream: NsdServer) -> RunningServer:
    """The resolver with RULES_YAML, forwarding to the NSD test zones."""
    return await start_server(nsd_upstream)


# --------------------------------------------------------------------------------------------
# Test tiers: every test is marked `unit` or `e2e`. `make test-unit` runs the unit tier (no
# server, no subprocess, no socket; a few seconds), `make test` runs both.

# Modules whose every test starts a process or opens sockets, whatever fixtures it uses; so is
# every test_e2e_* module.
E2E_MODULES = frozenset({"test_app", "test_cli", "test_gc", "test_privileges", "test_servers",
                         "test_upstream", "test_wheel", "test_workers"})
# Fixtures that start servers: a test that uses one, even through another fixture, is e2e. This
# sorts the modules that mix table tests with end-to-end ones (test_dot, test_packetcache).
E2E_FIXTURES = frozenset({"server", "start_server", "nsd_upstream", "unbound_dot",
                          "fault_upstream"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        e2e = (module in E2E_MODULES or module.startswith("test_e2e_")
               or not E2E_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
               or item.get_closest_marker("e2e") is not None)  # a test that runs a process
        item.add_marker(pytest.mark.e2e if e2e else pytest.mark.unit)
