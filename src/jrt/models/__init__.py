"""Hugging Face models: :class:`JRTConfig`, :class:`JRTModel`, :class:`JRTForCausalLM` (JRT-RNN and its Based /
attention baselines), the recurrent-LM base every recurrent family builds on (:mod:`jrt.models.recurrent`: the
:class:`JRTCache`, :class:`RecurrentPreTrainedModel`, :class:`CausalLMHead`), conversion of the authors'
checkpoints, the model factory (:mod:`jrt.models.factory`) and the by-name loader (:mod:`jrt.models.loading`).

Importing this module registers ``model_type="jrt"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` (``import jrt`` arranges for that as soon as ``transformers`` is imported).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from jrt.models.configuration_jrt import MIXER_NAMES, PRESETS, JRTConfig
from jrt.models.modeling_jrt import JRTBlock, JRTForCausalLM, JRTModel, JRTPreTrainedModel
from jrt.models.recurrent import CausalLMHead, JRTCache, RecurrentPreTrainedModel, new_token_mask


def register_auto_classes() -> None:
    """Register the JRT classes with the ``transformers`` Auto factories (idempotent)."""
    AutoConfig.register("jrt", JRTConfig, exist_ok=True)
    AutoModel.register(JRTConfig, JRTModel, exist_ok=True)
    AutoModelForCausalLM.register(JRTConfig, JRTForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = [
    "MIXER_NAMES",
    "PRESETS",
    "CausalLMHead",
    "JRTBlock",
    "JRTCache",
    "JRTConfig",
    "JRTForCausalLM",
    "JRTModel",
    "JRTPreTrainedModel",
    "RecurrentPreTrainedModel",
    "new_token_mask",
    "register_auto_classes",
]
