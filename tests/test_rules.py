"""Table tests for resolver/rules.py: matching, file formats, error messages, the shipped list."""

import csv
import importlib.util
import textwrap
from pathlib import Path

import pytest
import yaml

from resolver.message.names import to_wire
from resolver.ops.errors import ConfigError
from resolver.ops.yamlnodes import YamlLoader
from resolver.rules.loader import load_rules
from resolver.rules.matcher import RuleSet
from resolver.rules.model import Rule, RuleList

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "rules" / "exchanges.yaml"
TSV = ROOT / "rules" / "sources" / "offshore-exchanges-2018.tsv"

MATCHER_RULES = """\
lists:
  - name: first
    entries:
      - id: shop
        name: Example Shop
        domains: [example.org, bücher.example]
      - example.com
      - dup.test
      - blocked.example.net
  - name: specific
    action: refused
    domains: [deep.example.com, dup.test, www.allowed.test]
  - name: allowed
    action: allow
    domains: [allowed.test, www.example.org, blocked.example.net]
"""


def write(directory: Path, name: str, text: str) -> Path:
    """Write a rule file, dedented so the tables can indent it with the code."""
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ruleset(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    return load_rules([str(write(tmp_path_factory.mktemp("rules"), "rules.yaml", MATCHER_RULES))])


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("example.org", ("first", "shop", "Example Shop", "example.org")),  # apex
        ("a.b.c.example.org", ("first", "shop", "Example Shop", "example.org")),  # deep subdomain
        ("notexample.org", None),  # label boundary
        ("org", None),  # a parent of a rule is not blocked
        ("Mail.EXAMPLE.org", ("first", "shop", "Example Shop", "example.org")),  # case
        ("example.org.", ("first", "shop", "Example Shop", "example.org")),  # trailing dot
        ("www.bücher.example", ("first", "shop", "Example Shop", "xn--bcher-kva.example")),
        ("xn--bcher-kva.example", ("first", "shop", "Example Shop", "xn--bcher-kva.example")),
        ("example.com", ("first", "", "", "example.com")),  # plain entry
        ("deep.example.com", ("specific", "", "", "deep.example.com")),  # most specific wins
        ("x.deep.example.com", ("specific", "", "", "deep.example.com")),
        ("dup.test", ("first", "", "", "dup.test")),  # first list by name wins a duplicate
        ("www.example.org", None),  # allow below a block
        ("a.www.example.org", None),
        ("www.allowed.test", None),  # allow wins over a more specific block
        ("a.www.allowed.test", None),
        ("blocked.example.net", None),  # allow wins over the same domain blocked
        ("example.net", None),
    ],
)
def test_match(ruleset: RuleSet, query: str, expected: tuple[str, str, str, str] | None) -> None:
    found = ruleset.match(query)
    if found is None:
        assert expected is None
    else:
        rule, matched = found
        assert (rule.list.name, rule.entry_id, rule.entry_name, matched) == expected


@pytest.mark.parametrize(
    ("wire", "offsets", "expected"),
    [
        (b"\x04mail\x07example\x03org\x00", (0, 5, 13), ("first", 5)),
        (b"\x01x\x04deep\x07example\x03com\x00", (0, 2, 7, 15), ("specific", 2)),
        (b"\x04mail\x07example\x03org\x00", (5, 13), ("first", 5)),
        (b"\x04mail\x07example\x03org\x00", (13,), None),
        (b"\x03www\x07example\x03org\x00", (0, 4, 12), None),
        (b"\x03www\x07allowed\x04test\x00", (0, 4, 12), None),
    ],
)
def test_lookup(
    ruleset: RuleSet, wire: bytes, offsets: tuple[int, ...], expected: tuple[str, int] | None
) -> None:
    found = ruleset.lookup(wire, offsets)
    assert (None if found is None else (found[0].list.name, found[1])) == expected


