"""lm-evaluation-harness task definitions (``jrt_<task>`` and ``jrt_<task>_twice``); see ``utils.py``."""
