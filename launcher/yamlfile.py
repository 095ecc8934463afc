"""Reading a job file strictly: small, UTF-8, valid YAML, no duplicate keys, no runaway aliases.

PyYAML alone accepts a repeated key (the last one silently wins, replacing a whole section) and expands
aliases without bound when the result is copied (a 565-byte alias bomb grew the launcher to 6 GiB). Job files
are small hand-written documents, so the bounds here are far above any real one. Numbers follow YAML 1.2:
PyYAML's YAML 1.1 reads ``nnodes: 1:4`` as the base-60 number 64; here it stays the string ``"1:4"``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from . import regularfile

#: Largest job file read (bytes); real ones are a few KiB.
MAX_BYTES = 1 << 20
#: Most values a job file may expand to once aliases are followed.
MAX_VALUES = 100_000


class JobFileError(ValueError):
    """The file cannot be a job file; the message says why and how to fix it."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen and key != "<<":
                raise JobFileError(f"line {line}: key {key!r} is given twice in one mapping (first at line "
                                   f"{seen[key]}); the second would silently replace the first\n"
                                   "HINT: merge the two into one")
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep)


# YAML 1.1's int and float patterns without their base-60 branches (``1:4`` is not 64).
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """One YAML value (an override's right-hand side), read like the job file's values."""
    return yaml.load(text, Loader=_StrictLoader)


def _count_values(root: yaml.Node) -> int:
    """Values the document expands to, aliases followed; stops counting past :data:`MAX_VALUES`."""
    count, todo = 0, [root]
    while todo and count <= MAX_VALUES:
        node = todo.pop()
        count += 1
        if isinstance(node, yaml.MappingNode):
            todo.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
    return count


def read(path: Path) -> Any:
    """The YAML document in ``path``; :class:`JobFileError` (or ``OSError``) when it cannot be a job file."""
    raw = regularfile.read_bytes(path, MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise JobFileError(f"larger than {MAX_BYTES >> 20} MiB: not a job file\n"
                           "HINT: keep data in files the entry point reads; the job file holds settings")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobFileError(f"not UTF-8 text (byte {e.start}): not a job file\n"
                           "HINT: pass the YAML job file (launcher run JOB.yaml) or a .py script") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()  # type: ignore[no-untyped-call]
        if node is None:
            return None
        if _count_values(node) > MAX_VALUES:
            raise JobFileError(f"expands to more than {MAX_VALUES} values (YAML aliases): not a job file\n"
                               "HINT: write the settings out, or use fewer nested aliases")
        return loader.construct_document(node)  # type: ignore[no-untyped-call]
    except yaml.YAMLError as e:
        raise JobFileError(f"not valid YAML: {e}") from None
    except RecursionError:  # PyYAML composes and constructs nested collections recursively
        raise JobFileError("nested too deeply: not a job file\n"
                           "HINT: job files are a few levels deep (sections, then settings)") from None
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]
