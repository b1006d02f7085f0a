"""The package's layout: entry points at the top, one folder per stage, imports that run one way.

``beit_fast/`` holds the command-line entry points, ``__init__.py`` (the public API) and stage folders. Each
stage may import only the stages below it (``STAGES`` lists them bottom-up), so the tree reads in the order
the data flows and no two stages import each other. Every name has one home: no module serves moved names
through a module-level ``__getattr__`` (only ``beit_fast/__init__.py`` has one: it imports the documented
public names on first use, so that ``import beit_fast`` and the CLIs' ``--help`` do not import torch).
These tests read the source (AST), import nothing and take well under a second.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "beit_fast"

#: ``python -m beit_fast.<name>``
ENTRY_POINTS = {"pretrain", "finetune", "linear_probe", "train_tokenizer", "visualize", "convert", "evidence", "segment"}

#: Stage folders, bottom-up: a module of a stage imports only its own stage and those before it.
STAGES = ["utils", "kernels", "ops", "tokenizer", "data", "model", "interop", "config", "train", "visualization"]


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``beit_fast.kernels`` from ``kernels/``)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "kernels":
            continue
        parts = ["beit_fast", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    for path in sorted((REPO / "kernels").glob("*.py")):
        out[f"beit_fast.kernels.{path.stem}"] = path
    return out


def _imports(name: str, path: Path, module_level_only: bool = False) -> set[str]:
    """The beit_fast modules (or packages) that ``name`` imports, anywhere in the file or only at module level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    known = _modules()
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "beit_fast")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "beit_fast":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    found.discard(name)
    return found


def _stage(module: str) -> str | None:
    """The stage folder of ``module``; None for ``beit_fast`` itself and the entry points."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else None


def test_top_level_holds_entry_points_init_and_stage_folders():
    files = {p.name for p in PKG.iterdir() if p.is_file() and p.suffix == ".py"}
    assert files == {"__init__.py"} | {f"{e}.py" for e in ENTRY_POINTS}
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(STAGES)
    for entry in ENTRY_POINTS:
        assert "__main__" in (PKG / f"{entry}.py").read_text(encoding="utf-8"), entry


def test_no_module_serves_names_through_getattr():
    offenders = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body) and name != "beit_fast":
            offenders.append(name)
    assert offenders == []


@pytest.mark.parametrize("module_level_only", [False, True], ids=["all imports", "module level"])
def test_stages_import_only_the_stages_below_them(module_level_only):
    rank = {stage: i for i, stage in enumerate(STAGES)}
    upward = []
    for name, path in _modules().items():
        stage = _stage(name)
        if stage is None:
            continue  # the public API and the entry points sit above every stage
        for target in _imports(name, path, module_level_only):
            other = _stage(target)
            if other is None or rank[other] > rank[stage]:
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_no_import_circle_between_modules():
    """No cycle among the modules' imports, function-level ones included (a lazy import that closes a circle
    is still a circle: two modules that each need the other)."""
    modules = _modules()
    graph = {name: {t for t in _imports(name, path) if t in modules}
             for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
