"""Nothing lost: kills at any moment, signals, non-finite numbers, bad checkpoints, many valid configs."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_config, read_metrics, run_cli
from hrnn.errors import UserError
from hrnn.run import train

RUN = ["task=adding", "task.seq_len=16", "basis=binary", "trainer.steps=40", "trainer.eval_every=2", *TINY]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hrnn.run", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None or path.exists(), proc.stdout.read() if proc.stdout else ""
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("reference")
    run_cli([*RUN, f"hydra.run.dir={cwd / 'run'}"], cwd=cwd)
    return read_metrics(cwd / "run")


def _same_outcome(metrics: dict, reference: dict) -> None:
    for key in ("val_metric", "test_metric", "best_step", "steps", "periods", "val", "test"):
        assert metrics[key] == reference[key], key


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path, reference):
    rng = random.Random(7)
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    kills, steps_seen = 0, []
    for attempt in range(12):
        args = [f"resume={run_dir}"] if last.exists() else [*RUN, f"hydra.run.dir={run_dir}"]
        proc = _start(args, tmp_path)
        if kills < 3:
            _wait_for(last, proc)
            time.sleep(rng.uniform(0.0, 0.3))  # often lands while a checkpoint is being written
            if proc.poll() is None:  # count only kills that hit a running process
                proc.kill()
                kills += 1
            proc.wait()
            state = torch.load(last, weights_only=True)  # the last good checkpoint always loads
            assert 2 <= state["step"] <= 40 and state["step"] % 2 == 0
            steps_seen.append(state["step"])
            continue
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        break
    assert kills == 3 and steps_seen[-1] < 40, steps_seen
    _same_outcome(read_metrics(run_dir), reference)
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # no temporary files left behind


# SIGTERM (what SLURM and kill send) in the default suite; Ctrl-C's SIGINT takes the same path, so it is slow-only.
@pytest.mark.parametrize("signum,code", [pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_says_how_to_resume(tmp_path, reference, signum, code):
    run_dir = tmp_path / "run"
    proc = _start([*RUN, "trainer.steps=400", f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(run_dir / "checkpoints" / "last.pt", proc)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert f"hrnn-train resume={run_dir}" in output
    stopped_at = int(output.split(" at step ")[1].split(";")[0])
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == stopped_at
    if stopped_at <= 40:  # resume, cut back to the reference length when it stopped early enough
        run_cli([f"resume={run_dir}", "trainer.steps=40"], cwd=tmp_path)
        _same_outcome(read_metrics(run_dir), reference)


def _nan_task_loss(monkeypatch, bad_steps: set[int], signal_at: int | None = None, signum: int = signal.SIGTERM) -> None:
    """The training loss of the given steps becomes NaN; at step `signal_at` the process also gets `signum`."""
    from hrnn.tasks.synthetic import AddingTask

    calls = {"n": 0}
    original = AddingTask.loss

    def loss(self, output, target):
        value = original(self, output, target)
        if output.requires_grad:
            calls["n"] += 1
            if calls["n"] == signal_at:
                os.kill(os.getpid(), signum)  # the run's handler only sets a flag
            if calls["n"] in bad_steps:
                return value * float("nan")
        return value

    monkeypatch.setattr(AddingTask, "loss", loss)


def test_nonfinite_stop_names_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    _nan_task_loss(monkeypatch, {5})
    cfg = compose_config([*RUN, "trainer.steps=8"])
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step 5; last good checkpoint .*last.pt"):
        train(cfg, tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nonfinite_skip_counts_and_continues(tmp_path, monkeypatch):
    _nan_task_loss(monkeypatch, {3, 6})
    cfg = compose_config([*RUN, "trainer.steps=8", "trainer.nonfinite=skip"])
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["nonfinite_skipped"] == 2 and metrics["steps"] == 8
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nonfinite_skip_skips_only_the_update_evaluations_and_checkpoints_still_happen(tmp_path, monkeypatch):
    """Steps 4 and 8 are evaluation steps, 8 the last: both are evaluated and checkpointed, the run finishes."""
    _nan_task_loss(monkeypatch, {4, 8})
    cfg = compose_config([*RUN, "trainer.steps=8", "trainer.eval_every=4", "trainer.nonfinite=skip"])
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [entry["step"] for entry in metrics["history"]] == [4, 8]
    assert metrics["nonfinite_skipped"] == 2 and metrics["steps"] == 8
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 8
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["step"] in (4, 8)


def test_nonfinite_skip_on_the_only_evaluation_step_still_writes_best_and_tests(tmp_path, monkeypatch):
    _nan_task_loss(monkeypatch, {3})
    cfg = compose_config([*RUN, "trainer.steps=3", "trainer.eval_every=3", "trainer.nonfinite=skip"])
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_step"] == 3 and metrics["test_metric"] > 0
    assert (tmp_path / "checkpoints" / "best.pt").exists()


def test_a_signal_during_a_skipped_step_stops_at_that_step(tmp_path, monkeypatch):
    _nan_task_loss(monkeypatch, {3}, signal_at=3)
    cfg = compose_config([*RUN, "trainer.steps=8", "trainer.eval_every=4", "trainer.nonfinite=skip"])
    with pytest.raises(SystemExit) as stopped:
        train(cfg, tmp_path)
    assert stopped.value.code == 128 + signal.SIGTERM
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["nonfinite_skipped"] == 1


def test_slurms_warning_signal_checkpoints_and_stops_like_sigterm(tmp_path, monkeypatch):
    """submitit's SLURM jobs get SIGUSR2 before their time limit; the run checkpoints the step it is on."""
    _nan_task_loss(monkeypatch, set(), signal_at=5, signum=signal.SIGUSR2)
    cfg = compose_config([*RUN, "trainer.steps=8", "trainer.eval_every=4"])
    with pytest.raises(SystemExit) as stopped:
        train(cfg, tmp_path)
    assert stopped.value.code == 128 + signal.SIGUSR2
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 5


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("pristine")
    run_cli([*RUN, "trainer.steps=4", f"hydra.run.dir={cwd / 'run'}"], cwd=cwd)
    return cwd / "run"