def test_ruleset_summary(ruleset: RuleSet) -> None:
    assert [(each.name, each.action) for each in ruleset.lists] == [
        ("first", "nxdomain"),
        ("specific", "refused"),
        ("allowed", "allow"),
    ]
    # Distinct blocked domains: 5 in 'first', plus deep.example.com and www.allowed.test.
    assert ruleset.domain_count == 7


@pytest.mark.parametrize("attribute", ["lists", "domain_count", "_get", "other"])
def test_ruleset_is_immutable(ruleset: RuleSet, attribute: str) -> None:
    with pytest.raises(AttributeError):
        setattr(ruleset, attribute, None)


def test_ruleset_built_in_code() -> None:
    """The constructor takes wire names in load order, for callers that build sets directly."""
    block, allow = RuleList("block"), RuleList("allow", action="allow")
    pairs = [(to_wire("a.test"), Rule(block)), (to_wire("b.a.test"), Rule(allow))]
    rules = RuleSet([block, allow], pairs)
    assert rules.match("x.a.test") == (Rule(block), "a.test")
    assert rules.match("x.b.a.test") is None


@pytest.mark.parametrize(
    ("domains", "query", "matched"),
    [
        (["test"], "a.test", "test"),  # a one-label rule
        (["test", "a.b.c.d.test"], "x.a.b.c.d.test", "a.b.c.d.test"),
        (["test", "a.b.c.d.test"], "x.b.c.d.test", "test"),
        (["a.b.c.test"], "b.c.test", None),  # fewer labels than any rule
        (["a.a"], ".".join(["a"] * 127), "a.a"),  # 127 labels, the most a name can have
        (["b.a", "a.a.a.a.b"], ".".join(["a"] * 127), None),
        ([], "example.org", None),
    ],
)
def test_rule_depths(domains: list[str], query: str, matched: str | None) -> None:
    """Lookup only tries suffixes as deep as some rule; every depth must still be reachable."""
    block = RuleList("block")
    rules = RuleSet([block], [(to_wire(domain), Rule(block)) for domain in domains])
    assert rules.match(query) == (None if matched is None else (Rule(block), matched))


def test_rule_list_rejects_unknown_action() -> None:
    with pytest.raises(ValueError) as raised:
        RuleList("x", action="block")
    assert str(raised.value) == "'block' is not one of nxdomain, sinkhole, nodata, refused, allow"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ("", ("nxdomain", ("0.0.0.0",), ("::",), None)),
        ("action: nodata\nttl: 60", ("nodata", ("0.0.0.0",), ("::",), 60)),
        ("action: refused\nttl: 2147483647", ("refused", ("0.0.0.0",), ("::",), 2147483647)),
        ("action: sinkhole", ("sinkhole", ("0.0.0.0",), ("::",), None)),
        ("action: sinkhole\nsinkhole: 192.0.2.1", ("sinkhole", ("192.0.2.1",), ("::",), None)),
        (
            'action: sinkhole\nsinkhole: [192.0.2.1, "2001:DB8:0::1", 192.0.2.2]\nttl: 0',
            ("sinkhole", ("192.0.2.1", "192.0.2.2"), ("2001:db8::1",), 0),
        ),
        ('action: sinkhole\nsinkhole: ["::1"]', ("sinkhole", ("0.0.0.0",), ("::1",), None)),
    ],
)
def test_list_settings(tmp_path: Path, settings: str,
                       expected: tuple[str, tuple[str, ...], tuple[str, ...], int | None]) -> None:
    indented = textwrap.indent(settings, "    ")
    path = write(tmp_path, "l.yaml", f"lists:\n  - name: l\n{indented}\n    domains: [a.test]\n")
    rule_list = load_rules([str(path)]).lists[0]
    got = (rule_list.action, rule_list.sinkhole_v4, rule_list.sinkhole_v6, rule_list.ttl)
    assert got == expected
    assert rule_list.source == str(path)


