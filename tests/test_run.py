"""hrnn-train end to end, as a subprocess: files written and re-read, resume exactness, clear errors."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONF_DIR, compose_config, read_metrics, run_cli, without_wall_times
from hrnn.config import registry  # importing hrnn.config registers the run_name resolver, as hrnn-train does
from hrnn.config.schema import validate
from hrnn.train.loop import train

GROUP_OPTIONS = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
                 for group in (*registry.RUN_GROUPS, "experiment")}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_every_config_group_option_composes_and_validates(group, option):
    """Each option composes and validates, and the validated config holds every value its file sets."""
    checked = validate(compose_config([f"{group}={option}"]))
    expected = values_set_by(group, option)
    assert expected, f"conf/{group}/{option}.yaml sets nothing"
    for key, value in expected.items():
        assert _plain(OmegaConf.select(checked, key)) == value, key


def values_set_by(group: str, option: str) -> dict:
    """{dotted key: value} of what conf/<group>/<option>.yaml sets: its shared files (defaults list), then
    its own keys, under its group (a preset's at the top level); a preset's `override /<group>: <name>`
    sets <group>.name."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    prefix = "" if group == "experiment" else f"{group}."
    values = {}
    for entry in raw.pop("defaults", []):
        if isinstance(entry, dict):  # override /task: adding
            ((target, name),) = entry.items()
            values[f"{target.removeprefix('override /')}.name"] = name
        elif entry != "_self_":  # common/size@_here_, or an option it builds on (experiment text_lstm: text)
            values.update(values_set_by(group, entry.split("@")[0]))
    values.update(_leaves(raw, prefix))
    return values


def _leaves(tree: dict, prefix: str) -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def read_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    return events


SUBNORMAL = 1e-39  # below float32's smallest normal, 1.18e-38


@pytest.fixture
def flush_denormal_restored():
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("flush", [True, False])
def test_trainer_flush_denormal_sets_how_subnormal_floats_compute(tmp_path, flush_denormal_restored, flush):
    """trainer.flush_denormal=true (the default) makes subnormal floats compute as 0, false keeps them:
    the speed of a backward whose gradients vanish into them depends on it (docs/performance.md)."""
    from hrnn.train.environment import prepare

    cfg = validate(compose_config([f"trainer.flush_denormal={flush}"]))
    assert compose_config([]).trainer.flush_denormal is True
    prepare(cfg.trainer, tmp_path)
    product = (torch.tensor([SUBNORMAL], dtype=torch.float32) * 1.0).item()
    assert (product == 0.0) if flush else (product == pytest.approx(SUBNORMAL, rel=1e-2))


def test_a_run_stored_before_flush_denormal_existed_resumes_keeping_subnormal_floats():
    """A checkpoint's config without trainer.flush_denormal ran with subnormal floats kept: read back, it says so."""
    from hrnn.train.resume import with_added_keys

    stored = OmegaConf.create(OmegaConf.to_container(compose_config([]), resolve=True))
    stored.trainer.pop("flush_denormal")
    assert with_added_keys(stored).trainer.flush_denormal is False


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
    # W_x, b, W_h, the clock's coefficients (20 periods x 4 modules), the event gate (G_x, g_b, G_h) and the head
    assert metrics["params"] == 2 * 16 + 16 + 16 * 16 + 20 * 4 + (4 * 2 + 4 + 4 * 16) + 16 + 1
    # The CPU recurrence that ran, named in the header and in metrics.json.
    from hrnn.ops import cpu_capabilities, fused_available

    ran = (os.environ.get("HRNN_CPU_CAPABILITY") or cpu_capabilities()[-1]) if fused_available() else "pytorch loop"
    assert metrics["cpu_kernels"] == ran and f"cpu (recurrence: {ran})" in result.stdout
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
    # labelled figures with matplotlib, plain images without: both checked in tests/test_figures.py
    assert [e.step for e in events.Images("clock/spectrum")] == [3, 6]
    assert any(tag.startswith("clock/") for tag in events.Tags()["histograms"])


@pytest.mark.parametrize("model,suffix", [("hrnn", "_hrnn_binary"), ("cwrnn", "_cwrnn"), ("lstm", "_lstm"),
                                          ("gru", "_gru"), ("rnn", "_rnn")])
def test_run_directory_names_the_basis_only_for_hrnn(model, suffix):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}", "basis=binary"], return_hydra_config=True)
    parent, name = cfg.hydra.run.dir.rsplit("/", 1)
    assert parent == "outputs/adding" and name.endswith(suffix) and len(name) == len("2026-01-01_00-00-00") + len(suffix)


