"""The package's seams: every module imports on its own, no module imports another that imports it back
(not even inside a function), and no module is too long to read top to bottom."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every module of the medmat package: dotted name -> file."""
    out = {}
    for path in sorted((SRC / "medmat").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_edges() -> dict[str, set[str]]:
    """module -> the medmat modules it imports anywhere in its text (top level or inside a function:
    a lazy import still ties the two modules together)."""
    mods = modules()

    def owner(name: str) -> str | None:  # medmat.models.hf.HFConfig -> medmat.models.hf
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [owner(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets = [owner(f"{base}.{a.name}") for a in node.names]
            else:
                continue
            # A package's own modules import it (medmat.models.hf -> medmat.models) by construction.
            edges[mod] |= {t for t in targets if t and t != mod and not mod.startswith(t + ".")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


# Imports each module first, in a fresh import of the package every time (medmat.* dropped from
# sys.modules; third-party modules stay loaded, so the whole package takes seconds, not minutes).
_IMPORT_EACH = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for m in [m for m in sys.modules if m == "medmat" or m.startswith("medmat.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=3)
print(json.dumps(failed))
"""


def test_every_module_imports_on_its_own():
    names = sorted(modules())
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], capture_output=True,
                          text=True, timeout=600, cwd=SRC.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "modules that do not import on their own:\n" + "\n".join(
        f"--- {name}\n{tb}" for name, tb in failed.items())


def test_scoring_and_tracking_do_not_import_each_other():
    # Scoring is a pure core; tracking knows runs, not models or scores. Only the shells on top (the
    # `medmat evaluate` CLI, the pipeline) use both.
    edges = import_edges()
    core = {"medmat.scoring", "medmat.eval_plots", "medmat.names"}
    assert not {(a, b) for a in core for b in edges[a] if b in {"medmat.tracking", "medmat.served_model"}}
    assert not edges["medmat.tracking"] & {"medmat.evaluate", "medmat.scoring", "medmat.served_model"}
    assert "medmat.tracking" not in edges["medmat.served_model"]
    mine = core | {"medmat.evaluate", "medmat.tracking", "medmat.served_model"}
    assert not [group for group in cycles(edges) if set(group) & mine]


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_anywhere():
    found = cycles(import_edges())
    assert not found, f"modules that import each other (directly or round a loop): {found}"


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {dict(sorted(long.items(), key=lambda kv: -kv[1]))}"
