"""deploy/systemd/resolver.service: systemd accepts it, and its sandbox rates as documented.

systemd cannot boot here, so `systemd-analyze` judges the unit offline. `verify` checks that
every ExecStart binary exists, so the unit is checked as rendered for this checkout: the
installed path /opt/resolver/bin/resolver replaced by this virtualenv's console script. Its
exit status is 0 even for unknown keys and values it cannot parse (it says so and ignores
them), so any output fails the test too. `security --offline=yes` rates the sandbox; the
exposure must not exceed the score docs/deploying.md reports.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from resolver.cli import FILES_BESIDES_TCP
from resolver.ops.config import ServerConfig
from tests.servers import require_tool

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "resolver.service"
DOCS = ROOT / "docs" / "deploying.md"
INSTALLED = "/opt/resolver/bin/resolver"
TIMEOUT = 60  # seconds; only reached when systemd-analyze hangs

pytestmark = pytest.mark.e2e  # runs systemd-analyze


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's console script."""
    script = Path(sys.executable).parent / "resolver"
    assert script.is_file(), f"{script}: pip install -e . makes the console script"
    text = UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED} " in text
    rendered = tmp_path / UNIT.name
    rendered.write_text(text.replace(INSTALLED, str(script)), encoding="utf-8")
    return rendered


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("systemd-analyze"), *map(str, args)],
                          capture_output=True, text=True, timeout=TIMEOUT)


def directives(key: str) -> list[str]:
    return [line.partition("=")[2] for line in UNIT.read_text(encoding="utf-8").splitlines()
            if line.startswith(f"{key}=")]


def test_systemd_accepts_the_unit(unit: Path) -> None:
    result = analyze("verify", unit)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_sandbox_rates_no_worse_than_documented(unit: Path) -> None:
    result = analyze("security", "--offline=yes", "--no-pager", unit)
    assert result.returncode == 0, result.stderr
    rated = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    documented = re.search(r"exposure level (\d+\.\d+)",
                           DOCS.read_text(encoding="utf-8").replace("\n", " "))
    assert rated and documented, (result.stdout, "docs/deploying.md names the score")
    assert float(rated.group(1)) <= float(documented.group(1)), result.stdout


def test_open_files_cover_the_tcp_connection_cap() -> None:
    limit, = directives("LimitNOFILE")
    assert int(limit) >= ServerConfig().tcp_max_connections + FILES_BESIDES_TCP


def test_it_reloads_on_sighup_and_holds_only_the_low_port_capability() -> None:
    assert directives("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert directives("AmbientCapabilities") == directives("CapabilityBoundingSet") == [
        "CAP_NET_BIND_SERVICE"]
    assert directives("ExecStart") == [f"{INSTALLED} serve -c /etc/resolver/resolver.yaml"]
    assert directives("StateDirectory") == ["resolver"]  # /var/lib/resolver, as in the image
