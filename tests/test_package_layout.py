"""The import rules of docs/design.md, section 2: ops <- layers <- models, and bottom-to-top inside jrt.ops."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "jrt"

#: Rank of each module of jrt.ops: a module imports only modules of a lower rank (or of its own sub-package).
OPS_RANKS = {
    "jrt.ops.common": 0,
    "jrt.ops.feature_map": 1,
    "jrt.ops.sliding_window": 2,
    "jrt.ops.based": 2,
    "jrt.ops.based.naive": 2,
    "jrt.ops.based.chunk": 2,
    "jrt.ops.based.recurrent": 2,
    "jrt.ops.based.chunk_inference": 3,
    "jrt.ops.based.native": 4,
    "jrt.ops.based.layout": 4,
    "jrt.ops.triton": 5,
    "jrt.ops.triton._kernels": 5,
    "jrt.ops.triton._ops": 5,
    "jrt.ops.triton._backward_kernels": 5,
    "jrt.ops.triton._backward": 5,
    "jrt.ops.based.api": 6,
    "jrt.ops": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _jrt_imports(path: Path) -> set[str]:
    """Every ``jrt.*`` module that ``path`` imports, at any depth of the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("jrt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jrt") and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if importlib.util.find_spec(node.module) and _is_module(sub) else node.module)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("path", sorted((SRC / "ops").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_ops_modules_import_only_downwards(path):
    me = _module_name(path)
    for target in _jrt_imports(path):
        assert target.startswith("jrt.ops"), f"{me} imports {target} from outside jrt.ops"
        inside = target.startswith(me + ".") or target.rsplit(".", 1)[0] == me.rsplit(".", 1)[0] != "jrt"
        assert OPS_RANKS[target] < OPS_RANKS[me] or (inside and OPS_RANKS[target] == OPS_RANKS[me]), (
            f"{me} imports {target}, which is above it"
        )


#: Leaf helpers that import nothing from jrt: any package may use them.
LEAVES = ("jrt.errors", "jrt.jsonl", "jrt.tensor_files", "jrt.paths", "jrt.stats")


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_helpers_import_nothing_from_jrt(leaf):
    assert not _jrt_imports(SRC / f"{leaf.split('.')[1]}.py")


@pytest.mark.parametrize("package,allowed", [("layers", ("jrt.ops", "jrt.layers", *LEAVES)),
                                             ("models", ("jrt.ops", "jrt.layers", "jrt.models", *LEAVES))])
def test_layers_and_models_import_only_below(package, allowed):
    for path in sorted((SRC / package).rglob("*.py")):
        for target in _jrt_imports(path):
            assert target.startswith(allowed), f"{_module_name(path)} imports {target}"
