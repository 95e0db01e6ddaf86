"""hrnn-eval: re-evaluating a run's checkpoint reproduces what training measured, for every model
and task; bad inputs get one line and exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, compose_config, read_metrics, run_cli
from hrnn.cli.eval import evaluate_run, main
from hrnn.tasks.mnist import save_mnist
from hrnn.train.loop import train

SYNTHETIC = ["task.seq_len=20", "trainer.steps=4", "trainer.eval_every=2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("eval")
    run_cli(["task=adding", "basis=dct", *SYNTHETIC, *TINY, f"hydra.run.dir={cwd / 'run'}"], cwd=cwd)
    return cwd / "run"


def exit_status(args: list[str]) -> int:
    """hrnn-eval ARGS in this process: main's return value, or the status it exits with."""
    try:
        return main(args)
    except SystemExit as exit:
        return exit.code


def hrnn_eval(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "hrnn.cli.eval", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_hrnn_eval_reproduces_the_test_metric_exactly(finished_run: Path) -> None:
    metrics = read_metrics(finished_run)
    result = hrnn_eval([str(finished_run)], cwd=finished_run.parent)
    assert result.returncode == 0, result.stderr
    written = json.loads((finished_run / "eval_test_best.json").read_text())
    assert written["value"] == metrics["test_metric"]  # exactly: same weights, data, batches and device
    assert written["metrics"] == metrics["test"] and written["step"] == metrics["best_step"]
    assert (written["split"], written["checkpoint"], written["metric"], written["device"]) == ("test", "best", "mse", "cpu")
    assert written["periods"] == metrics["periods"]
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"test (best.pt, step {metrics['best_step']}, cpu) | loss ")
    assert f"mse {metrics['test_metric']:.6g}" in first
    assert f"wrote {finished_run / 'eval_test_best.json'}" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks reading a CUDA checkpoint on a machine without CUDA")
def test_a_checkpoint_written_on_cuda_reads_on_the_cpu(finished_run: Path, tmp_path: Path, monkeypatch) -> None:
    """Its storages tagged cuda:0, as torch.save records tensors of a GPU run: plain torch.load fails on
    this machine, hrnn-eval maps it to the CPU and reproduces the test metric."""
    import shutil
    import torch.serialization

    from hrnn.train.resume import load_checkpoint, save_checkpoint

    run = tmp_path / "gpu_run"
    shutil.copytree(finished_run, run)
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(run / "checkpoints" / "best.pt", state)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert evaluate_run(run, "test", "best", {})["value"] == read_metrics(run)["test_metric"]


OLDER_RUNS = {  # a run written before keys a later hrnn added: its arguments, and the keys its stored config lacks
    "lstm": (["model=lstm", "model.hidden_size=8", "model.init=default", *TINY[2:]],
             ["model.num_layers", "model.init", "model.chrono_t_max"]),
    "hrnn": (["basis=dct", "trainer.flush_denormal=false", *TINY],
             ["basis.learn_phase", "basis.start_periods", "model.gate_threshold_warmup", "model.gate_support",
              "model.gate_open_target", "model.gate_open_rate", "trainer.flush_denormal"]),
    "hrnn_period": (["basis=period", *TINY], ["basis.start_periods"]),
}


@pytest.mark.parametrize("name", list(OLDER_RUNS))
def test_a_checkpoint_from_before_a_key_existed_evaluates_and_resumes_as_it_trained(tmp_path: Path, name: str) -> None:
    """A run whose stored config lacks keys added since (an LSTM before model.num_layers, model.init and
    model.chrono_t_max; hrnn before basis.learn_phase, basis.start_periods and the truncated gate's keys) is
    read with the values that reproduce what it ran (one layer, torch's initialisation; no learned phase, the
    clock's start from basis.init, no warm-up, no support, a fixed threshold; subnormal floats kept): it evaluates to its recorded test metric and resumes."""
    from omegaconf import OmegaConf

    from hrnn.train.resume import load_checkpoint, save_checkpoint

    args, keys = OLDER_RUNS[name]
    run = tmp_path / f"old_{name}"
    run_cli(["task=adding", "task.seq_len=12", *args, "trainer.steps=3", "trainer.eval_every=3",
             f"hydra.run.dir={run}"], tmp_path)
    for checkpoint in ("best.pt", "last.pt"):
        state = load_checkpoint(run / "checkpoints" / checkpoint)
        config = OmegaConf.create(state["config"])
        for key in keys:
            group, name_in_group = key.split(".")
            config[group].pop(name_in_group)
        state["config"] = OmegaConf.to_container(config) if isinstance(state["config"], dict) else OmegaConf.to_yaml(config)
        save_checkpoint(run / "checkpoints" / checkpoint, state)
    stored = OmegaConf.create(load_checkpoint(run / "checkpoints" / "best.pt")["config"])
    assert all(OmegaConf.select(stored, key, default="absent") == "absent" for key in keys)
    assert evaluate_run(run, "test", "best", {})["value"] == read_metrics(run)["test_metric"]
    run_cli([f"resume={run}", "trainer.steps=4"], tmp_path)
    assert read_metrics(run)["steps"] == 4


