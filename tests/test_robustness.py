"""Nothing lost: kills at any moment, signals, non-finite numbers, bad checkpoints, many valid configs.

Every interruption lands at a chosen step, sent from inside the run (HRNN_SIGNAL_AT, or a patched loss),
so each test checks the same moments on every machine; a signalled run, resumed, always ends as the
uninterrupted one."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_config, read_metrics, run_cli
from hrnn.errors import UserError
from hrnn.train.environment import SIGNAL_AT
from hrnn.train.loop import train

RUN = ["task=adding", "task.seq_len=16", "basis=binary", "trainer.steps=40", "trainer.eval_every=2", *TINY]


def hrnn_train(args: list[str], cwd: Path, signal_at: str, wait: bool = True):
    """hrnn-train ARGS, sent a signal from inside at the point `signal_at` names (HRNN_SIGNAL_AT): finished
    (CompletedProcess), or still running (Popen) with wait=False."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", SIGNAL_AT: signal_at}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "hrnn.cli.train", *args]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("reference")
    run_cli([*RUN, f"hydra.run.dir={cwd / 'run'}"], cwd=cwd)
    return read_metrics(cwd / "run")


def _same_outcome(metrics: dict, reference: dict) -> None:
    for key in ("val_metric", "test_metric", "best_step", "steps", "periods", "val", "test"):
        assert metrics[key] == reference[key], key


# SIGKILL (no handler runs) at three kinds of moment, with the step of the checkpoint each leaves: between
# checkpoints; while a checkpoint is written, its temporary file complete but not yet renamed over the old
# one; and in the step right after a checkpoint.
KILLS = [("signal=SIGKILL,step=5", 4), ("signal=SIGKILL,step=12,at=checkpoint", 10), ("signal=SIGKILL,step=21", 20)]


def test_sigkill_at_any_moment_then_resume_matches_uninterrupted(tmp_path, reference):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    for plan, kept in KILLS:
        args = [f"resume={run_dir}"] if last.exists() else [*RUN, f"hydra.run.dir={run_dir}"]
        killed = hrnn_train(args, tmp_path, plan)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        assert torch.load(last, weights_only=True)["step"] == kept  # the last good checkpoint always loads
        if "at=checkpoint" in plan:  # the write the kill cut short
            assert list((run_dir / "checkpoints").glob(".*.tmp*"))
    run_cli([f"resume={run_dir}"], cwd=tmp_path)
    _same_outcome(read_metrics(run_dir), reference)
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # no temporary files left behind


# SIGTERM (what SLURM and kill send) in the default suite; Ctrl-C's SIGINT takes the same path, so it is slow-only.
@pytest.mark.parametrize("signum,code", [pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_says_how_to_resume(tmp_path, reference, signum, code):
    run_dir = tmp_path / "run"
    stopped = hrnn_train([*RUN, f"hydra.run.dir={run_dir}"], tmp_path, f"signal={signum.name},step=7")
    assert stopped.returncode == code, stopped.stdout + stopped.stderr
    assert (f"stopped by {signum.name} at step 7; checkpoint saved; continue with: hrnn-train resume={run_dir}"
            in stopped.stdout)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 7
    run_cli([f"resume={run_dir}"], cwd=tmp_path)
    _same_outcome(read_metrics(run_dir), reference)


def test_a_run_awaiting_a_signal_at_a_step_stops_there_when_it_comes(tmp_path, reference, arrivals):
    """signal=await (the SLURM tests' stand-in for a job waiting for its scheduler): the run says it has
    reached step 7 through the FIFO and waits; the SIGTERM sent then checkpoints step 7, and the resumed
    run ends as the uninterrupted one."""
    run_dir = tmp_path / "run"
    process = hrnn_train([*RUN, f"hydra.run.dir={run_dir}"], tmp_path,
                         f"signal=await,step=7,notify={arrivals.path}", wait=False)
    pid, step = arrivals.next("the run at step 7", 120, process)
    assert (pid, step) == (process.pid, 7)
    os.kill(pid, signal.SIGCONT)  # a signal without a handler (SLURM sends it first) does not end the wait
    os.kill(pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stdout + stderr
    assert f"stopped by SIGTERM at step 7; checkpoint saved; continue with: hrnn-train resume={run_dir}" in stdout
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 7
    run_cli([f"resume={run_dir}"], cwd=tmp_path)
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
    """submitit's SLURM jobs get SIGUSR2 before their time limit; the run checkpoints the step it is on,
    and resuming it ends where the uninterrupted run does."""
    cfg = compose_config([*RUN, "trainer.steps=8", "trainer.eval_every=4"])
    train(cfg, tmp_path / "full")
    with monkeypatch.context() as patch:
        patch.setenv(SIGNAL_AT, "signal=SIGUSR2,step=5")
        with pytest.raises(SystemExit) as stopped:
            train(cfg, tmp_path / "part")
    assert stopped.value.code == 128 + signal.SIGUSR2
    assert torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)["step"] == 5
    train(compose_config([*RUN, "trainer.steps=8", "trainer.eval_every=4", f"resume={tmp_path / 'part'}"]),
          tmp_path / "part")
    _same_outcome(read_metrics(tmp_path / "part"), read_metrics(tmp_path / "full"))


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
    from hrnn.train.resume import save_checkpoint

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".best.pt.tmp{dead.pid}"
    live = tmp_path / f".last.pt.tmp{os.getppid()}"
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    save_checkpoint(tmp_path / "last.pt", {"step": 2})
    assert not stale.exists() and live.exists()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
