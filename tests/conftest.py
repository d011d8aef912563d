"""Fixtures shared by all tests: the upstream servers the resolver forwards to."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from tests.servers import FaultUpstream, NsdServer, run_nsd


@pytest.fixture(scope="session")
def nsd_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsdServer]:
    """A real NSD serving tests.servers.ZONE on 127.0.0.1, started once per test session."""
    with run_nsd(tmp_path_factory.mktemp("nsd")) as server:
        yield server


@pytest.fixture
def fault_upstream() -> Iterator[Callable[..., FaultUpstream]]:
    """Factory: fault_upstream(mode, **kw) starts a FaultUpstream, stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda mode, **kw: stack.enter_context(FaultUpstream(mode, **kw))
