"""The import graph of dpokit points one way: base → theory → lecture → data → logps → losses →
objectives → evaluate → train → demo/bench → cli. Every ``import`` (also inside functions) is
checked, so a layer reaching up — e.g. a loss importing the trainer — fails here."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "dpokit"

LAYERS = [
    {"dpokit", "_lazy", "errors", "format", "atomic", "digests", "config", "hub",
     "trl_config"},  # base
    {"theory"},  # exact math: standalone
    {"lecture"},  # the lecture's tables, study and figures, computed by theory
    {"data"},
    {"attention", "attention_flex", "logps", "memory", "models", "runtime", "fixtures",
     "generation", "rewards"},
    {"losses"},
    {"objectives"},
    {"evaluate", "eval_config"},
    {"train"},
    {"demo", "bench", "bench_online"},
    {"cli", "__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
PURE = {"theory": set(LAYERS[0]), "losses": set(LAYERS[0])}
"""Packages that may import nothing of dpokit's but the base layer."""


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dpokit"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


MODULES = list(_modules())


def test_every_package_has_a_layer():
    assert {_package(m) for m, _ in MODULES} <= set(RANK)


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(module, path):
    package = _package(module)
    for imported in _imports(path):
        if imported.split(".")[0] != "dpokit":
            continue
        target = _package(imported)
        assert RANK[target] <= RANK[package], f"{module} imports {imported} (a higher layer)"
        if package in PURE and target != package:
            assert target in PURE[package], f"{module} imports {imported}"


@pytest.mark.parametrize(("module", "path"), [(m, p) for m, p in MODULES
                                              if _package(m) in ("theory", "losses")])
def test_math_imports_no_models(module, path):
    """theory/ and losses/ are tensor math: no transformers, peft or datasets."""
    heavy = {i.split(".")[0] for i in _imports(path)} & {"transformers", "peft", "datasets"}
    assert not heavy, f"{module} imports {heavy}"