@pytest.mark.parametrize(
    ("text", "query", "matched"),
    [
        ("a.test\nb.test\n", "a.test", "a.test"),
        ("a.test\nb.test\n", "x.b.test", "b.test"),
        ("a.test\nb.test\n", "c.test", None),
        ("# header\n\n  a.test  \nb.test # trailing comment\n", "b.test", "b.test"),
        ("# header\n\n  a.test  \nb.test # trailing comment\n", "header", None),
        ("A.Test.\r\nbücher.test\r\n", "a.test", "a.test"),
        ("A.Test.\r\nbücher.test\r\n", "www.bücher.test", "xn--bcher-kva.test"),
        ("", "a.test", None),
    ],
)
def test_plain_text_file(tmp_path: Path, text: str, query: str, matched: str | None) -> None:
    rules = load_rules([str(write(tmp_path, "ads.txt", text))])
    assert [(each.name, each.action) for each in rules.lists] == [("ads", "nxdomain")]
    assert rules.match(query) == (None if matched is None else (Rule(rules.lists[0]), matched))


@pytest.mark.parametrize(
    ("files", "expected_lists", "dup_owner"),
    [
        ({"b.txt": "dup.test\n", "a.list": "dup.test\n"}, ["a", "b"], "a"),
        ({"z.yml": "lists: [{name: z, domains: [dup.test]}]", "y.txt": "dup.test"},
         ["y", "z"], "y"),
        ({"b.yaml": "lists: [{name: b, domains: [dup.test]}]", "README.md": "not rules"},
         ["b"], "b"),
        ({"notes.conf": "x\n", "a.txt": "dup.test\n"}, ["a"], "a"),
        ({"empty.yaml": "# nothing yet\n", "a.txt": "dup.test\n"}, ["a"], "a"),
    ],
)
def test_directory(
    tmp_path: Path, files: dict[str, str], expected_lists: list[str], dup_owner: str
) -> None:
    for name, text in files.items():
        write(tmp_path, name, text)
    (tmp_path / "nested").mkdir()
    write(tmp_path / "nested", "0.txt", "dup.test\n")  # not loaded: directories are not recursed
    rules = load_rules([str(tmp_path)])
    assert [rule_list.name for rule_list in rules.lists] == expected_lists
    assert matching_list(rules, "dup.test") == dup_owner


def matching_list(rules: RuleSet, name: str) -> str:
    """The name of the list whose rule matches name, which one must."""
    found = rules.match(name)
    assert found is not None, f"no rule matches {name}"
    return found[0].list.name


