"""The synthetic recall lab: set disjointness and MQAR generators, small lab models, a trainer, experiment
grids and the report of ``jrt reproduce``.

```python
from jrt.synthetics import RunConfig, SDTask, ModelSpec, TrainSpec, train_run
result = train_run(RunConfig("sd", "based", SDTask(order="long_first"), ModelSpec(arch="based")))
```
"""

from jrt.synthetics.config import ARCHS, Grid, ModelSpec, MQARTask, RunConfig, SDTask, TrainSpec
from jrt.synthetics.data import (
    IGNORE_INDEX,
    NUM_SPECIAL,
    SyntheticBatch,
    make_mqar,
    make_sd,
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
    "mqar_grid",
    "mqar_seq_len",
    "reproduce_grid",
    "run_grid",
    "sd_grid",
    "sd_seq_len",
    "train_run",
    "write_report",
]
