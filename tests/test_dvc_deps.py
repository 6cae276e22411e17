"""dvc.yaml declares, for every stage, the code that stage runs: derived here from the imports.

A stage's entry module comes from its command (`medmat <sub>` -> the sub-command's module, `python -m
X` -> X); every medmat module it imports, directly or through others, at the top of a file or inside
a function, must be covered by one of the stage's deps (the file itself or a folder holding it). A
missing dep means a code change there would leave that stage's results stale.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from medmat.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, name: str) -> set[str]:
    """medmat modules imported anywhere in the file (lazy imports inside functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from medmat import tracking`
    return {m for m in found if m.split(".")[0] == "medmat" and module_file(m) is not None}


def closure(entry: str) -> set[Path]:
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py too
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if module_file(".".join(parts[:i]))]
        todo += sorted(imported_modules(module_file(name), name) - seen)
    # medmat.cli only dispatches to the stage module; it decides no result.
    return {module_file(n).relative_to(ROOT) for n in seen if n not in ("medmat", "medmat.cli")}


def entry_module(cmd: str) -> str:
    m = re.search(r"python -m (\S+)", cmd)
    if m:
        return m.group(1)
    m = re.match(r"\s*medmat (\S+)", cmd)
    assert m, f"cannot tell the entry module of {cmd!r}"
    return COMMANDS[m.group(1)][0]


def stages() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: (st["do"] if "do" in st else st) for name, st in spec.items()}


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def test_every_stage_depends_on_the_code_it_imports():
    missing = {}
    for name, st in stages().items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in st.get("deps", [])]
        lacking = sorted(str(p) for p in closure(entry_module(st["cmd"])) if not covered(p, deps))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml stages lack code deps: {missing}"


def test_declared_code_deps_exist():
    """A dep on a file that does not exist (a module renamed away) is a typo, not a dependency."""
    stale = {name: [d for d in st.get("deps", []) if isinstance(d, str) and d.startswith("src/")
                    and not (ROOT / d).exists()]
             for name, st in stages().items()}
    assert not {k: v for k, v in stale.items() if v}, stale


def test_the_closure_sees_lazy_imports():
    """The derivation itself: medmat.pipeline reaches training and tracking through function-level imports."""
    files = {str(p) for p in closure("medmat.pipeline")}
    assert "src/medmat/train.py" in files and "src/medmat/unit.py" in files