def test_hrnn_eval_val_and_last_checkpoint_and_batch_size(finished_run: Path) -> None:
    metrics = read_metrics(finished_run)
    best_val = evaluate_run(finished_run, "val", "best", {"trainer.eval_batch_size": "7"})
    assert best_val["value"] == pytest.approx(metrics["val_metric"], rel=1e-6)  # other batches: rounding only
    assert best_val["eval_batch_size"] == 7
    last = evaluate_run(finished_run, "val", "last", {})
    final = metrics["history"][-1]
    assert last["step"] == final["step"] == 4 and last["value"] == final["val_mse"]
    assert json.loads((finished_run / "eval_val_last.json").read_text())["value"] == last["value"]


def _fake_mnist(data_dir: Path) -> None:
    rng = np.random.default_rng(0)
    split = lambda n: (rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64))  # noqa: E731
    save_mnist(data_dir, {"train": split(20), "val": split(10), "test": split(12)})


MODELS = {
    "lstm-copy": ["model=lstm", "task=copy", "task.seq_len=10"],
    "gru-timescales": ["model=gru", "task=timescales", "task.seq_len=24"],
    "rnn-adding": ["model=rnn", "task=adding", "task.seq_len=20"],
    "cwrnn-adding": ["model=cwrnn", "task=adding", "task.seq_len=20"],
    "hrnn-period-copy": ["basis=period", "task=copy", "task.seq_len=10"],
    "hrnn-l1-pmnist": ["basis=binary", "regularizer=l1", "task=pmnist", "basis.size=16"],
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_and_task_evaluates_as_training_did(tmp_path: Path, name: str) -> None:
    data_dir = tmp_path / "data"
    _fake_mnist(data_dir)
    overrides = [*MODELS[name], "trainer.steps=2", "trainer.eval_every=2", "trainer.num_threads=1", *TINY,
                 f"data_dir={data_dir}"]
    if "mnist" in name:
        overrides = [o for o in overrides if not o.startswith(("task.n_val", "task.n_test"))]
    run_dir = tmp_path / "run"
    train(compose_config(overrides), run_dir)
    metrics = read_metrics(run_dir)
    result = evaluate_run(run_dir, "test", "best", {})
    assert result["value"] == metrics["test_metric"] and result["metrics"] == metrics["test"]


BAD = [
    ([], "error: give the run directory first; usage: hrnn-eval <run dir>"),
    (["{run}", "split=train"], "error: split='train' is not allowed; allowed: val, test"),
    (["{run}", "checkpoint=mid"], "error: checkpoint='mid' is not allowed; allowed: best, last"),
    (["{run}", "model.hidden_size=8"], "error: unknown key 'model.hidden_size'; allowed: split, checkpoint, trainer.device"),
    (["{run}", "test"], "error: bad argument 'test': expected key=value"),
    (["{run}", "--figure"], "error: unknown option '--figure'"),
    (["{run}", "trainer.eval_batch_size=0"], "error: trainer.eval_batch_size=0 must be positive"),
    (["{run}", "trainer.device=tpu"], "error: trainer.device='tpu' is not allowed; allowed: cpu, cuda, auto"),
    (["{run}/nosuch"], "is not a directory; give a run directory written by hrnn-train"),
    (["{empty}"], "has no checkpoints/best.pt; give a run directory written by hrnn-train"),
    (["{corrupt}"], "error: corrupt or unreadable checkpoint"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) or "none" for a, _ in BAD])
def test_bad_input_gets_one_line_and_exit_2(finished_run: Path, tmp_path: Path, capsys, args, message) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt" / "checkpoints").mkdir(parents=True)
    (tmp_path / "corrupt" / "checkpoints" / "best.pt").write_bytes(b"not a checkpoint")
    paths = {"run": finished_run, "empty": tmp_path / "empty", "corrupt": tmp_path / "corrupt"}
    assert exit_status([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(finished_run: Path, capsys) -> None:
    assert exit_status([str(finished_run), "trainer.device=cuda"]) == 2
    assert capsys.readouterr().err == "error: trainer.device=cuda but no CUDA device is available; allowed here: cpu, auto\n"


def test_figures_of_a_model_without_a_clock_is_one_line(tmp_path: Path, capsys) -> None:
    train(compose_config(["model=lstm", *SYNTHETIC, *TINY, "trainer.num_threads=1"]), tmp_path / "lstm")
    assert exit_status([str(tmp_path / "lstm"), "--figures"]) == 2
    assert "this run's model has no clock, so there are no clock figures; drop --figures" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_exits_0(flag: str, capsys) -> None:
    assert main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hrnn-eval <run dir> [split=val|test] [checkpoint=best|last]")


def test_a_sweep_job_directory_whose_name_holds_equals_signs_evaluates(finished_run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    job = tmp_path / "0_model.activation=event,trainer.seed=0"
    shutil.copytree(finished_run, job)
    assert exit_status([str(job), "split=test"]) == 0
    assert json.loads((job / "eval_test_best.json").read_text())["value"] == read_metrics(job)["test_metric"]
