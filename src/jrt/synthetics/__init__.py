"""The synthetic recall lab: set disjointness (on the authors' protocol) and MQAR generators, small lab models,
a trainer, experiment grids and the report of ``jrt reproduce``.

```python
from jrt.synthetics import ModelSpec, RunConfig, SDTask, TrainSpec, train_run
task = SDTask(pairs=((4, 16), (8, 32)), test_pairs=((4, 16), (8, 32), (4, 64)), vocab_size=260)
result = train_run(RunConfig("sd", "based", task, ModelSpec.authors("based", 64, 4), TrainSpec.authors(8e-4, 2000)))
print(result["groups"])  # accuracy per test pair and order
```
"""

from jrt.synthetics.config import ARCHS, Grid, ModelSpec, MQARTask, RunConfig, SDTask, TrainSpec
from jrt.synthetics.data import (
    IGNORE_INDEX,
    NUM_SPECIAL,
    SyntheticBatch,
    make_mqar,
    make_sd,
    make_sd_mixed,
    mqar_seq_len,
    sd_seq_len,
)
from jrt.synthetics.grids import mqar_grid, reproduce_grid, sd_grid
from jrt.synthetics.report import write_report
from jrt.synthetics.train import load_results, run_grid, train_run

__all__ = [
    "ARCHS",
    "IGNORE_INDEX",
    "NUM_SPECIAL",
    "Grid",
    "MQARTask",
    "ModelSpec",
    "RunConfig",
    "SDTask",
    "SyntheticBatch",
    "TrainSpec",
    "load_results",
    "make_mqar",
    "make_sd",
    "make_sd_mixed",
    "mqar_grid",
    "mqar_seq_len",
    "reproduce_grid",
    "run_grid",
    "sd_grid",
    "sd_seq_len",
    "train_run",
    "write_report",
]
