"""`resolver rules export`: each format's exact lines and header, and the real checkers
(named-checkzone, unbound-checkconf) accept what is written."""

from __future__ import annotations

import subprocess

import pytest

from resolver.ops.config import BlockingConfig
from resolver.tools.common import Loaded
from resolver.tools.export import dnsmasq, hosts, rpz, unbound
from tests.servers import require_tool

RULES = """\
lists:
  - name: ads
    entries:
      - id: acme
        domains: [acme.test]
      - ads.test
  - name: null-route
    action: sinkhole
    domains: [sink.test]
  - name: custom
    action: sinkhole
    ttl: 60
    sinkhole: [192.0.2.53, "2001:db8::53"]
    domains: [custom.test]
  - name: empty
    action: nodata
    domains: [nodata.test]
  - name: deny
    action: refused
    domains: [refused.test]
  - name: exceptions
    action: allow
    domains: [ok.ads.test]
  - name: covered
    domains: [www.ok.ads.test]
  - name: zz-same
    action: nodata
    domains: [ads.test]
  - name: scoped
    clients: [10.0.0.0/8]
    domains: [scoped.test]
  - name: trial
    mode: dry-run
    domains: [trial.test]
"""
BLOCKING = BlockingConfig(ttl=300)


@pytest.fixture
def loaded(tmp_path) -> Loaded:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return Loaded.read([str(path)])


def body(lines, mark):
    return [line for line in lines if not line.startswith(mark)]


def left_out(lines, mark):
    return [line.split("left out: ", 1)[1] for line in lines
            if line.startswith(f"{mark} left out: ")]


STAGED_LEFT_OUT = ["list scoped (1 domain): staged (clients 10.0.0.0/8)",
                   "list trial (1 domain): dry-run"]
COVERED = "1 block domain at or below an allowed domain (allow wins; nothing to export)"


def test_rpz_records_header_and_serial(loaded):
    lines = list(rpz(loaded, BLOCKING, "rpz.local.", None))
    serial = int(loaded.rules.version[:8], 16)
    assert lines[0].startswith(f"; resolver rules export --format rpz: rules "
                               f"{loaded.rules.version}, 5 blocked domains, 1 allowed domain")
    assert "client scope" in lines[1] and "rollout" in lines[1] and "dry-run" in lines[1]
    assert left_out(lines, ";") == [
        "list deny (1 domain): action refused has no rpz equivalent", *STAGED_LEFT_OUT, COVERED]
    assert body(lines, ";") == [
        "$ORIGIN rpz.local.", "$TTL 300",
        f"@ IN SOA resolver.invalid. hostmaster.resolver.invalid. {serial} 3600 600 86400 300",
        "@ IN NS resolver.invalid.",
        "acme.test 300 IN CNAME .", "*.acme.test 300 IN CNAME .",
        "ads.test 300 IN CNAME .", "*.ads.test 300 IN CNAME .",  # ads, not zz-same: first
        "custom.test 60 IN A 192.0.2.53", "custom.test 60 IN AAAA 2001:db8::53",
        "*.custom.test 60 IN A 192.0.2.53", "*.custom.test 60 IN AAAA 2001:db8::53",
        "nodata.test 300 IN CNAME *.", "*.nodata.test 300 IN CNAME *.",
        "sink.test 300 IN A 0.0.0.0", "sink.test 300 IN AAAA ::",
        "*.sink.test 300 IN A 0.0.0.0", "*.sink.test 300 IN AAAA ::",
        "ok.ads.test 300 IN CNAME rpz-passthru.", "*.ok.ads.test 300 IN CNAME rpz-passthru."]


def test_hosts_lines(loaded):
    lines = list(hosts(loaded, BLOCKING))
    assert "below a domain" in lines[1] and "allow entries" in lines[1]
    assert left_out(lines, "#") == [
        "list exceptions (1 domain): action allow has no hosts equivalent", *STAGED_LEFT_OUT,
        COVERED]
    assert body(lines, "#") == [
        "0.0.0.0 acme.test", ":: acme.test", "0.0.0.0 ads.test", ":: ads.test",
        "192.0.2.53 custom.test", "2001:db8::53 custom.test", "0.0.0.0 nodata.test",
        ":: nodata.test", "0.0.0.0 refused.test", ":: refused.test", "0.0.0.0 sink.test",
        ":: sink.test"]


def test_dnsmasq_lines(loaded):
    lines = list(dnsmasq(loaded, BLOCKING))
    assert left_out(lines, "#") == [
        "list empty (1 domain): action nodata has no dnsmasq equivalent",
        "list deny (1 domain): action refused has no dnsmasq equivalent",
        "list zz-same (1 domain): action nodata has no dnsmasq equivalent",
        *STAGED_LEFT_OUT, COVERED]
    assert body(lines, "#") == [
        "address=/acme.test/", "address=/ads.test/", "address=/custom.test/192.0.2.53",
        "address=/custom.test/2001:db8::53", "address=/sink.test/0.0.0.0",
        "address=/sink.test/::", "server=/ok.ads.test/#"]


def test_unbound_lines(loaded):
    lines = list(unbound(loaded, BLOCKING))
    assert left_out(lines, "#") == [*STAGED_LEFT_OUT, COVERED]
    assert body(lines, "#") == [
        "server:",
        '    local-zone: "acme.test." always_nxdomain',
        '    local-zone: "ads.test." always_nxdomain',
        '    local-zone: "custom.test." redirect',
        '    local-data: "custom.test. 60 IN A 192.0.2.53"',
        '    local-data: "custom.test. 60 IN AAAA 2001:db8::53"',
        '    local-zone: "nodata.test." always_nodata',
        '    local-zone: "refused.test." always_refuse',
        '    local-zone: "sink.test." always_null',
        '    local-zone: "ok.ads.test." always_transparent']


def test_rpz_leaves_out_names_too_long_for_the_origin(tmp_path):
    long_name = ".".join(["a" * 60] * 3) + ".test"  # 188 octets: fits alone, not with *.
    path = tmp_path / "long.yaml"
    path.write_text(f"lists:\n  - name: long\n    domains: [{long_name}, short.test]\n")
    lines = list(rpz(Loaded.read([str(path)]), BLOCKING, "x" * 60 + ".rpz.local.", None))
    assert left_out(lines, ";") == ["1 domain too long for the zone's origin"]
    assert [line.split()[0] for line in body(lines, ";")[4:]] == ["short.test", "*.short.test"]


@pytest.mark.e2e
@pytest.mark.parametrize("origin", ["rpz.local.", "policy.example.net"])
def test_named_checkzone_accepts_the_rpz(loaded, tmp_path, origin):
    checkzone = require_tool("named-checkzone")
    zone = tmp_path / "policy.rpz"
    zone.write_text("".join(f"{line}\n" for line in rpz(loaded, BLOCKING, origin, 7)))
    result = subprocess.run([checkzone, origin, str(zone)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded serial 7" in result.stdout


@pytest.mark.e2e
def test_unbound_checkconf_accepts_the_export(loaded, tmp_path):
    checkconf = require_tool("unbound-checkconf")
    config = tmp_path / "blocklist.conf"
    config.write_text("".join(f"{line}\n" for line in unbound(loaded, BLOCKING)))
    result = subprocess.run([checkconf, str(config)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