def test_the_same_domain_in_two_lists_goes_to_the_first_list_by_name(tmp_path: Path) -> None:
    """Not the list loaded first: the version ignores the files' order, so what the rules do
    must not depend on it either."""
    late, early = write(tmp_path, "a.txt", "dup.test\n"), write(tmp_path, "b.txt", "dup.test\n")
    assert matching_list(load_rules([str(early), str(late)]), "dup.test") == "a"
    assert matching_list(load_rules([str(late), str(early)]), "dup.test") == "a"


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        (  # bad name, with its line
            """\
            lists:
              - name: l
                domains:
                  - good.test
                  - bad..test
            """,
            ["{path}:5: 'bad..test' is not a valid name: empty label"],
        ),
        (
            """\
            lists:
              - name: l
                entries:
                  - id: e
                    domains: ["*.example.org"]
            """,
            ["{path}:5: '*.example.org' is not a valid name: bad character '*'"],
        ),
        (  # unknown keys, named by their dotted path
            """\
            lists:
              - name: l
                actoin: refused
                entries:
                  - id: e
                    domains: [a.test]
                    countries: [FR]
            version: 2
            """,
            [
                "{path}:3: lists[0].actoin: unknown key",
                "{path}:7: lists[0].entries[0].countries: unknown key",
                "{path}:8: version: unknown key",
            ],
        ),
        (
            "lists:\n  - name: l\n    action: block\n",
            ["{path}:3: lists[0].action: 'block' is not one of nxdomain, sinkhole, nodata, "
             "refused, allow"],
        ),
        (
            "lists:\n  - name: l\n    action: [nxdomain]\n",
            ["{path}:3: lists[0].action: expected a string, got a list"],
        ),
        (
            "lists:\n  - name: l\n  - name: m\n  - name: l\n",
            ["{path}:4: lists[2].name: duplicate list name 'l' (first at {path}:2)"],
        ),
        (
            "lists:\n  - name: l\n  - action: nodata\n    domains: [a.test, b..test]\n",
            [
                "{path}:3: lists[1].name: required key is missing",
                "{path}:4: 'b..test' is not a valid name: empty label",
            ],
        ),
        (
            "lists:\n  - name: Big List\n",
            ["{path}:2: lists[0].name: 'Big List' is not a valid list name "
             "(use only a-z 0-9 _ . -)"],
        ),
        ("lists:\n  - name: 7\n", ["{path}:2: lists[0].name: expected a string, got a number (7)"]),
        (  # YAML syntax error, with the line
            "lists:\n  - name: l\n    domains\n    action: nodata\n",
            ["{path}:4: YAML syntax error: while scanning a simple key, "
             "could not find expected ':'"],
        ),
        (
            'lists:\n  - name: "l\n',
            ["{path}:3: YAML syntax error: while scanning a quoted scalar, "
             "found unexpected end of stream"],
        ),
        (  # entries that are neither strings nor mappings
            """\
            lists:
              - name: l
                entries:
                  - 42
                  - [a.test]
                  - null
                  - yes
            """,
            [
                "{path}:4: lists[0].entries[0]: expected a domain name or a mapping with id "
                "and domains, got a number (42)",
                "{path}:5: lists[0].entries[1]: expected a domain name or a mapping with id "
                "and domains, got a list",
                "{path}:6: lists[0].entries[2]: expected a domain name or a mapping with id "
                "and domains, got nothing",
                "{path}:7: lists[0].entries[3]: expected a domain name or a mapping with id "
                "and domains, got a boolean (yes)",
            ],
        ),
        (
            "lists:\n  - name: l\n    domains: [no, {a: b}]\n",
            [
                "{path}:3: lists[0].domains[0]: expected a domain name, got a boolean (no)",
                "{path}:3: lists[0].domains[1]: expected a domain name, got a mapping",
            ],
        ),
        (
            "lists:\n  - name: l\n    entries: a.test\n",
            ["{path}:3: lists[0].entries: expected a list, got a string (a.test)"],
        ),
        (  # one mistake, one message: the addresses are not also blamed on the action
            "lists:\n  - name: l\n    action: bogus\n    sinkhole: [192.0.2.1]\n",
            ["{path}:3: lists[0].action: 'bogus' is not one of nxdomain, sinkhole, nodata, "
             "refused, allow"],
        ),
        (  # one mistake, one message: not also "expected at least one domain"
            "lists:\n  - name: l\n    entries:\n      - id: x\n        domains: a.test\n",
            ["{path}:5: lists[0].entries[0].domains: expected a list, got a string (a.test)"],
        ),
        (  # sinkhole address invalid
            "lists:\n  - name: l\n    action: sinkhole\n    sinkhole: [192.0.2.1, 192.0.2.300]\n",
            ["{path}:4: lists[0].sinkhole[1]: '192.0.2.300' is not an IP address"],
        ),
        (
            "lists:\n  - name: l\n    action: sinkhole\n    sinkhole: example.org\n",
            ["{path}:4: lists[0].sinkhole: 'example.org' is not an IP address"],
        ),
        (
            "lists:\n  - name: l\n    action: sinkhole\n    sinkhole: []\n",
            ["{path}:4: lists[0].sinkhole: expected at least one address"],
        ),
        (  # sinkhole given for another action, including the default one
            "lists:\n  - name: l\n    sinkhole: 192.0.2.1\n",
            ["{path}:3: lists[0].sinkhole: only allowed with action sinkhole"],
        ),
        (
            "lists:\n  - name: l\n    action: nodata\n    sinkhole: [192.0.2.1]\n",
            ["{path}:4: lists[0].sinkhole: only allowed with action sinkhole"],
        ),
        (
            "lists:\n  - name: l\n    ttl: -1\n",
            ["{path}:3: lists[0].ttl: expected whole seconds 0 to 2147483647, got a number (-1)"],
        ),
        (
            "lists:\n  - name: l\n    ttl: 2147483648\n",
            ["{path}:3: lists[0].ttl: expected whole seconds 0 to 2147483647, "
             "got a number (2147483648)"],
        ),
        (
            "lists:\n  - name: l\n    ttl: 1.5\n",
            ["{path}:3: lists[0].ttl: expected whole seconds 0 to 2147483647, got a number (1.5)"],
        ),
        (
            "lists:\n  - name: l\n    ttl: '60'\n",
            ["{path}:3: lists[0].ttl: expected whole seconds 0 to 2147483647, got a string (60)"],
        ),
        (
            "lists:\n  - name: l\n    action: allow\n    ttl: 60\n",
            ["{path}:4: lists[0].ttl: not used with action allow"],
        ),
        (
            "lists:\n  - name: l\n    description: [x]\n",
            ["{path}:3: lists[0].description: expected a string, got a list"],
        ),
        (
            """\
            lists:
              - name: l
                entries:
                  - id: e
                    domains: [a.test]
                  - id: e
                    domains: [b.test]
                  - id: Upper
                    name: 3
                    domains: []
                  - name: no id
            """,
            [
                "{path}:6: lists[0].entries[1].id: duplicate id 'e' (first at line 4)",
                "{path}:8: lists[0].entries[2].id: 'Upper' is not a valid id "
                "(use only a-z 0-9 _ . -)",
                "{path}:9: lists[0].entries[2].name: expected a string, got a number (3)",
                "{path}:10: lists[0].entries[2].domains: expected at least one domain",
                "{path}:11: lists[0].entries[3].id: required key is missing",
                "{path}:11: lists[0].entries[3].domains: required key is missing",
            ],
        ),
        ("lists:\n  - name: l\n    name: m\n", ["{path}:3: lists[0].name: duplicate key"]),
        ("- a.test\n", ["{path}:1: expected a mapping, got a list"]),
        ("lists: a.test\n", ["{path}:1: lists: expected a list, got a string (a.test)"]),
        ("other: 1\n",
         ["{path}:1: other: unknown key", "{path}:1: lists: required key is missing"]),
        ("lists:\n  - [a.test]\n", ["{path}:2: lists[0]: expected a mapping, got a list"]),
        ("lists:\n  - name: l\n    [a]: 1\n",
         ["{path}:3: lists[0]: expected a string key, got a list"]),
    ],
)
@pytest.mark.parametrize("loader", [yaml.SafeLoader, yaml.CSafeLoader], ids=["python", "libyaml"])
def test_yaml_errors(tmp_path: Path, loader: YamlLoader, text: str, problems: list[str]) -> None:
    """Both parsers give the same messages, so the checks hold with or without libyaml."""
    path = write(tmp_path, "rules.yaml", text)
    with pytest.raises(ConfigError) as raised:
        load_rules([str(path)], yaml_loader=loader)
    assert raised.value.problems == [problem.format(path=path) for problem in problems]


