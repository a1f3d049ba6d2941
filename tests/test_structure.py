"""The layering rules of DESIGN.md, checked on the source with ``ast`` (no import is executed):

* no module of ``dncut/``, ``bench/`` or ``jobs/`` imports a ``_private`` name of another dncut
  module (``from dncut.x import _y``, ``import dncut.x._y``, or ``mod._y`` on an imported dncut
  module ``mod``);
* the dncut modules form no import cycle; module-level and function-level imports both count
  (a lazy import inside a function still ties the two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("dncut", "bench", "jobs")


def module_name(path: Path, root: Path = REPO) -> str:
    """``dncut/eval/stages.py`` -> ``dncut.eval.stages``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(root: Path = REPO, folders: tuple[str, ...] = SCANNED) -> list[Path]:
    return sorted(p for folder in folders for p in (root / folder).rglob("*.py") if ".venv" not in p.parts)


def dncut_modules(root: Path = REPO) -> set[str]:
    return {module_name(p, root) for p in python_files(root, ("dncut",))}


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module of a ``from X import ...`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(path: Path, modules: set[str], root: Path = REPO) -> tuple[set[str], list[str]]:
    """``(dncut modules imported anywhere in the file, private-name violations)``."""
    importer = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    targets: set[str] = set()
    bad: list[str] = []
    aliases: dict[str, str] = {}  # local name -> dncut module it is bound to
    where = f"{path.relative_to(root)}"

    def note(module: str, line: int) -> None:
        while module and module not in modules:  # a name inside a module -> that module
            module = module.rpartition(".")[0]
        if module:
            targets.add(module)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not alias.name.startswith("dncut"):
                    continue
                parts = alias.name.split(".")
                if any(p.startswith("_") and not p.startswith("__") for p in parts):
                    bad.append(f"{where}:{node.lineno}: import {alias.name}")
                note(alias.name, node.lineno)
                if alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, importer, is_package)
            if not source.startswith("dncut"):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in modules:  # from package import module
                    note(full, node.lineno)
                    aliases[alias.asname or alias.name] = full
                else:
                    note(source, node.lineno)
                if alias.name.startswith("_") and not alias.name.startswith("__") and source != importer:
                    bad.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
    for node in ast.walk(tree):  # mod._private on an imported dncut module
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and aliases[node.value.id] != importer):
            bad.append(f"{where}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    targets.discard(importer)
    return targets, bad


def import_graph(root: Path = REPO) -> tuple[dict[str, set[str]], list[str]]:
    """The dncut import graph (module -> dncut modules it imports) and every private-name violation
    in ``dncut/``, ``bench/`` and ``jobs/``."""
    modules = dncut_modules(root)
    graph: dict[str, set[str]] = {}
    bad: list[str] = []
    for path in python_files(root):
        targets, violations = imports_of(path, modules, root)
        bad += violations
        name = module_name(path, root)
        if name in modules:
            graph[name] = targets
    return graph, bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth <= number of modules (~100)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_private_name_is_imported_across_modules() -> None:
    _, bad = import_graph()
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_dncut_modules_form_no_import_cycle() -> None:
    graph, _ = import_graph()
    assert len(graph) > 20, "the scan found too few dncut modules"
    found = cycles(graph)
    assert not found, "import cycles among dncut modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.mark.parametrize("files, expect_cycle, expect_private", [
    ({"dncut/a.py": "def f():\n    from dncut.b import g\n", "dncut/b.py": "from dncut.a import f\n"}, True, False),
    ({"dncut/a.py": "from dncut import b\n", "dncut/b.py": "x = 1\n"}, False, False),
    ({"dncut/p/__init__.py": "", "dncut/p/a.py": "from .b import x\n", "dncut/p/b.py": "from dncut.p.a import y\n"},
     True, False),
    ({"dncut/a.py": "from dncut.b import _hidden\n", "dncut/b.py": "_hidden = 1\n"}, False, True),
    ({"dncut/a.py": "x = 1\n", "bench/x.py": "from dncut.a import (\n    y,\n    _z,\n)\n"}, False, True),
    ({"dncut/a.py": "import dncut.b as b\nb._hidden\n", "dncut/b.py": "_hidden = 1\n"}, False, True),
    ({"dncut/a.py": "from dncut import b\nb.public\n", "dncut/b.py": "public = 1\n"}, False, False),
])
def test_the_checks_catch_what_they_are_for(tmp_path: Path, files: dict[str, str], expect_cycle: bool,
                                            expect_private: bool) -> None:
    """The checker on hand-made trees: each rule fires on a broken tree and stays quiet on a clean one."""
    _write(tmp_path, {"dncut/__init__.py": "", **files})
    for folder in SCANNED:
        (tmp_path / folder).mkdir(exist_ok=True)
    graph, bad = import_graph(tmp_path)
    assert bool(cycles(graph)) == expect_cycle
    assert bool(bad) == expect_private, bad
