"""Steering: scale a task's selected FFN neurons to make the model better at the task.

All methods act on the neurons a rankings artifact selects for the task (the global top
`ratio` of all (layer, neuron) pairs, default 1 %), and are reported on the test split
(DESIGN.md section 3):

- `fixed` (Fixed-Amp): every selected neuron x 2.0.
- `grid` (Grid-Search): one factor from `GRID` for all selected neurons, the one with the best
  task metric on dev (ties: the factor closest to 1, i.e. the smallest change; then the
  smaller factor).
- `learned`: one trained fp32 scale per selected neuron, z~ = z * (1 + s), loss = answer CE +
  beta * KL to the unscaled model + lambda * mean(s^2) (`learn.py`, `SteerConfig`), averaged
  per item; retrieval items train on "Yes" for the positive plus 4 random negatives answered
  "No", caption items on a random reference, both drawn anew each epoch.
- `learned-nokl`: the same with beta = 0.
- `random` (RandNeuron): random neurons with the HONES selection's per-layer counts (seeded),
  learned like `learned`.

The official release's learned steering never took an optimiser step (it called a missing
method and swallowed the error); here every failure raises.

Two modules: `learn` (training examples, the loss, `learn_scales` and its checkpoints) and
`run` (the methods, `run_task` with its `<out>/<task>/results.json`, `results_table`).
Every name is importable from `hones_core.steering` itself.
"""

from ..errors import ProgressMismatchError
from .learn import (Example, LearnResult, SteerConfig, accumulate, answer_position_logprobs, dev_ce, encode_examples,
                    example_ces, example_loss, frozen, learn_scales, neuron_layout, training_examples)
from .run import (FIXED_FACTOR, GRID, LEARNED, METHODS, RESULTS_FILE, TaskRun, grid_search, results_table,
                  run_task, scales_file)

SteeringProgressError = ProgressMismatchError     # the name before errors.py; same failure as a rank run's

__all__ = [
    "METHODS", "LEARNED", "GRID", "FIXED_FACTOR", "RESULTS_FILE", "SteeringProgressError",
    "SteerConfig", "Example", "training_examples", "encode_examples", "answer_position_logprobs", "neuron_layout",
    "frozen", "LearnResult", "example_loss", "example_ces", "dev_ce", "accumulate", "learn_scales",
    "grid_search", "scales_file", "TaskRun", "run_task", "results_table",
]
