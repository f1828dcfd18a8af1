"""Register the JRT model classes with ``transformers``' Auto factories without making ``import jrt`` slow.

Importing ``transformers`` takes seconds, so ``import jrt`` does not do it. Instead :func:`install` registers
right away when ``transformers`` is already imported, and otherwise adds an import hook that registers as
soon as ``transformers`` finishes importing. Either way ``import jrt`` followed by
``AutoModelForCausalLM.from_pretrained(folder)`` finds ``model_type="jrt"``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_TARGET = "transformers"


#: Modules whose import registers model classes with the Auto factories -> the modules that, once in
#: ``sys.modules`` (being imported or imported), mean that the registration happens without us.
_MODEL_MODULES: dict[str, tuple[str, ...]] = {
    "jrt.models": ("jrt.models",),
    "jrt.linearize.modeling": ("jrt.linearize.configuration", "jrt.linearize.modeling"),
}


def _register() -> None:
    for module, guards in _MODEL_MODULES.items():
        if any(name == g or name.startswith(g + ".") for g in guards for name in sys.modules):
            continue  # being (or already) imported: it registers itself when it finishes
        try:
            importlib.import_module(module)  # registers on import
        except Exception as err:  # pragma: no cover - a broken transformers installation
            warnings.warn(f"jrt: could not register the {module} models with transformers: {err}", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of ``transformers`` to register the JRT classes afterwards."""

    def find_spec(self, fullname, path, target=None):  # noqa: D102 - importlib protocol
        if fullname != _TARGET:
            return None
        sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now if ``transformers`` is imported, else once it is (idempotent)."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
