"""scripts/study/clock_surface.py on a run it trains: the loss along one clock coefficient and over
single-component waves, against the loss computed here from the same checkpoint."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY, load_script, run_cli

from hrnn.cli import eval as evaluate

surface = load_script("clock_surface", "study")


def test_the_surface_passes_through_the_trained_loss_and_restores_the_clock(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(["task=adding", "task.seq_len=24", "model.activation=clock", "basis=binary", "basis.size=8",
             "trainer.steps=4", "trainer.eval_every=4", *TINY, f"hydra.run.dir={run_dir}"], tmp_path)
    cfg, task, model, _ = evaluate.load_run(run_dir, "best", {})
    model = model.double().eval()
    x, y = surface.validation_sample(task, 40)
    x, y = x.double(), y.double()
    with torch.no_grad():
        trained_loss = float(task.loss(model(x), y))
    before = model.backbone.clock.coefficients.detach().clone()

    k, rows = surface.along_coefficient(model, task, x, y, module=1, points=5)
    assert k == int(model.backbone.clock.spectrum()[1].argmax())
    assert [offset for offset, _, _ in rows] == [-6.0, -3.0, 0.0, 3.0, 6.0]
    assert abs(rows[2][1] - trained_loss) < 1e-12  # offset 0 is the trained clock
    # dL/dc at offset 0 against a central difference of the same loss.
    step = 1e-5
    clock = model.backbone.clock
    with torch.no_grad():
        clock.coefficients[k, 1] += step
        up = float(task.loss(model(x), y))
        clock.coefficients[k, 1] -= 2 * step
        down = float(task.loss(model(x), y))
        clock.coefficients[k, 1] += step
    assert abs(rows[2][2] - (up - down) / (2 * step)) < 1e-6 + 1e-4 * abs(rows[2][2])
    assert torch.equal(clock.coefficients.detach(), before)

    periods = surface.over_periods(model, task, x, y, module=1)
    assert [p for p, _ in periods] == clock.component_periods.tolist()  # binary: 1 .. 8
    assert torch.equal(clock.coefficients.detach(), before)


def test_a_run_without_a_basis_clock_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "lstm"
    run_cli(["task=adding", "task.seq_len=12", "model=lstm", "model.hidden_size=8", "trainer.steps=2",
             "trainer.eval_every=2", *TINY[2:], f"hydra.run.dir={run_dir}"], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        surface.main([str(run_dir)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model=lstm" in err and "basis clock" in err