@pytest.mark.parametrize(
    ("files", "problems"),
    [
        (
            {"ads.txt": "a.test\n\nbad..test  # comment\n*.b.test\n"},
            [
                "{dir}/ads.txt:3: 'bad..test' is not a valid name: empty label",
                "{dir}/ads.txt:4: '*.b.test' is not a valid name: bad character '*'",
            ],
        ),
        (
            {"hosts.txt": "0.0.0.0 a.test\n"},
            ["{dir}/hosts.txt:1: '0.0.0.0 a.test' is not a valid name: bad character ' '"],
        ),
        (
            {"My Ads.txt": "a.test\n"},
            ["{dir}/My Ads.txt: 'My Ads' is not a valid list name (use only a-z 0-9 _ . -)"],
        ),
        (
            {"a.yaml": "lists:\n  - name: ads\n", "ads.txt": "a.test\n"},
            ["{dir}/ads.txt: duplicate list name 'ads' (first at {dir}/a.yaml:2)"],
        ),
        (
            {"a.yaml": "lists:\n  - name: x\n", "b.yaml": "# b\nlists:\n  - name: x\n"},
            ["{dir}/b.yaml:3: lists[0].name: duplicate list name 'x' (first at {dir}/a.yaml:2)"],
        ),
        (  # every file is checked, so one run reports everything
            {"a.yaml": 'lists: "\n', "b.txt": "b..test",
             "c.yaml": "lists:\n  - name: c\n    ttl: x"},
            [
                "{dir}/a.yaml:2: YAML syntax error: while scanning a quoted scalar, found "
                "unexpected end of stream",
                "{dir}/b.txt:1: 'b..test' is not a valid name: empty label",
                "{dir}/c.yaml:3: lists[0].ttl: expected whole seconds 0 to 2147483647, "
                "got a string (x)",
            ],
        ),
    ],
)
def test_directory_errors(tmp_path: Path, files: dict[str, str], problems: list[str]) -> None:
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(ConfigError) as raised:
        load_rules([str(tmp_path)])
    assert raised.value.problems == [problem.format(dir=tmp_path) for problem in problems]


