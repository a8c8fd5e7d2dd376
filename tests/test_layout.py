"""The package's shape (issue 11, item 6; DEVELOPERS.md): no import cycle between its modules,
counting imports inside functions too (a late import hides a cycle, it does not remove it); no
private name imported from another module; one list of method names."""

from __future__ import annotations

import ast
from pathlib import Path

import structprune
from structprune.config import METHOD_OPTIONS
from structprune.solvers import METHODS

ROOT = Path(structprune.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def _imports(mods):
    """``{module: [(imported module, name or None, line)]}`` for every import of the package,
    at any depth of the module's code."""
    def owner(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    out = {}
    for m, (f, is_pkg) in mods.items():
        pkg = m if is_pkg else m.rpartition(".")[0]
        found = []
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "structprune":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:  # a submodule, not a name
                        found.append((sub, None, node.lineno))
                    elif owner(target):
                        found.append((owner(target), a.name, node.lineno))
            elif isinstance(node, ast.Import):
                found += [(owner(a.name), None, node.lineno) for a in node.names
                          if a.name.split(".")[0] == "structprune" and owner(a.name)]
        out[m] = [x for x in found if x[0] != m]
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_even_through_late_imports():
    mods = _modules()
    graph = {m: {t for t, _, _ in imps} for m, imps in _imports(mods).items()}
    assert _cycles(graph) == []


def test_no_private_name_is_imported_from_another_module():
    offenders = [f"{m}:{line} imports {name} from {t}" for m, imps in _imports(_modules()).items()
                 for t, name, line in imps
                 if name and name.startswith("_") and not name.startswith("__")]
    assert offenders == []


def test_config_and_solvers_name_the_same_methods():
    assert set(METHOD_OPTIONS) == set(METHODS)
