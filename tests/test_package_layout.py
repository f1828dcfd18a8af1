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
    "jrt.ops.triton._common": 5,
    "jrt.ops.triton._jit_helpers": 5,
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


# --- the file-level import graph of src/jrt (docs/design.md, section 2) ---------------------------------------

#: Packages in the order of the table of docs/design.md: a module never imports from a package listed after it.
#: ``jrt.errors`` & co. are leaves (any package may use them); ``cli`` holds the ``jrt`` command and the root
#: package, whose import hook registers the models with ``transformers``.
PACKAGE_ORDER = ("ops", "layers", "models", "prompting", "tasks", "evaluation", "training", "synthetics",
                 "linearize", "bench", "cli")
#: Modules that need an optional dependency (Triton, lm-evaluation-harness, CUDA): imported inside functions.
OPTIONAL_MODULES = ("jrt.ops.triton", "jrt.evaluation.lm_eval_model", "jrt.evaluation.harness",
                    "jrt.bench.prefill_cuda")
#: Functions that are command-line entry points: their imports are the CLI's lazy imports.
CLI_FUNCTIONS = ("main", "register", "run")
MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_cli_module(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in ("cli", "__main__") or last.endswith("_cli")


def _package(name: str) -> str:
    """The row of the table a module belongs to: ``jrt.models.factory`` -> ``models``."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "convert_cli", "__main__", "_auto_register"):
        return "cli"
    return parts[1]


def _target(module: str, names: list[str]) -> set[str]:
    """The modules of ``from module import names``: a sub-module where a name is one, else ``module``."""
    return {f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names}


def _absolute(me: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _file_imports(me: str, path: Path) -> set[str]:
    """The ``jrt`` modules that module ``me`` imports: module-level imports, imports inside functions and
    ``importlib.import_module("jrt....")``, except the CLI's lazy imports (in CLI modules and entry points) and
    function-local imports of the modules that need an optional dependency."""
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool, cli_lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, True, cli_lazy or child.name in CLI_FUNCTIONS or _is_cli_module(me))
                continue
            targets: set[str] = set()
            if isinstance(child, ast.Import):
                targets = {a.name if a.name in MODULES else a.name.rsplit(".", 1)[0] for a in child.names}
            elif isinstance(child, ast.ImportFrom):
                targets = _target(_absolute(me, path, child), [a.name for a in child.names])
            elif (isinstance(child, ast.Call) and getattr(child.func, "attr", None) == "import_module"
                  and child.args and isinstance(child.args[0], ast.Constant)):
                targets = {str(child.args[0].value)}
            for target in targets:
                if not target.startswith("jrt") or target not in MODULES:
                    continue
                if in_function and (cli_lazy or target.startswith(OPTIONAL_MODULES)):
                    continue
                found.add(target)
            visit(child, in_function, cli_lazy)

    visit(ast.parse(path.read_text()), False, False)
    found.discard(me)
    return found


GRAPH = {name: _file_imports(name, path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import cycle of ``GRAPH`` (as the list of its modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state and (found := walk(start)):
            return found
    return None


def test_the_import_graph_of_src_jrt_has_no_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_the_imports():
    # the scan itself: module-level, function-local and import_module imports are edges
    assert "jrt.ops.common" in GRAPH["jrt.layers.linear_attention"]
    assert "jrt.ops.triton._backward" in GRAPH["jrt.ops.triton._ops"]  # an optional module's own imports count
    assert "jrt.ops.triton" not in GRAPH["jrt.ops.based.api"]  # imported in a function: optional (Triton)
    assert GRAPH["jrt.errors"] == set()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_package_imports_one_listed_after_it(module):
    mine = _package(module)
    if mine not in PACKAGE_ORDER:
        assert module in LEAVES, f"{module} is in no row of the table of docs/design.md"
        return
    for target in GRAPH[module]:
        theirs = _package(target)
        if target in LEAVES or (theirs == "cli" and _is_cli_module(module)):
            continue  # leaf helpers; a sub-command's CLI module uses jrt.cli's checks
        assert PACKAGE_ORDER.index(theirs) <= PACKAGE_ORDER.index(mine), (
            f"{module} ({mine}) imports {target} ({theirs}), which docs/design.md lists after it"
        )


def test_the_design_table_lists_the_packages_in_this_order():
    text = (SRC.parents[1] / "docs" / "design.md").read_text()
    rows = [line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `jrt.")]
    assert [r.removeprefix("jrt.") for r in rows] == list(PACKAGE_ORDER)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("jrt.models")))
def test_no_private_name_of_jrt_models_is_imported_from_outside(module):
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jrt.models"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{module} imports the private {', '.join(private)} from {node.module}"


#: The packages whose functions do one job each (issue 20): none is longer than this many lines.
MAX_FUNCTION_LINES = 60


@pytest.mark.parametrize("package", ["models", "linearize", "evaluation", "synthetics"])
def test_no_function_over_60_lines(package):
    for path in sorted((SRC / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= MAX_FUNCTION_LINES, f"{_module_name(path)}.{node.name}: {lines} lines"
