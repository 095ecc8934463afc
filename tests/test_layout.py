"""The package's tree is its process picture: launching side, rank side, library; no import cycle."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "launcher"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p) for p in PKG.rglob("*.py")}


def _targets(base: str, names: list[ast.alias]) -> set[str]:
    """What ``from base import names`` loads: each name that is a submodule, else ``base`` itself."""
    out = {f"{base}.{a.name}" for a in names if f"{base}.{a.name}" in MODULES}
    if len(out) < len(names):
        out.add(base)
    return out


def _imports(top_level_only: bool = False) -> dict[str, set[str]]:
    """``{module: launcher modules it imports}``; with ``top_level_only``, only the imports that run when the
    module is imported (not those inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        deps: set[str] = set()
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                if base.startswith("launcher"):
                    deps.update(_targets(base, node.names))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("launcher"))
        graph[name] = deps
    return {m: {d for d in ds if d in MODULES and d != m} for m, ds in graph.items()}


def test_no_import_cycle():
    graph = _imports(top_level_only=True)
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            # a package importing its own submodule to re-export it is not a cycle back into the package
            visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_library_and_rank_side_never_import_the_launching_side():
    graph = _imports()
    for m, deps in graph.items():
        launching = ("launcher.launching", "launcher.cli", "launcher.testing", "launcher.__main__")
        if m.startswith(launching) or m == "launcher":
            continue
        bad = sorted(d for d in deps if d.startswith("launcher.launching") or d == "launcher.cli")
        assert not bad, f"{m} imports the launching side: {bad}"


def test_launching_side_reaches_the_rank_side_only_by_name():
    graph = _imports()
    for m, deps in graph.items():
        if m.startswith(("launcher.launching", "launcher.cli")) and m != "launcher.launching.api":
            bad = sorted(d for d in deps if d.startswith("launcher.rank"))
            assert not bad, f"{m} imports the rank program: {bad}"


def test_no_module_is_much_over_400_lines():
    lines = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    long = {name: n for name, n in lines.items() if n > 420}
    assert not long, long


def test_how_it_works_names_every_module():
    doc = (PKG.parent / "docs" / "how-it-works.md").read_text()
    section = doc.split("## Processes and modules", 1)[1].split("\n## ", 1)[0]
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(PKG))
        if path.name in ("__init__.py", "__main__.py"):
            continue
        assert rel in section, f"docs/how-it-works.md does not mention launcher/{rel}"


@pytest.mark.slow  # starts a process that imports torch
def test_importing_the_launching_side_changes_no_logging_setting():
    import logging
    import subprocess
    import sys

    code = ("import logging; import launcher.launching.local; "
            "print(logging.getLogger('torch.distributed.elastic').level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(logging.NOTSET)


def test_the_declared_python_floor_is_the_one_the_suite_runs_on():
    """pyproject's requires-python is tested, not hoped for: the suite (and CI) runs on that very version.
    It said 3.10 while failure reports use BaseException.add_note (3.11): a report on 3.10 crashed itself."""
    import re
    import sys

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', text)
    assert floor, "requires-python must be a plain >=X.Y floor"
    assert tuple(map(int, floor.groups())) == sys.version_info[:2], (
        f"requires-python says {floor.group(0)}, the suite runs on {sys.version_info[:2]}: test the floor")


#: The last commit whose subject ran over 72 characters: the rule holds for every commit after it.
SUBJECTS_CHECKED_AFTER = "3e2c1ab"


def test_commit_subjects_fit_in_72_characters():
    """Lab notes belong in commit bodies, and the subject is one short line: ``git log --oneline`` and the
    review tools cut it at 72."""
    import subprocess

    root = PKG.parent
    known = subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{SUBJECTS_CHECKED_AFTER}^{{commit}}"],
                           capture_output=True, check=False)
    if known.returncode != 0:
        pytest.skip(f"no history back to {SUBJECTS_CHECKED_AFTER} here (a shallow clone or an export)")
    since = f"{SUBJECTS_CHECKED_AFTER}..HEAD"
    subjects = subprocess.run(["git", "-C", str(root), "log", "--format=%h %s", since],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    long = [s for s in subjects if len(s.split(" ", 1)[1]) > 72]
    assert not long, f"commit subjects over 72 characters (move the rest into the body): {long}"