def test_unreadable_paths(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes(b"a.test\nb\xe9.test\n")
    missing = tmp_path / "missing.yaml"
    too_long = tmp_path / ("a" * 300 + ".yaml")  # the OS refuses even to look it up
    with pytest.raises(ConfigError) as raised:
        load_rules([str(missing), str(tmp_path / "latin1.txt"), str(too_long)])
    assert raised.value.problems == [
        f"{missing}: no such file or directory",
        f"{too_long}: cannot read: File name too long",
        f"{tmp_path}/latin1.txt: not UTF-8 text (byte 8)",
    ]


def load_build_tool():
    """tools/ is not a package; load the generator from its file as the test of record."""
    path = ROOT / "tools" / "build_exchanges.py"
    spec = importlib.util.spec_from_file_location("build_exchanges", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tsv_rows() -> list[dict[str, str]]:
    """Read the TSV independently of the generator, with the csv module."""
    lines = TSV.read_text(encoding="utf-8").splitlines()
    lines = [line for line in lines if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


def test_shipped_list_matches_tsv() -> None:
    rows = tsv_rows()
    assert len(rows) == 124
    assert len({row["id"] for row in rows}) == 124
    domains = [domain for row in rows for domain in row["domains"].split()]
    assert len(domains) == len(set(domains)) == 134

    rules = load_rules([str(SHIPPED)])
    assert [(each.name, each.action) for each in rules.lists] == [("exchanges", "nxdomain")]
    assert rules.domain_count == 134
    found = {}
    for row in rows:
        for domain in row["domains"].split():
            found_rule = rules.match("www." + domain)
            assert found_rule is not None, domain
            rule, matched = found_rule
            assert matched == domain
            found[rule.entry_id] = rule.entry_name
    assert found == {row["id"]: row["name"] for row in rows}


def test_shipped_list_is_generated() -> None:
    tool = load_build_tool()
    assert tool.render(TSV.read_text(encoding="utf-8")).encode("utf-8") == SHIPPED.read_bytes()


def test_shipped_list_header() -> None:
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    text = " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))
    assert "August 2018" in text and "124 offshore" in text and "never published" in text
    assert "ccxt 1.17.1" in text  # how the list was assembled, from the TSV header
    source = "rules/sources/offshore-exchanges-2018.tsv"
    assert f"Generated by tools/build_exchanges.py from {source}" in text


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("lists:\n  - name: a\n    domains: [b.example, c.example]\n", "b.example"),
    ("lists:\n  - name: a\n    action: allow\n    domains: [b.example]\n", None),
    ("lists:\n  - name: a\n    action: allow\n    domains: [b.example]\n"
     "  - name: c\n    domains: [x.b.example, d.example]\n", "d.example"),
])
def test_example_domain_is_a_domain_that_blocks(tmp_path, yaml_text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(yaml_text)
    assert load_rules([str(path)]).example_domain() == expected
