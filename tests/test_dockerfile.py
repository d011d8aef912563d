"""The Dockerfile, checked without Docker (it cannot run here, nor pull a base image).

What a build would find out first is checked by doing what the build does with the same
files: each stage's COPY instructions are carried out into a temporary directory from the
build context as .dockerignore leaves it, then the build stage's copy builds the wheel and the
image's copy loads its config and rules. The rest is read off the instructions: the entry
point is the console script under tini, the user is not root, and the exposed ports and the
health check are the ones the image's config listens on. tests/test_wheel.py proves that the
wheel installs and serves, which is what the image's install step does.

dockerfile-parse (a test dependency) splits the file into instructions: line continuations,
comments and parser directives are its business, and it is what build tools built on Python
use. What an instruction's arguments mean (exec form, flags, COPY's destination rules) is
Docker's, and is read here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from dockerfile_parse import DockerfileParser

from resolver.ops.config import Config, MetricsConfig, load_config
from resolver.rules.loader import load_rules
from tests.test_wheel import SHIPPED, pip

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HEALTH_PATH = "/healthz"


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case: COPY, RUN, ...
    value: str  # the arguments as written, continuation lines joined

    def words(self) -> list[str]:
        """The arguments: the JSON array of the exec form, or the shell form's words."""
        if self.value.lstrip().startswith("["):
            words: list[str] = json.loads(self.value)
            return words
        return shlex.split(self.value)


@dataclass(frozen=True)
class Stage:
    name: str | None  # FROM ... AS name
    instructions: tuple[Instruction, ...]

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction:
        found = self.all(name)
        assert found, f"the stage has no {name}"
        return found[-1]


def stages() -> list[Stage]:
    """The Dockerfile's stages in order, each with the instructions after its FROM."""
    found: list[tuple[str | None, list[Instruction]]] = []
    for item in DockerfileParser(str(DOCKERFILE)).structure:
        instruction = Instruction(item["instruction"], item["value"])
        if instruction.name == "FROM":
            words = instruction.words()
            found.append((words[2] if len(words) == 3 and words[1].upper() == "AS" else None, []))
        elif instruction.name != "COMMENT" and found:
            found[-1][1].append(instruction)
    return [Stage(name, tuple(instructions)) for name, instructions in found]


def image() -> Stage:
    return stages()[-1]


def image_user() -> tuple[int, int]:
    """The image's numeric user and group (USER uid:gid); tests/test_kubernetes.py runs the
    pods as this user."""
    uid, _, gid = image().last("USER").value.partition(":")
    return int(uid), int(gid)


# --- the build context ------------------------------------------------------------------------


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (is an exception `!`, pattern): Go's filepath.Match patterns, `**`
    for any number of directories, each line cleaned and relative to the context root."""
    rules = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((exception, re.compile(_glob(pattern))))
    return rules


def _glob(pattern: str) -> str:
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
    wild = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return "".join(wild.get(part, re.escape(part)) for part in parts)


def in_context(path: str) -> bool:
    """Whether Docker sends this file (relative to the repository) to the build: the last
    rule matching the path or one of its parent directories decides."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    sent = True
    for exception, pattern in ignore_rules():
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            sent = exception
    return sent


def context_files(source: str) -> list[str]:
    """The files a COPY source stands for, as the build context holds them."""
    path = ROOT / source
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    names = [p.relative_to(ROOT).as_posix() for p in files]
    return sorted(name for name in names if in_context(name))


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    destination: str
    stage: str | None  # --from=STAGE, or None for the build context


def copies(stage: Stage) -> list[tuple[str, Copy]]:
    """Each COPY of the stage with the WORKDIR it runs in."""
    workdir, found = "/", []
    for instruction in stage.instructions:
        if instruction.name == "WORKDIR":
            workdir = str(PurePosixPath(workdir, instruction.value))
        elif instruction.name == "COPY":
            words = instruction.words()
            flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
            paths = [w for w in words if not w.startswith("--")]
            found.append((workdir, Copy(tuple(paths[:-1]), paths[-1], flags.get("from"))))
    return found


def carry_out(stage: Stage, root: Path) -> None:
    """Do the stage's COPY instructions from the build context into root, as Docker does:
    a directory's contents go into the destination; a file goes into a destination ending
    in / (or taking several sources), else becomes it."""
    for workdir, copy in copies(stage):
        assert copy.stage is None, "only copies from the build context can be carried out"
        destination = PurePosixPath(workdir, copy.destination)
        into = root / destination.relative_to("/")
        for source in copy.sources:
            for name in context_files(source):
                if (ROOT / source).is_dir():
                    target = into / PurePosixPath(name).relative_to(source.rstrip("/"))
                elif copy.destination.endswith("/") or len(copy.sources) > 1:
                    target = into / PurePosixPath(name).name
                else:
                    target = into
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / name, target)


