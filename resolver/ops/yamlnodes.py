"""What the two strict YAML readers, config.py and rules.py, share about walking node trees.

Both compose files into nodes (so every value keeps its line) and report every problem at once
as 'file:line: dotted.path: what is wrong'. Reading a mapping against its known keys (unknown
and duplicate keys, dotted key paths) and that message form were written twice with different
error plumbing, so they live here once; what a value means, and how other problems are worded,
stays with each reader.
"""

from collections.abc import Callable, Container, Iterator
from typing import TypeAlias

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Report = Callable[[Node, str, str], None]  # records (node for the line, dotted path, message)
# A safe loader class: pure Python, or libyaml's (a string: PyYAML built without libyaml has
# no CSafeLoader).
YamlLoader: TypeAlias = "type[yaml.SafeLoader] | type[yaml.CSafeLoader]"

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
NULL = "tag:yaml.org,2002:null"
_SCALAR_KINDS = {"tag:yaml.org,2002:bool": "a boolean", INT: "a number",
                 "tag:yaml.org,2002:float": "a number"}


def line_of(node: Node) -> int:
    """1-based line where a node starts, as editors number them."""
    return node.start_mark.line + 1


def dotted(path: str, key: str) -> str:
    """The path of key in the mapping at path; a file's top mapping has the path ''."""
    return f"{path}.{key}" if path else key


def problem_text(location: str, path: str, message: str) -> str:
    """'file:line: key.path: message', leaving out the key path when there is none."""
    return f"{location}: {path}: {message}" if path else f"{location}: {message}"


def kind_of(node: Node) -> str:
    """What the user wrote instead, in their words: 'a list', 'a boolean (yes)'."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == NULL:
        return "nothing"
    return f"{_SCALAR_KINDS.get(node.tag, 'a string')} ({node.value})"


def string_key(node: Node) -> str | None:
    """Keys are written as plain strings; a bare 300, yes or a list is not one."""
    if isinstance(node, ScalarNode) and node.tag == STR:
        return None
    return f"expected a string key, got {kind_of(node)}"


def known_keys(
    node: MappingNode,
    path: str,
    allowed: Container[str],
    report: Report,
) -> Iterator[tuple[str, str, Node]]:
    """(key, dotted path, value node) for each allowed key, in file order; reports an unknown
    or repeated key (the first one stands) at the key, and a key that is not a plain string
    at the mapping's own path.

    A generator, so a reader that reads each value as it comes reports in the same order.
    """
    seen: set[str] = set()
    for key_node, value_node in node.value:
        problem = string_key(key_node)
        if problem:
            report(key_node, path, problem)
            continue
        key = str(key_node.value)
        key_path = dotted(path, key)
        if key not in allowed:
            report(key_node, key_path, "unknown key")
        elif key in seen:
            report(key_node, key_path, "duplicate key")
        else:
            seen.add(key)
            yield key, key_path, value_node


def compose(path: str, text: str, loader: YamlLoader = yaml.SafeLoader
            ) -> tuple[Node | None, str | None]:
    """The file's node tree (None for an empty file), or its syntax problem. The pure-Python
    loader words its syntax errors best; libyaml is several times faster on big files."""
    try:
        return yaml.compose(text, Loader=loader), None
    except yaml.YAMLError as error:
        return None, syntax_problem(path, error)
    except RecursionError:  # the pure-Python loader recurses once per level of nesting
        return None, f"{path}: YAML syntax error: nested too deeply"


def syntax_problem(path: str, error: yaml.YAMLError) -> str:
    """'file:line: YAML syntax error: what', with the parser's context where it gives one
    ('while parsing a flow sequence, expected ...')."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"{path}: YAML syntax error: {str(error).splitlines()[0]}"
    problem = ", ".join(filter(None, (error.context, error.problem)))
    return f"{path}:{error.problem_mark.line + 1}: YAML syntax error: {problem}"
