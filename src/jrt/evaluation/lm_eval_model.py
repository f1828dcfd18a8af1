"""lm-evaluation-harness model ``jrt``: an ``HFLM`` for JRT-RNN checkpoints (and any causal LM).

Importing this module registers the model name ``jrt`` with lm-eval. Compared with lm-eval's ``hf`` model it
imports :mod:`jrt.models` first (which registers JRT-RNN with the ``AutoModelForCausalLM`` classes) and falls
back to the GPT-2 tokenizer (offline copy when present) for checkpoints that ship none, as JRT-RNN's do.

Run lm-eval with it through ``python -m jrt.evaluation.harness`` (the lm-eval command line with this model
registered and the ``jrt_*`` tasks on the include path)::

    python -m jrt.evaluation.harness --model jrt --model_args pretrained=hazyresearch/JRT-360M-30B \\
        --tasks jrt_fda,jrt_fda_twice --batch_size 8
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from jrt.models.loading import load_tokenizer, offline_gpt2_tokenizer


@register_model("jrt")
class JRTLM(HFLM):
    """``HFLM`` that knows the project's models and their GPT-2 tokenizer.

    Args:
        pretrained: Hub id or folder of a checkpoint (or a loaded model, as with ``HFLM``).
        tokenizer: tokenizer id, folder or object; default: the checkpoint's, else GPT-2.
        **kwargs: passed to ``HFLM`` (``batch_size``, ``device``, ``dtype``, ``max_length``, ...).
    """

    def __init__(self, pretrained: Any = "hazyresearch/JRT-360M-30B", tokenizer: Any = None, **kwargs: Any):
        if tokenizer is None:
            if isinstance(pretrained, str):
                try:
                    tokenizer = load_tokenizer(pretrained)
                except ValueError:
                    tokenizer = offline_gpt2_tokenizer()
            else:
                tokenizer = offline_gpt2_tokenizer()
        elif tokenizer == "gpt2":
            tokenizer = offline_gpt2_tokenizer()
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
