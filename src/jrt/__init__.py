"""just-read-twice: the reference implementation of *Just read twice* (arXiv 2407.05483).

Sub-packages (imports flow one way, from the numerical core outwards; see docs/design.md):

- :mod:`jrt.ops`: pure tensor operators: the Taylor feature map, Based linear attention and JRT-RNN's prefix
  linear attention (reference, chunked and recurrent forms, Triton kernels in :mod:`jrt.ops.triton`),
  sliding-window attention;
- :mod:`jrt.layers`: the mixers as ``nn.Module``s with one interface (``Mixer(config, layer_idx)``), the SwiGLU
  MLP and RMSNorm; built on ``ops``;
- :mod:`jrt.models`: the Hugging Face ``JRTConfig`` / ``JRTModel`` / ``JRTForCausalLM``, the recurrent cache and
  the conversion of the authors' checkpoints (``jrt convert``), the model factory and the by-name loader; built on
  ``layers``;
- :mod:`jrt.prompting`: JRT-Prompt templates (read the context twice) for any model;
- :mod:`jrt.tasks`: the six recall tasks: loading, truncation, the ``contains`` metric;
- :mod:`jrt.evaluation`: the evaluation engine (``jrt eval``) and the lm-evaluation-harness adapter;
- :mod:`jrt.training`: language-model pretraining (``jrt train``, ``jrt data``);
- :mod:`jrt.synthetics`: set-disjointness and MQAR experiments (``jrt reproduce``);
- :mod:`jrt.linearize`: a pretrained Llama-family Transformer turned into a recurrent student (``jrt linearize``);
- :mod:`jrt.bench`: throughput and memory benchmarks (``jrt bench``).

The command line is :mod:`jrt.cli` (``jrt``, or ``python -m jrt``).
"""

__version__ = "0.1.0"

from jrt import _auto_register  # noqa: E402

_auto_register.install()  # JRT models join transformers' Auto classes (lazily: import jrt stays fast)