@pytest.fixture
def finished_run(pristine_run, tmp_path) -> Path:
    """A finished run of its own for each test (a copy: the tests damage it)."""
    return Path(shutil.copytree(pristine_run, tmp_path / "run"))


def _resume_fails_cleanly(run_dir: Path, cwd: Path, expected: str, *overrides: str) -> None:
    files = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    result = run_cli([f"resume={run_dir}", *overrides], cwd=cwd, check=False, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == files  # left as it was


def test_changing_a_key_on_resume_is_refused_and_the_run_left_alone(finished_run, tmp_path):
    _resume_fails_cleanly(finished_run, tmp_path, "error: cannot change model.hidden_size when resuming (it would "
                          "change the run); allowed with resume: trainer.steps, trainer.max_wall_s, trainer.device, trainer.num_threads, "
                          "trainer.progress, trainer.log_every", "model.hidden_size=64", "trainer.steps=8")


def test_truncated_checkpoint_refused_and_left_alone(finished_run, tmp_path):
    last = finished_run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    _resume_fails_cleanly(finished_run, tmp_path, "corrupt or unreadable checkpoint")


def test_garbage_checkpoint_refused(finished_run, tmp_path):
    (finished_run / "checkpoints" / "last.pt").write_bytes(os.urandom(4096))
    _resume_fails_cleanly(finished_run, tmp_path, "corrupt or unreadable checkpoint")


def test_incompatible_checkpoint_refused(finished_run, tmp_path):
    last = finished_run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"]["backbone.recurrent"] = torch.zeros(8, 8)  # another shape
    torch.save(state, last)
    _resume_fails_cleanly(finished_run, tmp_path, "does not fit this model/task")


def test_foreign_file_refused(finished_run, tmp_path):
    torch.save({"weights": torch.zeros(3)}, finished_run / "checkpoints" / "last.pt")
    _resume_fails_cleanly(finished_run, tmp_path, "is not an hrnn checkpoint")


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli([*RUN, f"hydra.run.dir={blocker / 'run'}"], cwd=tmp_path, check=False, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot write the output directory {blocker / 'run'}: {blocker} is not a directory; "
        "choose another with hydra.run.dir=<dir> (hydra.sweep.dir=<dir> with -m)"]


def _random_valid_config(rng: random.Random) -> list[str]:
    task = rng.choice(["copy", "adding", "timescales"])
    model = rng.choice(["hrnn", "hrnn", "hrnn", "cwrnn", "lstm", "gru", "rnn"])
    n_modules = rng.choice([1, 2, 4])
    seq_len = rng.choice([5, 8, 13])
    overrides = [f"task={task}", f"task.seq_len={seq_len}", f"model={model}", f"model.n_modules={n_modules}",
                 f"model.hidden_size={n_modules * rng.choice([1, 3, 4])}", f"trainer.batch_size={rng.choice([1, 3])}",
                 f"trainer.seed={rng.randrange(100)}", f"optim.name={rng.choice(['adam', 'adamw', 'sgd', 'rmsprop'])}"]
    if task == "timescales":
        overrides.append(f"task.periods=[{rng.randint(1, 6)},{rng.randint(1, 6)}]")
    if model == "hrnn":
        basis = rng.choice(["binary", "dct", "period"])
        overrides += [f"basis={basis}", f"regularizer={rng.choice(['softmax', 'l1', 'none'])}",
                      f"model.connectivity={rng.choice(['full', 'slow_to_fast'])}",
                      f"basis.init={rng.choice(['spread', 'random', 'uniform'])}"]
        if basis != "period":
            overrides.append(f"basis.sharpness={rng.choice([1, 3])}")
    return overrides


@pytest.mark.parametrize("index", range(30))
def test_random_valid_configs_train_two_steps(tmp_path, index):
    overrides = _random_valid_config(random.Random(1000 + index))
    cfg = compose_config([*overrides, "trainer.steps=2", "trainer.eval_every=1", "task.n_val=3", "task.n_test=3",
                          "trainer.progress=false"])
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 2 and [entry["step"] for entry in metrics["history"]] == [1, 2], overrides
    assert all(math.isfinite(metrics[key]) for key in ("val_metric", "test_metric")), overrides


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    """A writer killed mid-write leaves .NAME.tmpPID behind; the next save removes it, but
    never a temp file whose writer is still alive."""
    from hrnn.checkpoint import save_checkpoint

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".best.pt.tmp{dead.pid}"
    live = tmp_path / f".last.pt.tmp{os.getppid()}"
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    save_checkpoint(tmp_path / "last.pt", {"step": 2})
    assert not stale.exists() and live.exists()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
