"""`python -m resolver serve` as an operator runs it: exit codes, messages, banner, signals.

Every run passes --upstream (the NSD fixture, or a closed local port) and --metrics off, so
the server never forwards to the system's resolvers and never binds a fixed port.
"""

from __future__ import annotations

import contextlib
import re
import resource
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from resolver.cli import banner
from resolver.ops.config import load_config
from resolver.rules.loader import load_rules
from resolver.server.supervisor import free_port
from tests.servers import ZONE

ROOT = Path(__file__).resolve().parent.parent
GOOD_RULES = """\
lists:
  - name: tracking
    entries:
      - id: example
        domains: [example.org, blocked.test]
      - other.test
  - name: ok
    action: allow
    domains: [allowed.example.org]
"""


def resolver(*args: str) -> list[str]:
    return [sys.executable, "-m", "resolver", "serve", *args]


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def closed_upstream() -> str:
    """A loopback port nobody listens on: for runs that must fail before forwarding."""
    return f"127.0.0.1:{free_port()}"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("lists:\n  - name: x\n    actoin: nxdomain\n    domains: [a.test]\n", 3,
         "lists[0].actoin: unknown key"),
        ("lists:\n  - name: x\n    domains:\n      - good.test\n      - bad..test\n", 5,
         "not a valid name"),
        ("lists:\n  - name: x\n    action: block\n    domains: [a.test]\n", 3, "action"),
        ("lists: [\n", 2, "YAML syntax error"),
    ],
)
def test_broken_rule_file_exits_2_naming_file_and_line(tmp_path, closed_upstream, text, line,
                                                       message):
    rules = write(tmp_path / "broken.yaml", text)
    result = run(resolver("--listen", "127.0.0.1:0", "--upstream", closed_upstream,
                          "--rules", rules, "--metrics", "off"))

    assert result.returncode == 2
    assert f"{rules}:{line}:" in result.stderr
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  lisen: ['127.0.0.1:0']\n", ":2: server.lisen: unknown key"),
        ("upstream:\n  timeout: -1\n", ":2: upstream.timeout:"),
        ("cache:\n  max_entries: 10\n  bogus: 1\n", ":3: cache.bogus: unknown key"),
    ],
)
def test_bad_config_exits_2_with_the_dotted_path(tmp_path, closed_upstream, text, expected):
    config = write(tmp_path / "resolver.yaml", text)
    rules = write(tmp_path / "rules.yaml", GOOD_RULES)
    result = run(resolver("-c", config, "--listen", "127.0.0.1:0", "--upstream", closed_upstream,
                          "--rules", rules, "--metrics", "off"))

    assert result.returncode == 2
    assert f"{config}{expected}" in result.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--listen", "127.0.0.1:notaport"), ("--listen", "localhost:53"),
     ("--upstream", "127.0.0.1:70000")],
)
def test_bad_flag_value_exits_2_naming_the_flag(tmp_path, closed_upstream, flag, value):
    rules = write(tmp_path / "rules.yaml", GOOD_RULES)
    args = {"--listen": "127.0.0.1:0", "--upstream": closed_upstream, flag: value}
    result = run(resolver("--listen", args["--listen"], "--upstream", args["--upstream"],
                          "--rules", rules, "--metrics", "off"))

    assert result.returncode == 2
    assert f"{flag}:" in result.stderr


def test_port_in_use_exits_2(tmp_path, nsd_upstream):
    """NSD holds its port on 127.0.0.1; a second server there cannot start."""
    rules = write(tmp_path / "rules.yaml", GOOD_RULES)
    result = run(resolver("--listen", nsd_upstream.address, "--upstream", nsd_upstream.address,
                          "--rules", rules, "--metrics", "off", "--workers", "1"))

    assert result.returncode == 2
    assert result.stderr.strip()


def test_workers_do_not_join_a_port_another_server_holds(tmp_path, nsd_upstream):
    """Workers bind with SO_REUSEPORT, which would let a second server of the same user share
    the first one's port (and its traffic); the supervisor checks before it forks."""
    rules = write(tmp_path / "rules.yaml", GOOD_RULES)
    with serving(rules, nsd_upstream.address, workers="2") as first:
        banner = read_line(first)
        match = re.search(r"listening on (\S+)", banner)
        assert match, banner
        address = match.group(1)
        second = run(resolver("--listen", address, "--upstream", nsd_upstream.address,
                              "--rules", rules, "--metrics", "off", "--workers", "2"))
    assert second.returncode == 2
    assert "cannot serve" in second.stderr and "in use" in second.stderr