# --- the tests --------------------------------------------------------------------------------


def test_every_copy_source_is_in_the_build_context() -> None:
    named = {stage.name for stage in stages()}
    for stage in stages():
        for _, copy in copies(stage):
            if copy.stage is not None:
                assert copy.stage in named, f"COPY --from={copy.stage}: no such stage"
                continue
            for source in copy.sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert context_files(source), f"COPY {source}: left out by .dockerignore"


def test_dockerignore_leaves_out_caches_and_everything_not_copied() -> None:
    assert in_context("resolver/cli.py")
    assert not in_context("resolver/__pycache__/cli.cpython-311.pyc")
    assert not in_context("tests/test_dockerfile.py")
    assert not in_context(".venv/bin/python")
    assert not in_context("deploy/kubernetes/base/deployment.yaml")


@pytest.mark.e2e  # runs pip
def test_the_build_stage_builds_the_wheel_with_every_module(tmp_path: Path) -> None:
    build, = (stage for stage in stages() if stage.name == "build")
    carry_out(build, tmp_path)
    workdir = build.last("WORKDIR").value
    pip("wheel", "--no-deps", "--wheel-dir", tmp_path / "dist", tmp_path / workdir.lstrip("/"))
    wheel, = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "resolver").rglob("*.py")}
    assert modules - names == set()
    assert set(SHIPPED.values()) <= names


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The image's config, loaded from a copy of the files the image holds."""
    carry_out(image(), tmp_path)
    return load_config(str(tmp_path / image_config().relative_to("/")))


def test_the_image_config_loads_with_the_shipped_rules(config: Config) -> None:
    rules = load_rules(config.blocking.rules)
    assert rules.counts == load_rules([str(ROOT / "rules" / "exchanges.yaml")]).counts
    assert {(a.host, a.port) for a in config.server.listen} == {("0.0.0.0", 53)}
    assert config.metrics.listen is not None and config.metrics.listen.host == "0.0.0.0"


def image_config() -> PurePosixPath:
    """The config file the image serves with: CMD's -c."""
    words = image().last("CMD").words()
    assert words[:1] == ["serve"] and "-c" in words, words
    return PurePosixPath(words[words.index("-c") + 1])


def test_the_entrypoint_runs_the_console_script_under_tini() -> None:
    stage = image()
    tini, separator, script = stage.last("ENTRYPOINT").words()
    assert (PurePosixPath(tini).name, separator) == ("tini", "--")
    assert any("tini" in shlex.split(run.value) for run in stage.all("RUN")), "install tini"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    script_path = PurePosixPath(script)
    assert script_path.name in scripts["project"]["scripts"]
    assert script_path.parent.name == "bin"
    venv = str(script_path.parent.parent)
    assert any(f"venv --without-pip {venv}" in run.value for run in stage.all("RUN"))


def test_the_image_runs_as_a_user_not_root() -> None:
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    creates = " ".join(run.value for run in image().all("RUN"))
    assert f"--uid {uid}" in creates and f"--gid {gid}" in creates, "create the user"


def test_the_exposed_ports_are_the_ports_the_config_listens_on(config: Config) -> None:
    assert config.metrics.listen is not None
    expected = {f"{a.port}/{protocol}" for a in config.server.listen for protocol in ("udp", "tcp")}
    expected.add(f"{config.metrics.listen.port}/tcp")
    exposed = {word for expose in image().all("EXPOSE") for word in expose.words()}
    assert exposed == expected
    # the standard port for DNS, and the metrics port every default points at
    default = MetricsConfig().listen
    assert default is not None and config.metrics.listen.port == default.port
    assert {a.port for a in config.server.listen} == {53}


def test_the_health_check_asks_healthz_on_the_metrics_port(config: Config) -> None:
    assert config.metrics.listen is not None
    check = image().last("HEALTHCHECK").value
    command = json.loads(check[check.index("CMD") + 3:])
    python, script = PurePosixPath(command[0]), command[-1]
    _, _, entry_script = image().last("ENTRYPOINT").words()
    assert python.parent == PurePosixPath(entry_script).parent  # the image's virtualenv
    url = re.search(r"'(http://[^']+)'", script)
    assert url, script
    assert url.group(1) == f"http://127.0.0.1:{config.metrics.listen.port}{HEALTH_PATH}"
