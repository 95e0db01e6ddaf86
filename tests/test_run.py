"""hrnn-train end to end, as a subprocess: files written and re-read, resume exactness, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONF_DIR, compose_config, read_metrics, run_cli
from hrnn.config import validate

GROUP_OPTIONS = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
                 for group in ("task", "model", "basis", "regularizer", "optim", "trainer", "experiment")}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_every_config_group_option_composes_and_validates(group, option):
    cfg = compose_config([f"{group}={option}"])
    checked = validate(cfg)
    if group != "experiment":
        assert checked[group].get("name", option) == option or group == "trainer"


def read_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    return events


def test_cli_run_writes_events_checkpoints_and_metrics(tmp_path, tiny):
    run_dir = tmp_path / "run"
    result = run_cli(["task=adding", "task.seq_len=20", "basis=binary", "trainer.steps=6", "trainer.eval_every=3",
                      f"hydra.run.dir={run_dir}", *tiny], cwd=tmp_path)
    assert "baseline mse 0.1667" in result.stdout
    assert "periods 1 2 4 8" in result.stdout

    metrics = read_metrics(run_dir)
    for key in ("metric", "val_metric", "test_metric", "baseline", "params", "steps", "wall_s", "train_step_s", "periods"):
        assert key in metrics, key
    assert metrics["metric"] == "mse" and metrics["steps"] == 6 and len(metrics["periods"]) == 4
    assert metrics["baseline"] == pytest.approx(1 / 6)
    assert metrics["params"] == 2 * 16 + 16 + 16 * 16 + 20 * 4 + 16 + 1
    # The learning curve: one entry per evaluation, the last one the final evaluation.
    assert [entry["step"] for entry in metrics["history"]] == [3, 6]
    at_best = next(entry for entry in metrics["history"] if entry["step"] == metrics["best_step"])
    assert at_best["periods"] == metrics["periods"]  # the final metrics come from the best checkpoint
    assert all(set(entry) >= {"val_mse", "val_loss"} for entry in metrics["history"])

    for name in ("last.pt", "best.pt"):
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert {"model", "optimizer", "step", "rng", "config", "task"} <= set(state)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 6

    events = read_events(run_dir)
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/mse", "train/grad_norm", "train/lr", "train/steps_per_s", "val/loss", "val/mse",
                "test/mse", "clock/period/0", "clock/duty/3", "clock/entropy/1"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("val/mse")] == [3, 6]
    assert [e.value for e in events.Scalars("clock/period/2")] == [4.0, 4.0]
    images = set(events.Tags()["images"])
    assert {"clock/spectrum", "clock/waves"} <= images
    spectrum = events.Images("clock/spectrum")[-1]
    assert spectrum.height == 4 * 8 and spectrum.width >= 20  # 4 modules x 20 binary periods
    assert any(tag.startswith("clock/") for tag in events.Tags()["histograms"])


def test_stop_at_step_k_and_resume_reproduces_uninterrupted_run(tmp_path, tiny):
    common = ["task=copy", "task.seq_len=10", "basis=dct", "trainer.eval_every=3", *tiny]
    run_cli([*common, "trainer.steps=9", f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path)
    run_cli([*common, "trainer.steps=6", f"hydra.run.dir={tmp_path / 'part'}"], cwd=tmp_path)
    result = run_cli([f"resume={tmp_path / 'part'}", "trainer.steps=9"], cwd=tmp_path)
    assert "resuming after step 6" in result.stdout
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    for key in ("val_metric", "test_metric", "best_step", "steps", "periods", "val", "test", "history"):
        assert part[key] == full[key], key
    assert [entry["step"] for entry in part["history"]] == [3, 6, 9]
    scalars = read_events(tmp_path / "part").Scalars("train/loss")
    assert [e.step for e in scalars] == list(range(1, 10))  # no duplicated or missing steps after resume


BAD_INPUTS = [
    (["task=nosuch"], "unknown task 'nosuch'; allowed: adding, copy"),
    (["model.hidden_size=30", "model.n_modules=4"], "model.hidden_size=30 is not divisible by model.n_modules=4"),
    (["task.nosuch=1"], "unknown config key 'task.nosuch'"),
    (["trainer.device=tpu"], "trainer.device='tpu' is not allowed; allowed: cpu, cuda, auto"),
    (["model.hidden_size=0"], "model.hidden_size=0 must be positive"),
    (["basis=binary", "task.seq_len=50", "basis.size=80"], "basis.size=80 exceeds the sequence length 50"),
    (["task=timescales", "task.periods=[4,0]"], "non-positive period 0"),
    (["trainer.steps=abc"], "trainer.steps"),
    (["resume=/nonexistent/run"], "resume=/nonexistent/run holds no run"),
    (["model=transformer"], "unknown model 'transformer'; allowed: cwrnn, gru, hrnn, lstm, rnn"),
    (["basis=wavelet"], "unknown basis 'wavelet'; allowed: binary, dct, period"),
    (["regularizer=l2"], "unknown regularizer 'l2'; allowed: l1, none, softmax"),
    (["model.n_modules=-2"], "model.n_modules=-2 must be positive"),
    (["task.seq_len=0"], "task.seq_len=0 must be positive"),
    (["trainer.batch_size=-1"], "trainer.batch_size=-1 must be positive"),
    (["-m", "trainer.seed=0,1", "model.hidden_size=10,12", "model.n_modules=4"],
     "model.hidden_size=10 is not divisible by model.n_modules=4"),
    (["model.connectivity=sideways"], "model.connectivity='sideways' is not allowed; allowed: full, slow_to_fast, learned"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_nonzero_with_one_clear_line(tmp_path, args, message):
    result = run_cli(args, cwd=tmp_path, check=False, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("last.pt"))


def test_missing_mnist_names_the_command_that_fixes_it(tmp_path, tiny):
    tiny = [arg for arg in tiny if not arg.startswith("task.")]
    result = run_cli(["task=smnist", f"data_dir={tmp_path / 'empty'}", *tiny], cwd=tmp_path, check=False, timeout=60)
    assert result.returncode != 0
    assert "make data" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_mnist_names_the_command_that_fixes_it(tmp_path, tiny):
    (tmp_path / "mnist.pkl.gz").write_bytes(b"\x1f\x8b truncated")
    tiny = [arg for arg in tiny if not arg.startswith("task.")]
    result = run_cli(["task=pmnist", f"data_dir={tmp_path}", *tiny], cwd=tmp_path, check=False, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: cannot read {tmp_path / 'mnist.pkl.gz'}") and "make data" in result.stderr


def test_resume_of_a_directory_without_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli([f"resume={tmp_path / 'empty'}"], cwd=tmp_path, check=False, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == (f"error: resume={tmp_path / 'empty'} holds no run (no checkpoints/last.pt); "
                                     "give a run directory written by hrnn-train")
