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


#: Packages whose import registers model classes with the Auto factories.
_MODEL_PACKAGES = ("jrt.models", "jrt.linearize")


def _register() -> None:
    for package in _MODEL_PACKAGES:
        if any(name == package or name.startswith(package + ".") for name in sys.modules):
            continue  # being (or already) imported: it registers itself when it finishes
        try:
            importlib.import_module(package)  # registers on import
        except Exception as err:  # pragma: no cover - a broken transformers installation
            warnings.warn(f"jrt: could not register the {package} models with transformers: {err}", stacklevel=2)


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
