"""resolver/ops/http.py: who may POST /-/reload by default, `metrics.allow` (the address
check itself, since every 127.x address is loopback and a test over sockets could only ever
come from one; tests/test_access.py has the list's own table)."""

from __future__ import annotations

import pytest

from resolver.ops.config import MetricsConfig
from resolver.ops.http import STATUS
from resolver.server.reload import FAILED, OK, PENDING, REFUSED, UNCHANGED
from resolver.stages.access import Networks


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1", True),
    ("127.1.2.3", True),
    ("127.255.255.254", True),
    ("::1", True),
    ("::ffff:127.0.0.1", True),  # an IPv4 client of an IPv6 listener
    ("::ffff:127.9.9.9", True),
    ("::ffff:192.0.2.1", False),
    ("192.0.2.1", False),
    ("10.0.0.1", False),
    ("0.0.0.0", False),
    ("128.0.0.1", False),
    ("126.255.255.255", False),
    ("2001:db8::1", False),
    ("::", False),
    ("fe80::1%eth0", False),
    ("localhost", False),  # a peer address is never a name: refuse what is not an address
    ("", False),
])
def test_only_loopback_clients_may_reload_by_default(host: str, allowed: bool) -> None:
    assert (host in Networks(MetricsConfig().allow)) is allowed


def test_every_result_has_a_status() -> None:
    assert {result: STATUS[result] for result in (OK, UNCHANGED, REFUSED, FAILED, PENDING)} == {
        OK: 200, UNCHANGED: 200, REFUSED: 409, FAILED: 500, PENDING: 504}
