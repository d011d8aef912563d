"""The generated reference and example config: up to date, complete, and valid as config."""

from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from resolver.ops import configdoc
from resolver.ops.config import (
    Address,
    BlockingConfig,
    CacheConfig,
    ConditionalForward,
    Config,
    MetricsConfig,
    RateLimitConfig,
    ServerConfig,
    UpstreamConfig,
    UpstreamServer,
    load_config,
)
from resolver.ops.schema import keys

REPO = Path(__file__).resolve().parent.parent
NO_RESOLV_CONF = "/nonexistent/resolv.conf"
SECTIONS = (ServerConfig, UpstreamConfig, BlockingConfig, CacheConfig, MetricsConfig,
            RateLimitConfig)
# Fields that are not keys of the file: where the config came from, and the port an upstream's
# `address` fills along with its host.
UNDECLARED = {(Config, "source"), (UpstreamServer, "port")}


@pytest.mark.parametrize("path, generate", [
    (configdoc.REFERENCE, configdoc.reference),
    (configdoc.EXAMPLE, configdoc.example_config),
])
def test_committed_copy_is_up_to_date(path, generate):
    committed = (REPO / path).read_text(encoding="utf-8")
    assert committed == generate(), (
        f"{path} differs from the declarations in resolver/ops/config.py; regenerate it with "
        f"`{configdoc.COMMANDS[path]}`")


@pytest.mark.parametrize("cls", [Config, *SECTIONS, UpstreamServer, ConditionalForward])
def test_every_field_is_a_declared_key(cls):
    declared = {key.attribute for key in keys(cls)}
    for field in fields(cls):
        assert (field.name in declared) != ((cls, field.name) in UNDECLARED), field.name


@pytest.mark.parametrize("cls", SECTIONS)
def test_every_key_is_in_the_reference_and_the_example(cls):
    [section] = [key for key in keys(Config) if type(key.default) is cls]
    reference, example = configdoc.reference(), configdoc.example_config()
    for key in keys(cls):
        assert f"| `{section.name}.{key.name}` |" in reference
        assert f"{key.name}: " in example


def test_nested_keys_are_in_the_reference():
    reference = configdoc.reference()
    for path, cls in (("upstream.servers[i]", UpstreamServer),
                      ("upstream.conditional[i]", ConditionalForward)):
        for key in keys(cls):
            assert f"| `{path}.{key.name}` |" in reference


def test_required_keys_have_no_default():
    for cls in (UpstreamServer, ConditionalForward):
        for key in keys(cls):
            assert (key.default is MISSING) == (key.setting.shown == "required"), key.name


@pytest.mark.parametrize("section", [key for key in keys(Config) if configdoc.examples(key)],
                         ids=lambda key: key.name)
def test_examples_are_valid_config(tmp_path, monkeypatch, section):
    monkeypatch.chdir(tmp_path)
    example = configdoc.examples(section)
    assert example is not None  # the parameters are the sections with examples
    Path("c.yaml").write_text(example, encoding="utf-8")
    loaded = getattr(load_config("c.yaml", resolv_conf=NO_RESOLV_CONF), section.name)
    assert loaded != section.default


def test_the_reference_holds_no_path_of_this_machine():
    assert str(REPO) not in configdoc.reference()
    assert str(REPO) not in configdoc.example_config()


@pytest.mark.parametrize("value, text", [
    (Address("127.0.0.1", 1053), '"127.0.0.1:1053"'),
    (Address("::1", 53), '"[::1]:53"'),
    ((Address("127.0.0.1", 53), Address("::", 53)), '["127.0.0.1:53", "[::]:53"]'),
    ((), "[]"),
    ("failover", "failover"),
    ("resolver.invalid", "resolver.invalid"),
    ("yes", '"yes"'),  # YAML would read a plain yes as true
    ("1.0", '"1.0"'),
    (" padded", '" padded"'),
    (True, "true"),
    (None, "null"),
    (10.0, "10.0"),
    (0.1, "0.1"),
    (134217728, "134217728"),
])
def test_yaml_value(value, text):
    assert configdoc.yaml_value(value) == text


@pytest.mark.parametrize("argv, output", [
    ([], configdoc.reference),
    (["--example"], configdoc.example_config),
])
def test_main_prints_the_document(capsys, argv, output):
    assert configdoc.main(argv) == 0
    assert capsys.readouterr().out == output()


def test_main_refuses_other_arguments(capsys):
    assert configdoc.main(["--bogus"]) == 2
    assert configdoc.COMMANDS[configdoc.EXAMPLE] in capsys.readouterr().err
