"""The question hrnn exists for, asked small: does the clock learn a known hierarchy? (`make test-slow`)

On the timescales task with periods [4, 12] the ideal hierarchy is known: a module that ticks
every 4 steps and one that ticks every 12. A learned clock must find both and solve the task;
the same model with its clock frozen at the spread start (1, 2, 4, ..., no 12) must not.
Each run trains a 64-unit model for 600-1,000 steps on one thread (10-20 s on 2 cores).
"""
from __future__ import annotations

import json

import pytest

from conftest import compose_config
from hrnn.run import train

pytestmark = pytest.mark.slow
TIMESCALES = ["task=timescales", "task.periods=[4,12]", "task.seq_len=96", "task.n_val=200", "task.n_test=200",
              "model.hidden_size=64", "model.n_modules=8", "trainer.eval_every=100", "trainer.num_threads=1",
              "trainer.progress=false"]


def run(tmp_path, overrides: list[str]) -> dict:
    train(compose_config([*TIMESCALES, *overrides]), tmp_path)
    return json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_clock_finds_periods_4_and_12_and_solves_the_task(tmp_path, seed):
    metrics = run(tmp_path, ["basis=binary", "trainer.steps=600", f"trainer.seed={seed}"])
    assert metrics["recovered_periods"] == [4, 12], metrics["periods"]
    assert metrics["val_metric"] < 0.01 and metrics["test_metric"] < 0.01  # baseline 0.833


def test_cosine_clock_finds_periods_4_and_12(tmp_path):
    metrics = run(tmp_path, ["basis=dct", "trainer.steps=1000"])
    assert metrics["recovered_wave"] == 2, metrics["wave_periods"]
    assert metrics["val_metric"] < 0.02


def test_a_frozen_clock_cannot_solve_it_without_period_12(tmp_path):
    metrics = run(tmp_path, ["basis=binary", "trainer.steps=600", "optim.clock_lr=0"])
    assert metrics["periods"] == [1, 2, 4, 8, 16, 32, 64, 96]  # the start, untouched
    assert metrics["val_metric"] > 0.05
