"""What hrnn claims, asked small enough for the default suite: models trained from the command line.

Each test trains one model with `hrnn-train` (one thread, 500 steps) and checks what it learned
against numbers the task defines, not against another run of the code:

- timescales, periods [4, 12], T = 48: the hierarchy that solves it is known, a module that ticks
  every 4 steps and one that ticks every 12 (the memoryless baseline is 0.833). The learned binary
  clock finds both and solves the task; the same clock frozen at its start (periods 1, 2, 4, 8,
  16, 32, 48: no 12) cannot.
- adding, T = 30 (always predicting 1 gives the baseline MSE 1/6): the default model, the clock
  times event gates, at 3x the default learning rate, learns it with its modules closed most of
  the time; the clock alone, in the same budget, stays near the baseline (docs/results.md
  measures both at T = 200).

The tests run seed 0; each threshold holds with a margin for seeds 0, 1 and 2 (the comments give
the measured range) and, where measured, under the avx2 and default CPU capabilities too. Each test
is one process of about 15-20 s of CPU, start-up included.
"""
from __future__ import annotations

from conftest import read_metrics, run_cli

ONE_THREAD = ["trainer.num_threads=1", "trainer.progress=false"]
TIMESCALES = ["task=timescales", "task.periods=[4,12]", "task.seq_len=48", "task.n_val=200", "task.n_test=200",
              "model.hidden_size=64", "model.n_modules=8", "model.activation=clock", "basis=binary",
              "trainer.steps=500", "trainer.eval_every=100", *ONE_THREAD]
# The default model (conf/model/hrnn.yaml: clock_event, hidden 128 = 8 modules x 16) at 3x the default learning rate.
ADDING = ["task=adding", "task.seq_len=30", "task.n_val=500", "task.n_test=500", "optim.lr=0.003",
          "trainer.steps=500", "trainer.eval_every=100", *ONE_THREAD]
TIMESCALES_BASELINE = 1 - (1 / 4 + 1 / 12) / 2  # the mean fraction of off-tick steps: copy on ticks, 0 elsewhere
ADDING_BASELINE = 1 / 6  # Var(U1 + U2) for two uniform values: the MSE of always predicting their mean, 1


def train(tmp_path, overrides: list[str]) -> dict:
    run_dir = tmp_path / "run"
    run_cli([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    return read_metrics(run_dir)


def test_a_learned_clock_finds_the_periods_4_and_12_and_solves_the_timescales_task(tmp_path):
    metrics = train(tmp_path, TIMESCALES)
    assert abs(metrics["baseline"] - TIMESCALES_BASELINE) < 1e-6
    assert metrics["recovered_periods"] == [4, 12], metrics["periods"]
    assert {4, 12} <= set(metrics["periods"])  # modules whose dominant period is exactly 4 and 12
    assert metrics["val_metric"] < 0.02 and metrics["test_metric"] < 0.02  # measured 0.006-0.009


def test_the_same_clock_frozen_at_its_start_cannot_solve_it_without_period_12(tmp_path):
    metrics = train(tmp_path, [*TIMESCALES, "optim.clock_lr=0"])
    assert metrics["periods"] == [1, 2, 4, 8, 16, 32, 48, 48]  # the spread start, capped at T, untouched
    assert metrics["recovered_periods"] == [4]
    assert metrics["val_metric"] > 0.1 and metrics["test_metric"] > 0.1  # measured 0.18-0.22


def test_the_default_model_learns_adding_with_its_modules_mostly_closed(tmp_path):
    metrics = train(tmp_path, ADDING)
    assert abs(metrics["baseline"] - ADDING_BASELINE) < 1e-6
    assert metrics["val_metric"] < 0.04 and metrics["test_metric"] < 0.04  # measured 0.005-0.017
    assert metrics["val"]["update_fraction"] < 0.1  # mean of the clock's wave times the gate: measured 0.04


def test_the_clock_alone_stays_near_the_adding_baseline_in_the_same_budget(tmp_path):
    metrics = train(tmp_path, [*ADDING, "model.activation=clock"])
    assert metrics["val_metric"] > 0.1 and metrics["test_metric"] > 0.1  # measured 0.14-0.17