def read_line(process: subprocess.Popen[str], timeout: float = 15) -> str:
    """The first line of stdout, without hanging the test when none comes."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout)
    line = process.stdout.readline() if ready else ""
    if not line:
        process.kill()
        process.wait()
        stderr = process.stderr.read() if process.stderr else "(not captured)"
        raise AssertionError(f"no banner within {timeout}s (exit {process.returncode}); "
                             f"stderr:\n{stderr}")
    return line


@contextlib.contextmanager
def serving(rules: str, upstream: str, workers: str = "1") -> Iterator[subprocess.Popen[str]]:
    """`resolver serve` on a free port in a subprocess, killed if the test leaves it running."""
    process = subprocess.Popen(
        resolver("--listen", "127.0.0.1:0", "--upstream", upstream, "--rules", rules,
                 "--metrics", "off", "--workers", workers),
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert process.stdout is not None and process.stderr is not None
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_starts_answers_and_stops_on_sigterm(tmp_path, nsd_upstream, workers):
    rules = write(tmp_path / "rules.yaml", GOOD_RULES)
    with serving(rules, nsd_upstream.address, workers) as process:
        banner = read_line(process)
        assert "listening on" in banner
        assert "blocking 3 domains" in banner
        # the version the metric and the EDE text name too (test_e2e_reload.py)
        assert f"from 1 list (rules {load_rules([rules]).version})," in banner
        assert nsd_upstream.address in banner
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        port = int(match.group(1))
        assert port != 0

        blocked = dns.query.udp(dns.message.make_query("www.example.org", "A"), "127.0.0.1",
                                port=port, timeout=3)
        forwarded = dns.query.tcp(dns.message.make_query(ZONE.www, "A"), "127.0.0.1",
                                  port=port, timeout=3)
        assert blocked.rcode() == dns.rcode.NXDOMAIN
        assert [r.to_text() for r in forwarded.answer[0]] == [ZONE.www_a]

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert process.stdout is not None
        assert process.stdout.read() == "", "one banner line, nothing more on stdout"


def test_sigint_stops_too(tmp_path, nsd_upstream):
    rules = write(tmp_path / "rules.yaml", GOOD_RULES)
    with serving(rules, nsd_upstream.address) as process:
        assert "listening on" in read_line(process)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0


@pytest.mark.parametrize("hard_too", [False, True])
def test_the_open_files_limit_is_lifted_or_its_shortage_said(tmp_path, nsd_upstream, hard_too):
    """A soft limit of 1024 is about tcp_max_connections' default: it is raised to the hard
    limit, and a hard limit too low for tcp_max_connections is warned about."""
    rules = write(tmp_path / "rules.yaml", GOOD_RULES)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = (256, 256 if hard_too else hard)
    process = subprocess.Popen(
        resolver("--listen", "127.0.0.1:0", "--upstream", nsd_upstream.address, "--rules",
                 rules, "--metrics", "off", "--workers", "1"),
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, low))
    assert process.stdout is not None and process.stderr is not None
    try:
        assert "listening on" in read_line(process)
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        match = re.search(r"Max open files\s+(\d+)", limits)
        assert match, limits
        assert int(match.group(1)) == (256 if hard_too else hard)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    warned = "open files are limited to 256" in process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    assert warned == hard_too


@pytest.mark.parametrize(("rules", "said"), [
    ("lists:\n  - name: a\n    domains: [one.test]\n", "blocking 1 domain from 1 list (rules"),
    ("lists:\n  - name: a\n    domains: [one.test, two.test]\n  - name: b\n    mode: dry-run\n"
     "    domains: [three.test]\n  - name: c\n    action: allow\n    domains: [ok.test]\n",
     "blocking 2 domains from 1 list (and 1 dry-run) (rules"),
])
def test_the_banner_counts_what_blocks(tmp_path: Path, rules: str, said: str) -> None:
    """Dry-run and allow lists block nothing: the startup line says what does, in English."""
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    line = banner(load_config(None), load_rules([str(path)]), [("127.0.0.1", 5353)], 1)
    assert said in line
