"""A real DNS-over-TLS upstream for the tests: Unbound on 127.0.0.1 with a test certificate.

Unbound serves TLS on a free port and forwards every name to the NSD fixture, so the answers
are the test zone's and nothing leaves the loopback (outgoing-interface is 127.0.0.1, and the
only forwarder is NSD). The certificate is made at test time by a throwaway CA, with the
`cryptography` package, so no key material is committed.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from resolver.server.supervisor import free_port
from tests.servers import LOOPBACK, NsdServer, require_tool

TLS_NAME = "dns.example.test"  # the name on the test server's certificate
IDLE_MS = 1000  # Unbound closes a TLS connection idle this long (tcp-idle-timeout)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path  # the CA certificate clients trust (ca_file)
    cert: Path  # the server's certificate, for TLS_NAME
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls_files(directory: Path, server_name: str = TLS_NAME) -> TlsFiles:
    """A CA and a server certificate it signed for server_name, valid for a day."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("resolver test CA")).issuer_name(_name("resolver test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_name)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


@dataclass(frozen=True, slots=True)
class UnboundDot:
    """A running Unbound answering DNS over TLS on host:port."""

    host: str
    port: int
    config: Path
    control: str  # the unbound-control binary

    def stats(self) -> dict[str, float]:
        """Unbound's statistics (not reset), e.g. 'num.query.tls', 'total.tcpusage'."""
        output = subprocess.run([self.control, "-c", str(self.config), "stats_noreset"],
                                check=True, capture_output=True, text=True, timeout=10).stdout
        return {key: float(value) for key, _, value in
                (line.partition("=") for line in output.splitlines()) if value}


def unbound_config(workdir: Path, port: int, tls: TlsFiles, forward_to: NsdServer) -> str:
    return f"""server:
    interface: {LOOPBACK}@{port}
    tls-port: {port}
    tls-service-key: "{tls.key}"
    tls-service-pem: "{tls.cert}"
    tcp-idle-timeout: {IDLE_MS}
    do-ip6: no
    num-threads: 1
    so-reuseport: no
    username: ""
    chroot: ""
    directory: "{workdir}"
    pidfile: "{workdir}/unbound.pid"
    use-syslog: no
    logfile: "{workdir}/unbound.log"
    verbosity: 1
    outgoing-interface: {LOOPBACK}
    do-not-query-localhost: no
    module-config: "iterator"
    extended-statistics: yes
    local-zone: "test." nodefault  # Unbound answers .test itself (RFC 6761) unless told not to
remote-control:
    control-enable: yes
    control-interface: "{workdir}/control.sock"
    control-use-cert: no
forward-zone:
    name: "."
    forward-addr: {forward_to.host}@{forward_to.port}
"""


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


@contextlib.contextmanager
def run_unbound_dot(workdir: Path, tls: TlsFiles, forward_to: NsdServer, *,
                    attempts: int = 5, startup: float = 10.0) -> Iterator[UnboundDot]:
    """Run `unbound -d` with DNS over TLS on a free port until the block exits."""
    unbound, control = require_tool("unbound"), require_tool("unbound-control")
    config, log, stderr = workdir / "unbound.conf", workdir / "unbound.log", workdir / "stderr"
    for _ in range(attempts):
        port = free_port()
        config.write_text(unbound_config(workdir, port, tls, forward_to))
        log.unlink(missing_ok=True)
        with stderr.open("wb") as err:
            process = subprocess.Popen([unbound, "-d", "-c", str(config)],
                                       stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                       start_new_session=True)
        try:
            deadline = time.monotonic() + startup
            while process.poll() is None and time.monotonic() < deadline:
                if _listening(LOOPBACK, port):
                    yield UnboundDot(LOOPBACK, port, config, control)
                    return
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        output = "".join(path.read_text(errors="replace") for path in (stderr, log)
                         if path.exists())
        if "in use" not in output:
            break
    raise RuntimeError(f"unbound did not listen on {LOOPBACK}:{port} within {startup:g}s "
                       f"(exit code {process.returncode});\n--- log ---\n{output}")
