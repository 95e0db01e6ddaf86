"""Sweeps (`hrnn-train -m`): one directory per job, parallel launchers, failures kept, HPARAMS,
summary table, resume=auto. Every sweep here is a few tiny jobs (seconds on 2 cores)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_config, without_wall_times
from hrnn.errors import UserError
from hrnn.train.environment import SIGNAL_AT
from hrnn.train.loop import train
from hrnn.sweep.summary import format_markdown, read_jobs, summarize
from hrnn.sweep.callbacks import run_job, threads_per_job
from hrnn.report.tensorboard import flat_hparams, hparam_types

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=16", "model.n_modules=2", "trainer.batch_size=8", "trainer.eval_batch_size=50",
         "trainer.progress=false", "trainer.steps=2"]
SYNTHETIC = ["task.seq_len=20", "task.n_val=50", "task.n_test=50"]


def hrnn_train(args: list[str], cwd: Path, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "hrnn.cli.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("joblib")
    sweep = cwd / "sweep"
    result = hrnn_train(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "basis=binary,dct",
                         f"hydra.sweep.dir={sweep}", *SMALL, *SYNTHETIC], cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| binary |" in result.stdout and "| dct |" in result.stdout  # the table printed at the end
    return sweep


def test_joblib_jobs_write_their_own_dirs_and_share_the_cores(joblib_sweep: Path) -> None:
    dirs = job_dirs(joblib_sweep)
    assert [d.name.split("_")[0] for d in dirs] == ["0", "1"]
    for d in dirs:
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["status"] == "finished" and metrics["steps"] == 2
        assert metrics["threads"] == max(1, cores() // 2)  # n_jobs=2 workers split the cores
        assert (d / "checkpoints" / "last.pt").exists() and (d / "checkpoints" / "best.pt").exists()
        assert list(d.glob("events.out.tfevents.*"))
        assert (d / ".hydra" / "overrides.yaml").exists()
    # two worker processes wrote the event files (the pid is in their names)
    pids = {f.name.rsplit(".", 2)[1] for d in dirs for f in d.glob("events.out.tfevents.*")}
    assert len(pids) == 2


def test_summarize_reads_the_sweep(joblib_sweep: Path) -> None:
    jobs = read_jobs(joblib_sweep)
    rows = summarize(jobs)
    assert [r["basis"] for r in rows] == ["binary", "dct"]
    assert all(r["finished"] == 1 and r["failed"] == 0 and r["val_metric_mean"] is not None for r in rows)
    assert all(r["periods"].startswith("[") for r in rows)
    script = subprocess.run([sys.executable, "-m", "hrnn.cli.summary", str(joblib_sweep), "--csv"],
                            capture_output=True, text=True, timeout=60)
    assert script.returncode == 0, script.stderr
    header, *lines = script.stdout.strip().splitlines()
    assert header.startswith("basis,seeds,finished") and len(lines) == 2


def test_hparams_are_in_each_runs_own_event_file(joblib_sweep: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    seen = []
    for d in job_dirs(joblib_sweep):
        assert not [p for p in d.iterdir() if p.is_dir() and list(p.glob("events.out.tfevents.*"))]  # no sub-run
        acc = EventAccumulator(str(d), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        assert metadata.EXPERIMENT_TAG in content
        start = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG]).session_start_info
        hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.EXPERIMENT_TAG]).experiment
        assert {m.name.tag for m in experiment.metric_infos} >= {"hparams/val_metric", "hparams/test_metric"}
        metrics = json.loads((d / "metrics.json").read_text())
        assert acc.Scalars("hparams/val_metric")[-1].value == pytest.approx(metrics["val_metric"], rel=1e-5)
        seen.append(hparams)
    assert [h["basis.name"] for h in seen] == ["binary", "dct"]
    assert seen[0].keys() == seen[1].keys() == hparam_types().keys()
    assert seen[0]["model.hidden_size"] == 16 and seen[0]["trainer.steps"] == 2


# Failures at run time that preflight cannot see: MNIST missing from data_dir (joblib), and an
# absurd learning rate that makes the loss non-finite at step 2 (basic launcher; cheap jobs).
FAILURES = {
    "basic": (["optim.lr=1e+30,0.001", *SYNTHETIC], "optim.lr=1e+30", "optim.lr"),
    "joblib": (["hydra/launcher=joblib", "task=smnist,adding"], "task=smnist", "task"),
}


@pytest.mark.parametrize("launcher", sorted(FAILURES))
def test_a_failed_job_is_kept_and_the_others_finish(tmp_path: Path, launcher: str) -> None:
    sweep, empty = tmp_path / "sweep", tmp_path / "no_data"
    empty.mkdir()
    args, failing, key = FAILURES[launcher]
    result = hrnn_train(["-m", *args, f"data_dir={empty}", f"hydra.sweep.dir={sweep}", *SMALL], tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 jobs failed (0_") and "error.txt" in last
    assert "Traceback" not in result.stderr
    failed, done = job_dirs(sweep)
    assert failing in failed.name and (failed / "error.txt").read_text().startswith("error: ")
    assert not (failed / "metrics.json").exists()
    assert json.loads((done / "metrics.json").read_text())["status"] == "finished"
    jobs = read_jobs(sweep)
    rows = summarize(jobs)
    assert [(r["finished"], r["failed"]) for r in rows] == [(0, 1), (1, 0)]
    assert rows[0][key] == failing.split("=")[1]
    assert "failed: error: " in format_markdown(rows, jobs)


def test_submitit_local_runs_a_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = hrnn_train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", "basis=dct",
                         f"hydra.sweep.dir={sweep}", *SMALL, *SYNTHETIC], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (job,) = job_dirs(sweep)
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["threads"] == 1
    assert (sweep / ".submitit").is_dir()


def test_resume_auto_skips_finished_jobs_and_resumes_the_interrupted_one(tmp_path: Path) -> None:
    """The sweep is killed (SIGKILL) at step 22 of its second job; resume=auto skips the first job and
    continues the second from its last checkpoint (step 20) to the metrics of an uninterrupted run."""
    sweep = tmp_path / "sweep"
    run = [*SMALL, *SYNTHETIC, "trainer.steps=40", "trainer.eval_every=4", "trainer.num_threads=1"]
    args = ["-m", "trainer.seed=0,1", f"hydra.sweep.dir={sweep}", *run]
    killed = hrnn_train(args, tmp_path, env={SIGNAL_AT: "signal=SIGKILL,step=22,job=1"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    first, second = job_dirs(sweep)
    assert not (second / "metrics.json").exists()
    kept = (first / "metrics.json").read_bytes()

    result = hrnn_train([*args, "resume=auto"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{first.name}: already finished" in result.stdout
    assert "resuming after step 20" in result.stdout
    assert (first / "metrics.json").read_bytes() == kept
    reference = tmp_path / "reference"
    train(compose_config(["trainer.seed=1", *run]), reference)  # the second job, uninterrupted
    after, expected = (json.loads((d / "metrics.json").read_text()) for d in (second, reference))
    for key in ("val_metric", "test_metric", "best_step"):
        assert after[key] == expected[key], key
    assert without_wall_times(after["history"]) == without_wall_times(expected["history"])
    assert job_dirs(sweep) == [first, second]


def test_resume_auto_finds_a_finished_job_renumbered_by_a_larger_sweep(tmp_path: Path) -> None:
    """Adding a seed in front renumbers the jobs: seed 0's run, done as job 0, is job 1 of the new
    sweep. resume=auto renames its directory instead of training it again."""
    sweep = tmp_path / "sweep"
    run = ["-m", f"hydra.sweep.dir={sweep}", *SMALL, *SYNTHETIC, "trainer.num_threads=1", "resume=auto"]
    assert hrnn_train([*run, "trainer.seed=0"], tmp_path).returncode == 0
    (old,) = job_dirs(sweep)
    kept = (old / "metrics.json").read_bytes()
    result = hrnn_train([*run, "trainer.seed=1,0"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    new = sweep / ("1_" + old.name.partition("_")[2])
    assert f"{new.name}: this job's run was in {old.name}" in result.stdout
    assert f"{new.name}: already finished" in result.stdout
    assert not old.exists() and (new / "metrics.json").read_bytes() == kept
    assert [d.name.partition("_")[0] for d in job_dirs(sweep)] == ["0", "1"]


def test_a_sweep_with_long_overrides_gets_short_job_dirs_and_resumes_them(tmp_path: Path) -> None:
    """Job names past one file name's 255 bytes: each job still gets its own directory (a head and a hash),
    and resume=auto finds it again."""
    sweep = tmp_path / "sweep"
    long = ["model.activation=clock_event", "regularizer=none", "optim.clock_lr=0", "model.gate=truncated",
            "model.gate_threshold=0.3", "model.gate_support=0.1", "model.gate_bias=0", "model.gate_open_target=0.09",
            "model.gate_threshold_warmup=0.25"]  # with the rest, 373 bytes of overrides
    run = ["-m", f"hydra.sweep.dir={sweep}", *SMALL, *SYNTHETIC, *long, "trainer.num_threads=1", "resume=auto",
           "trainer.seed=0,1"]
    result = hrnn_train(run, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    dirs = job_dirs(sweep)
    assert [d.name[:2] for d in dirs] == ["0_", "1_"], [d.name for d in dirs]
    assert all(len(d.name.encode()) <= 255 and "~" in d.name for d in dirs), [d.name for d in dirs]
    assert all((d / "metrics.json").is_file() for d in dirs)
    assert [OmegaConf.load(d / ".hydra" / "overrides.yaml")[-1] for d in dirs] == ["trainer.seed=0", "trainer.seed=1"]
    again = hrnn_train(run, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(f"{d.name}: already finished" in again.stdout for d in dirs) and job_dirs(sweep) == dirs
    kept = {OmegaConf.load(d / ".hydra" / "overrides.yaml")[-1]: (d / "metrics.json").read_bytes() for d in dirs}
    # the seeds swapped: each job is renumbered, and resume=auto finds its long-named run under the other number
    swapped = hrnn_train([*run[:-1], "trainer.seed=1,0"], tmp_path)
    assert swapped.returncode == 0, swapped.stdout + swapped.stderr
    assert swapped.stdout.count("the sweep's numbering changed") == 2, swapped.stdout
    renamed = job_dirs(sweep)
    assert [OmegaConf.load(d / ".hydra" / "overrides.yaml")[-1] for d in renamed] == ["trainer.seed=1", "trainer.seed=0"]
    assert {OmegaConf.load(d / ".hydra" / "overrides.yaml")[-1]: (d / "metrics.json").read_bytes()
            for d in renamed} == kept


def test_job_dir_keeps_short_names_and_hashes_long_ones() -> None:
    from hrnn.config import NAME_MAX, job_dir

    assert job_dir(3, "basis=dct,trainer.seed=1") == "3_basis=dct,trainer.seed=1"
    shared = "model.gate=truncated," * 20
    first, second = job_dir(0, shared + "trainer.seed=0"), job_dir(0, shared + "trainer.seed=1")
    assert first != second and first[:200] == second[:200]
    assert len(first.encode()) <= NAME_MAX and len(second.encode()) <= NAME_MAX
    assert job_dir(0, shared + "trainer.seed=0") == first  # the same every call: resume=auto finds it
    assert len(job_dir(12, "x=" + "\u00e9" * 300).encode()) <= NAME_MAX  # not cut inside a character
    # what follows the job number never depends on it, at any length: a renumbered job keeps its suffix
    for overrides in ("a=" + "b" * n for n in (200, 240, 241, 242, 243, 244, 245, 300)):
        names = [job_dir(num, overrides) for num in (0, 9, 10, 99, 100, 12345, 10 ** 9)]
        assert len({name.partition("_")[2] for name in names}) == 1, names
        assert all(len(name.encode()) <= NAME_MAX for name in names), names


# ----------------------------------------------------------------------------- units (no training)


def test_run_job_keeps_the_traceback_of_an_unexpected_error(tmp_path: Path, capsys) -> None:
    cfg = OmegaConf.create({"resume": None, "trainer": {"steps": 2}})

    def broken(cfg, run_dir):
        raise RuntimeError("boom\nsecond line")

    assert run_job(broken, cfg, tmp_path) != run_job(broken, cfg, tmp_path)  # NaN: a failed trial
    text = (tmp_path / "error.txt").read_text()
    assert text.splitlines()[0] == "error: RuntimeError: boom"
    assert "Traceback (most recent call last)" in text and "in broken" in text
    assert "error: RuntimeError: boom" in capsys.readouterr().err

    def user_error(cfg, run_dir):
        raise UserError("bad data")

    run_job(user_error, cfg, tmp_path)
    assert (tmp_path / "error.txt").read_text() == "error: bad data\n"
    assert run_job(lambda cfg, run_dir: 0.5, cfg, tmp_path) == 0.5
    assert not (tmp_path / "error.txt").exists()  # a successful re-run clears the old failure


def test_threads_per_job() -> None:
    joblib = lambda n: OmegaConf.create({"n_jobs": n})  # noqa: E731
    assert threads_per_job(None, 16) == 16  # basic launcher: one job at a time
    assert threads_per_job(joblib(4), 16) == 4
    assert threads_per_job(joblib(-1), 16) == 1  # joblib's default: a worker per core
    assert threads_per_job(joblib(-2), 16) == 1
    assert threads_per_job(joblib(-15), 16) == 8  # cores + 1 - 15 = 2 workers
    assert threads_per_job(joblib(64), 16) == 1
    assert threads_per_job(OmegaConf.create({"cpus_per_task": 3}), 16) == 3


def test_hparams_have_one_key_set_for_every_config() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfgs = [compose(config_name="config", overrides=o) for o in
                (["basis=binary"], ["model=lstm"], ["basis=period", "regularizer=l1"], ["task=smnist"])]
    from hrnn.config.schema import validate

    flats = [flat_hparams(validate(c)) for c in cfgs]
    types = hparam_types()
    for flat in flats:
        assert flat.keys() == types.keys()
        assert all(isinstance(v, types[k]) for k, v in flat.items())
    assert flats[1]["model.name"] == "lstm" and flats[2]["basis.name"] == "period" and flats[2]["basis.size"] == "-"
    assert flats[0]["trainer.progress"] == "true" and flats[0]["basis.size"] == "null"


def test_summary_lists_failed_and_unfinished_jobs(tmp_path: Path) -> None:
    def job(name: str, overrides: list[str], metrics: dict | None = None, error: str | None = None) -> None:
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if metrics is not None:
            (d / "metrics.json").write_text(json.dumps(metrics))
        if error is not None:
            (d / "error.txt").write_text(error + "\n\nTraceback ...\n")

    m = lambda v, seed: {"status": "finished", "metric": "mse", "val_metric": v, "test_metric": v, "seed": seed,  # noqa: E731
                         "wall_s": 1.0, "baseline": 0.5, "periods": [1, 4]}
    job("0_basis=binary,trainer.seed=0", ["basis=binary", "trainer.seed=0", "trainer.steps=9"], m(0.1, 0))
    job("1_basis=binary,trainer.seed=1", ["basis=binary", "trainer.seed=1", "trainer.steps=9", "resume=auto"], m(0.3, 1))
    job("2_basis=dct,trainer.seed=0", ["basis=dct", "trainer.seed=0", "trainer.steps=9"], error="error: it broke")
    job("3_basis=dct,trainer.seed=1", ["basis=dct", "trainer.seed=1", "trainer.steps=9"])
    (tmp_path / ".submitit").mkdir()
    jobs = read_jobs(tmp_path)
    rows = summarize(jobs)
    assert [r["basis"] for r in rows] == ["binary", "dct"]
    assert rows[0]["val_metric_mean"] == pytest.approx(0.2) and rows[0]["val_metric_std"] == pytest.approx(0.1414, abs=1e-4)
    assert (rows[1]["finished"], rows[1]["failed"], rows[1]["unfinished"]) == (0, 1, 1)
    text = format_markdown(rows, jobs)
    assert "| binary | 0,1 | 2/2 finished | 0.2000 ± 0.1414 |" in text
    assert "2_basis=dct,trainer.seed=0: failed: error: it broke" in text
    assert "3_basis=dct,trainer.seed=1: unfinished: no metrics.json" in text
