"""just-read-twice: the reference implementation of *Just read twice* (arXiv 2407.05483).

Sub-packages (imports flow one way: ``ops`` <- ``layers`` <- ``models``):

- :mod:`jrt.ops`: linear attention, prefix linear attention, sliding-window attention (reference,
  chunked and recurrent forms);
- :mod:`jrt.bench`: throughput and memory benchmarks (``jrt bench``).
"""

__version__ = "0.1.0"

from jrt import _auto_register  # noqa: E402

_auto_register.install()  # JRT models join transformers' Auto classes (lazily: import jrt stays fast)