def test_a_baseline_run_directory_has_no_basis(tmp_path, tiny):
    result = run_cli(["model=lstm", "task.seq_len=5", "trainer.steps=1", *tiny], cwd=tmp_path)
    (run_dir,) = (tmp_path / "outputs" / "adding").iterdir()
    assert run_dir.name.endswith("_lstm") and (run_dir / "metrics.json").exists()
    assert "(recurrence: torch.nn.LSTM)" in result.stdout and read_metrics(run_dir)["cpu_kernels"] == "torch.nn.LSTM"


def test_stop_at_step_k_and_resume_reproduces_uninterrupted_run(tmp_path, tiny):
    common = ["task=copy", "task.seq_len=10", "basis=dct", "trainer.eval_every=3", *tiny]
    run_cli([*common, "trainer.steps=9", f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path)
    run_cli([*common, "trainer.steps=6", f"hydra.run.dir={tmp_path / 'part'}"], cwd=tmp_path)
    result = run_cli([f"resume={tmp_path / 'part'}", "trainer.steps=9"], cwd=tmp_path)
    assert "resuming after step 6" in result.stdout
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    for key in ("val_metric", "test_metric", "best_step", "steps", "periods", "val", "test"):
        assert part[key] == full[key], key
    assert without_wall_times(part["history"]) == without_wall_times(full["history"])
    assert [entry["step"] for entry in part["history"]] == [3, 6, 9]
    scalars = read_events(tmp_path / "part").Scalars("train/loss")
    assert [e.step for e in scalars] == list(range(1, 10))  # no duplicated or missing steps after resume


CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores to run with two thread counts")
def test_resume_on_a_machine_with_fewer_cores_keeps_the_runs_thread_count(tmp_path, tiny):
    """num_threads=null resolves to the cores; the kernels' gradient sums depend on the thread count, so a
    resume on one core reuses the run's thread count and ends bit-identical to the uninterrupted run."""
    common = ["task=copy", "task.seq_len=10", "basis=dct", "trainer.eval_every=3", *tiny]
    train(compose_config([*common, "trainer.steps=9"]), tmp_path / "full")  # here: all of CORES
    train(compose_config([*common, "trainer.steps=6"]), tmp_path / "part")
    result = run_cli([f"resume={tmp_path / 'part'}", "trainer.steps=9"], cwd=tmp_path, cores={CORES[0]})
    assert "note:" not in result.stdout
    full, part = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True) for run in ("full", "part"))
    assert all(torch.equal(full["model"][key], part["model"][key]) for key in full["model"])
    assert read_metrics(tmp_path / "part")["threads"] == part["threads"] == len(CORES)


def test_an_explicit_thread_count_on_resume_is_used_with_a_note(tmp_path, tiny):
    train(compose_config(["task=adding", "task.seq_len=10", "trainer.steps=2", "trainer.eval_every=2",
                          "trainer.num_threads=2", *tiny]), tmp_path / "run")
    result = run_cli([f"resume={tmp_path / 'run'}", "trainer.steps=4", "trainer.num_threads=1"], cwd=tmp_path)
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: trainer.num_threads=1 differs from the 2 threads this run used so far; the continuation "
                     "equals the uninterrupted run only up to floating-point summation order"]
    assert read_metrics(tmp_path / "run")["threads"] == 1


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
    (["model=transformer"], "unknown model 'transformer'; allowed: cornn, cwrnn, gru, hrnn, lem, lstm, rnn"),
    (["basis=wavelet"], "unknown basis 'wavelet'; allowed: binary, dct, logcos, period"),
    (["basis=binary", "basis.learn_phase=true"], "basis.learn_phase=true needs a cosine basis: basis=dct or basis=logcos"),
    (["basis=logcos", "task.seq_len=50", "basis.size=20"], "basis.size=20 exceeds the 11 columns (the constant and every half octave) up to the sequence length 50"),
    (["regularizer=l2"], "unknown regularizer 'l2'; allowed: l1, none, softmax"),
    (["model.n_modules=4", "basis.start_periods=[1,2]"], "basis.start_periods has 2 periods for model.n_modules=4: give one per module"),
    (["basis=binary", "model.n_modules=2", "basis.start_periods=[1,2.5]"], "basis.start_periods holds 2.5: the binary basis has whole periods only"),
    (["basis=dct", "task.seq_len=50", "model.n_modules=2", "basis.start_periods=[1,80]"],
     "basis.start_periods holds 80: each period must be in [1, 50] (the sequence length)"),
    (["model.n_modules=-2"], "model.n_modules=-2 must be positive"),
    (["task.seq_len=0"], "task.seq_len=0 must be positive"),
    (["trainer.batch_size=-1"], "trainer.batch_size=-1 must be positive"),
    (["-m", "trainer.seed=0,1", "model.hidden_size=10,12", "model.n_modules=4"],
     "model.hidden_size=10 is not divisible by model.n_modules=4"),
    (["trainer.device=cuda"], "trainer.device=cuda but no CUDA device is available; allowed here: cpu, auto"),
    (["optim.clock_lr=-0.1"], "optim.clock_lr=-0.1 must be positive, 0 (the clock frozen at its start) or null (optim.lr)"),
    (["model.connectivity=sideways"], "model.connectivity='sideways' is not allowed; allowed: full, slow_to_fast, learned"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_nonzero_with_one_clear_line(tmp_path, args, message):
    result = run_cli(args, cwd=tmp_path, check=False, timeout=60, env={"CUDA_VISIBLE_DEVICES": ""})  # as without a GPU
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []  # writes nothing: no run directory, no log, no .hydra


def test_missing_mnist_names_the_command_that_fixes_it(tmp_path, tiny):
    tiny = [arg for arg in tiny if not arg.startswith("task.")]
    result = run_cli(["task=smnist", f"data_dir={tmp_path / 'empty'}", *tiny], cwd=tmp_path, check=False, timeout=60)
    assert result.returncode != 0
    assert "make data" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # writes nothing: the data are checked before the run directory is made


def test_corrupt_mnist_names_the_command_that_fixes_it(tmp_path, tiny):
    (tmp_path / "mnist.npz").write_bytes(b"PK truncated")
    (tmp_path / "mnist.sha256").write_text(f"{'0' * 64}  mnist.npz\n")
    tiny = [arg for arg in tiny if not arg.startswith("task.")]
    result = run_cli(["task=pmnist", f"data_dir={tmp_path}", *tiny], cwd=tmp_path, check=False, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'mnist.npz'} has sha256 ") and "make data" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.npz", "mnist.sha256"]  # no run directory


