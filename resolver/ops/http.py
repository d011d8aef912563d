"""The HTTP listener beside the DNS ports: `GET /metrics` for Prometheus, `GET /healthz` and
`GET /readyz` for probes (resolver/ops/health.py), `POST /-/reload`. Any other path is 404.

A small server of our own rather than prometheus-client's `start_http_server`, because the
listener also takes reload requests (as Prometheus' own `/-/reload` does), and because
stopping it must be cheap: `serve_forever` notices a shutdown only at its next 0.5 s poll,
which every test that starts a server would wait out. Here the serving thread sleeps in one
`select` on the listening socket and a wake-up pipe, so `stop` returns at once.

Requests are served each on their own thread (ThreadingHTTPServer): a scrape must not wait
for a reload that is waiting for its result, nor the reverse.

`/-/reload` answers only clients in `metrics.allow` (loopback by default; 403 otherwise),
whatever address the listener is bound to: a reload is an operator's action. The list is the
same kind as `server.allow` (stages/access.py).
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from resolver.ops.config import LOOPBACK_NETWORKS
from resolver.ops.health import Probe, Probed, Verdict, liveness, readiness
from resolver.stages.access import Networks

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # open at once; Prometheus and an operator need a handful
_Request = socket.socket | tuple[bytes, socket.socket]  # what socketserver hands its methods
_Address = tuple[str, int] | str

# What each reload result answers with: ok and unchanged are successes; a refused reload
# conflicts with the guard (retry with force=1); a failed one could not load (Prometheus'
# /-/reload answers 500 there too); pending: no result within the wait (the reload goes on).
STATUS = {"ok": 200, "unchanged": 200, "refused": 409, "failed": 500, "pending": 504}
FORCE_VALUES = {"1": True, "true": True, "0": False, "false": False}
TEXT = "text/plain; charset=utf-8"


class Judge(Protocol):
    def __call__(self, probed: Probed, /) -> Verdict: ...


CHECKS: dict[str, Judge] = {"/healthz": liveness, "/readyz": readiness}


class ReloadAnswer(Protocol):
    """What a reload came to (resolver/server/reload.py Outcome)."""

    @property
    def result(self) -> str: ...

    def as_json(self) -> dict[str, object]: ...


class Reload(Protocol):
    """Runs one reload where reloads run (the event loop, the supervisor) and waits for its
    result; called on the request's thread."""

    def __call__(self, force: bool) -> ReloadAnswer: ...


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request waiting on a reload must not hold up the exit

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 reload: Reload | None, probe: Probe | None, control: Networks):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.registry = registry
        self.reload = reload
        self.probe = probe
        self.control = control
        self.timeout = 1.0  # handle_request's own wait: a client gone before accept
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: _Request, client_address: _Address) -> None:
        """A thread per connection, up to MAX_CONNECTIONS: beyond, a connection is closed at
        once, so clients that connect and say nothing cannot take every thread."""
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: _Request, client_address: _Address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "resolver"
    protocol_version = "HTTP/1.0"
    timeout = 10  # seconds a connection may stay silent: an idle one holds a thread

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        elif path in CHECKS and self.server.probe is not None:
            self._check(CHECKS[path], self.server.probe)
        elif path == "/-/reload":
            self._send(405, TEXT, b"use POST\n", allow="POST")
        else:
            self._send(404, TEXT, b"not found: try /metrics, /healthz or /readyz\n")

    def _check(self, judge: Judge, probe: Probe) -> None:
        """200 or 503 with the verdict's words; a probe that fails (a bug) is a 503 too, so
        a broken check never passes."""
        try:
            verdict = judge(probe())
        except Exception as exc:
            log.exception("probing the event loops failed")
            verdict = Verdict(False, f"the health check failed: {exc!r}\n")
        self._send(200 if verdict.ok else 503, TEXT, verdict.text.encode())

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/metrics" or url.path in CHECKS:
            self._send(405, TEXT, b"use GET\n", allow="GET")
            return
        if url.path != "/-/reload" or self.server.reload is None:
            self._send(404, TEXT, b"not found\n")
            return
        if self.client_address[0] not in self.server.control:
            self._json(403, {"result": "failed", "version": "",
                             "problems": ["/-/reload answers only clients in metrics.allow"]})
            return
        if self.headers.get("Origin") is not None:  # a browser's cross-site form: refused
            self._json(403, {"result": "failed", "version": "",
                             "problems": ["/-/reload takes no request from a web page"]})
            return
        force = FORCE_VALUES.get(parse_qs(url.query).get("force", ["0"])[-1].lower())
        if force is None:
            self._json(400, {"result": "failed", "version": "",
                             "problems": ["force takes 1, true, 0 or false"]})
            return
        answer = self.server.reload(force)
        self._json(STATUS.get(answer.result, 500), answer.as_json())

    def _json(self, status: int, body: dict[str, object]) -> None:
        self._send(status, "application/json", json.dumps(body).encode() + b"\n")

    def _send(self, status: int, content_type: str, body: bytes, allow: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: a scrape every few seconds is not worth a log line (reloads log their own)."""


class Endpoint:
    """The listener on its own thread; `stop` returns at once."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 reload: Reload | None = None, probe: Probe | None = None,
                 control: Networks | None = None):
        """probe: asks the event loops for /healthz and /readyz (None: those are 404).
        control: who may POST /-/reload (default: loopback clients)."""
        self._server = _Server(host, port, registry, reload, probe,
                               control or Networks(LOOPBACK_NETWORKS))
        bound, bound_port = self._server.server_address[:2]
        assert isinstance(bound, str)  # an IP socket's address (bytes: a Unix socket's)
        self.address = (bound, bound_port)
        self._wake, self._woken = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="resolver-http", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._server.socket, selectors.EVENT_READ)
            selector.register(self._woken, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._woken in ready:
                    return
                self._server.handle_request()  # ready: accepts without waiting

    def stop(self) -> None:
        """Stop serving and close the socket; requests still running finish on their own
        threads."""
        self._wake.send(b"x")
        self._thread.join()
        self._server.server_close()
        self._wake.close()
        self._woken.close()
