"""`pip install .` as a user runs it: the wheel holds every module and the shipped files, and the
installed `resolver` serves the shipped list from any directory.

The wheel is built from a copy of the working tree without its build/ and caches: setuptools
packs what it finds in build/, so a stale one could hide a module missing from the package
list, and the checkout is left untouched. It is installed, dependencies from PyPI, into a fresh
virtualenv made without pip (this test's pip installs into it, which spares ensurepip's
seconds). pip's own cache makes reruns quick; a fresh machine downloads once.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from resolver.server.supervisor import free_port
from tests.servers import LOOPBACK

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
SHIPPED = {  # in the repository -> in the wheel
    "rules/exchanges.yaml": "resolver/ops/shipped_files/rules/exchanges.yaml",
    "deploy/resolver.yaml": "resolver/ops/shipped_files/deploy/resolver.yaml",
}
BLOCKED = "www.binance.com"  # binance.com is on the shipped list, rules/exchanges.yaml
PIP_TIMEOUT = 600  # seconds; a first run downloads setuptools and the dependencies
TIMEOUT = 30  # seconds, for anything else; only reached when the test is about to fail
NOT_COPIED = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__")


@dataclass(frozen=True)
class Installed:
    source: Path  # the copy of the working tree the wheel was built from
    wheel: Path
    bin: Path  # the fresh virtualenv's bin/


def pip(*args: str | Path) -> None:
    """Run this interpreter's pip; fail with its output, or skip when PyPI is out of reach
    (never in CI, CI=true, where the test must run)."""
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check",
                             "--no-input", *map(str, args)],
                            capture_output=True, text=True, timeout=PIP_TIMEOUT,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        message = f"pip {' '.join(map(str, args))} failed:\n{result.stdout}{result.stderr}"
        if os.environ.get("CI") != "true" and not pypi_reachable():
            pytest.skip(f"PyPI is out of reach: {message}")
        pytest.fail(message)


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    pip("wheel", "--no-deps", "--wheel-dir", work / "dist", source)
    wheel, = (work / "dist").glob("*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True,
                   timeout=TIMEOUT)
    pip("--python", venv / "bin" / "python", "install", wheel)
    return Installed(source, wheel, venv / "bin")


def clean_env() -> dict[str, str]:
    """The environment without anything that could point Python back at the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_the_wheel_holds_every_module_and_the_shipped_files(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        for repository, packaged in SHIPPED.items():
            assert wheel.read(packaged) == (installed.source / repository).read_bytes()
    modules = {path.relative_to(installed.source).as_posix()
               for path in (installed.source / "resolver").rglob("*.py")}
    assert modules - names == set(), "add the missing packages to pyproject.toml"


def test_the_installed_shipped_paths_are_in_the_package(installed: Installed,
                                                       tmp_path: Path) -> None:
    """shipped.py picks the copies inside the installed package, not a checkout's."""
    result = subprocess.run(
        [installed.bin / "python", "-c",
         "from resolver.ops import shipped; print(shipped.SHIPPED_RULES, shipped.EXAMPLE_CONFIG)"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    rules, example = map(Path, result.stdout.split())
    venv = installed.bin.parent
    assert rules.is_relative_to(venv) and example.is_relative_to(venv)
    assert rules.read_bytes() == (installed.source / "rules" / "exchanges.yaml").read_bytes()
    assert example.read_bytes() == (installed.source / "deploy" / "resolver.yaml").read_bytes()


def test_version(installed: Installed, tmp_path: Path) -> None:
    result = subprocess.run([installed.bin / "resolver", "--version"], cwd=tmp_path,
                            env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"resolver {VERSION}\n", "")


def test_serve_without_rule_flags_blocks_the_shipped_list_from_any_directory(
        installed: Installed, tmp_path: Path) -> None:
    upstream = f"{LOOPBACK}:{free_port()}"  # nobody answers there: a blocked name never goes up
    process = subprocess.Popen(
        [installed.bin / "resolver", "serve", "--listen", f"{LOOPBACK}:0", "--metrics", "off",
         "--workers", "1", "--upstream", upstream],
        cwd=tmp_path, env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    try:
        banner = first_line(process)
        match = re.search(rf"listening on {re.escape(LOOPBACK)}:(\d+)", banner)
        assert match, banner
        port = int(match.group(1))
        query = dns.message.make_query(BLOCKED, "A")
        for ask in (dns.query.udp, dns.query.tcp):
            reply = ask(query, LOOPBACK, port=port, timeout=TIMEOUT)
            assert reply.rcode() == dns.rcode.NXDOMAIN, (ask.__name__, reply)
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
        process.stderr.close()


def first_line(process: subprocess.Popen[str]) -> str:
    """The banner, or a failure with the server's stderr when none comes."""
    assert process.stdout is not None and process.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        line = process.stdout.readline() if selector.select(TIMEOUT) else ""
    if "listening on" not in line:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"no banner within {TIMEOUT}s (exit {process.returncode}): {line!r}\n"
                    f"{process.stderr.read()}")
    return line