def test_resume_of_a_directory_without_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli([f"resume={tmp_path / 'empty'}"], cwd=tmp_path, check=False, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip() == (f"error: resume={tmp_path / 'empty'} holds no run (no checkpoints/last.pt); "
                                     "give a run directory written by hrnn-train")


def test_max_wall_s_stops_with_a_last_evaluation_and_counts_as_finished_for_resume_auto(tmp_path, tiny):
    """A wall-clock budget ends training early, evaluates and tests as at the end, and a sweep
    continued with resume=auto leaves the spent job alone (it has no steps left to use its time)."""
    from hrnn.sweep.callbacks import finished_value

    args = ["task=adding", "task.seq_len=20", *tiny, "trainer.steps=1000000", "trainer.eval_every=1000000",
            "trainer.max_wall_s=1.5", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_cli(args, cwd=tmp_path)
    metrics = read_metrics(tmp_path / "run")
    assert "trainer.max_wall_s=1.5 reached at step" in result.stdout
    assert 0 < metrics["steps"] < 1000000 and metrics["max_wall_s"] == 1.5
    assert metrics["history"][-1]["step"] == metrics["steps"] and metrics["history"][-1]["wall_s"] >= 1.5
    assert metrics["status"] == "finished" and "test_metric" in metrics
    cfg = compose_config(["trainer.steps=1000000", "trainer.max_wall_s=1.5", "resume=auto"])
    assert finished_value(cfg, tmp_path / "run") == metrics["val_metric"]
    more_time = compose_config(["trainer.steps=1000000", "trainer.max_wall_s=1000", "resume=auto"])
    assert finished_value(more_time, tmp_path / "run") is None  # a larger budget resumes it


def test_a_non_positive_max_wall_s_is_one_line(tmp_path):
    result = run_cli(["trainer.max_wall_s=0"], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "trainer.max_wall_s=0.0 must be positive or null" in result.stderr


def test_a_sweep_jobs_directory_resumes_with_the_argument_the_stop_message_gives(tmp_path, tiny):
    """A sweep job's directory name holds '=' and ',', which Hydra reads as syntax unquoted: the
    stop message quotes it, and resume accepts the quoted form."""
    from hrnn.train.resume import resume_argument

    run_dir = tmp_path / "sweep" / "0_model.activation=event,trainer.seed=0"
    common = ["task=adding", "task.seq_len=10", "model.activation=event", "trainer.eval_every=2", *tiny]
    run_cli([*common, "trainer.steps=2", f"hydra.run.dir='{run_dir}'"], cwd=tmp_path)
    argument = resume_argument(run_dir)
    assert argument == f"\"resume='{run_dir}'\"" and resume_argument(tmp_path / "run") == f"resume={tmp_path / 'run'}"
    result = run_cli([shlex.split(argument)[0], "trainer.steps=4"], cwd=tmp_path)  # as the shell passes it
    assert "resuming after step 2" in result.stdout
    assert read_metrics(run_dir)["steps"] == 4
