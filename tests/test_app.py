"""resolver/app.py: the sockets it binds."""

from __future__ import annotations

import socket

import pytest

from resolver.server.app import bound_socket


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
@pytest.mark.parametrize("reuse_port", [False, True])
def test_an_ipv6_socket_takes_ipv6_only(kind: socket.SocketKind, reuse_port: bool) -> None:
    """As asyncio makes the TCP sockets: so [::]:53 and 0.0.0.0:53 can both be listened on."""
    with bound_socket("::1", 0, kind, reuse_port) as sock:
        assert sock.family == socket.AF_INET6 and sock.type == kind
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == int(reuse_port)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == int(
            kind == socket.SOCK_STREAM)
        assert not sock.getblocking()


def test_an_ipv4_udp_socket_is_bound_where_asked() -> None:
    with bound_socket("127.0.0.1", 0, socket.SOCK_DGRAM, False) as sock:
        host, port = sock.getsockname()
        assert sock.family == socket.AF_INET and host == "127.0.0.1" and port > 0


def test_a_taken_port_raises() -> None:
    with (bound_socket("127.0.0.1", 0, socket.SOCK_DGRAM, False) as taken,
          pytest.raises(OSError)):
        bound_socket("127.0.0.1", taken.getsockname()[1], socket.SOCK_DGRAM, False)
