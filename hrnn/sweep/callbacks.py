"""Sweeps (`hrnn-train -m ...`): one job per directory, failures kept, finished jobs skipped.

- `run_job` wraps `train` for a multirun job: with `resume=auto` a finished job returns its
  stored validation metric without training (a SLURM job requeued by submitit continues as with
  `resume=auto`, unasked); a failure of one job is recorded in that job's
  `error.txt` (one line, then the traceback for unexpected exceptions) and the sweep goes on.
  A trial that a hyperparameter search pruned ends cleanly with its files and a one-line `pruned.txt`.
- `SweepReport` (a Hydra callback, see conf/config.yaml) prints the summary table when the
  sweep ends and exits non-zero with one line when a job of this sweep failed. After a search
  (hrnn/sweep/search.py) the table is sorted by the objective, followed by the best trial; a failed
  trial is then one outcome among others, and only a search where no trial completed exits 1.
- `threads_per_job` divides the cores among the jobs a launcher runs at once.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hrnn.errors import UserError
from hrnn.sweep.search import TrialPruned

FAILED = float("nan")  # a failed job's return value (sweepers such as Optuna treat NaN as a failed trial)
ERROR_FILE = "error.txt"
PRUNED_FILE = "pruned.txt"


# ----------------------------------------------------------------------------- one job


def run_job(train: Callable[[DictConfig, Path], float], cfg: DictConfig, run_dir: Path) -> float:
    """Run one multirun job; never raises an Exception (Ctrl-C and SystemExit still stop the sweep)."""
    continue_if_requeued(cfg)
    if resume_auto(cfg):
        adopt_renumbered_job(run_dir)
    stored = finished_value(cfg, run_dir)
    if stored is not None:
        print(f"{run_dir.name}: already finished (val {stored:.4f}); skipped (resume=auto)", flush=True)
        return stored
    (run_dir / ERROR_FILE).unlink(missing_ok=True)  # a re-run replaces an old failure
    from hrnn.train.resume import atomic_write_bytes  # here: hrnn.train.resume imports this module

    try:
        return train(cfg, run_dir)
    except TrialPruned as pruned:
        atomic_write_bytes(run_dir / PRUNED_FILE, f"{pruned}\n".encode())
        print(f"{run_dir.name}: {pruned}; its checkpoints and events are kept", flush=True)
        return pruned.value
    except UserError as exc:
        message, detail = f"error: {exc}", ""
    except Exception as exc:  # noqa: BLE001 - a job's bug must not stop the other jobs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"error: {type(exc).__name__}: {first}".rstrip(": ")
        detail = traceback.format_exc()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / ERROR_FILE, (message + "\n" + (f"\n{detail}" if detail else "")).encode())
    print(f"{message}\n  (job {run_dir.name} failed; kept in {run_dir / ERROR_FILE}; the other jobs go on)",
          file=sys.stderr, flush=True)
    return FAILED


def resume_auto(cfg: DictConfig) -> bool:
    return cfg.get("resume") is not None and str(cfg.resume) == "auto"


def continue_if_requeued(cfg: DictConfig) -> None:
    """A SLURM job that submitit requeued (preemption, time limit) is the same job started again, so it
    continues its run as resume=auto would (from its last checkpoint; a finished one is skipped) without
    the user asking. The run in its directory can only be its own: a sweep without resume=auto refuses a
    directory that holds runs (hrnn.cli.train), and resume=auto refuses a changed key."""
    from hrnn.train.environment import requeued  # here: hrnn.train.environment imports this module

    if cfg.get("resume") is None and requeued():
        cfg.resume = "auto"
        print(f"SLURM requeued this job (restart {requeued()}); it continues its run as with resume=auto", flush=True)


def has_run(job_dir: Path) -> bool:
    return (job_dir / "metrics.json").exists() or (job_dir / "checkpoints").is_dir()


def adopt_renumbered_job(run_dir: Path) -> None:
    """resume=auto after the sweep changed shape (a seed or a value added to it): Hydra numbers the
    jobs anew (subdir `<num>_<overrides>`), so this job's earlier directory may carry another number.
    If exactly one sibling holds a run of the same overrides, it becomes this job's directory (a
    rename: nothing is lost; only the `.hydra` files and empty log Hydra just made for this call go)."""
    num, sep, overrides = run_dir.name.partition("_")
    if not sep or not num.isdigit() or has_run(run_dir) or not run_dir.parent.is_dir():
        return
    earlier = [p for p in run_dir.parent.iterdir()
               if p != run_dir and p.is_dir() and p.name.partition("_")[0].isdigit()
               and p.name.partition("_")[2] == overrides and has_run(p)]
    if len(earlier) != 1:
        return
    if run_dir.exists():  # Hydra made it for this call: its .hydra and an empty job log, nothing else
        made = [p for p in run_dir.iterdir() if p.name != ".hydra"]
        if any(not (p.is_file() and p.suffix == ".log" and p.stat().st_size == 0) for p in made):
            return
        for p in made:
            p.unlink()
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        run_dir.rmdir()
    earlier[0].rename(run_dir)
    print(f"{run_dir.name}: this job's run was in {earlier[0].name} (the sweep's numbering changed); "
          f"renamed (resume=auto)", flush=True)


def finished_value(cfg: DictConfig, run_dir: Path) -> float | None:
    """With resume=auto: the stored val_metric of a job that already finished its trainer.steps
    (or spent its trainer.max_wall_s), else None."""
    if not resume_auto(cfg):
        return None
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    budget = OmegaConf.select(cfg, "trainer.max_wall_s", default=None)
    out_of_time = budget is not None and metrics.get("wall_s", 0) >= budget
    if metrics.get("status") != "finished" or (
            metrics.get("steps", 0) < OmegaConf.select(cfg, "trainer.steps", default=0) and not out_of_time):
        return None  # more steps (or time) asked for: resume from the last checkpoint instead
    return float(metrics["val_metric"])


def override_unchanged(key: str, current: DictConfig, stored: DictConfig) -> bool:
    """Whether a command-line override leaves the stored (validated) config as it is, e.g. a
    sweep's `basis=dct` when resume=auto continues that very job."""
    from hrnn.config.schema import validate

    missing = object()
    try:
        now = OmegaConf.select(validate(current), key, default=missing)
    except UserError:
        return False
    before = OmegaConf.select(stored, key, default=missing)
    return now is not missing and before is not missing and now == before


# ----------------------------------------------------------------------------- threads


def threads_per_job(launcher: DictConfig | None, cores: int) -> int:
    """Torch threads for one job when `launcher` runs several jobs at once on `cores` cores.

    joblib: n_jobs workers (n_jobs < 0 means cores + 1 + n_jobs, as in joblib), so cores // n_jobs;
    submitit: cpus_per_task when set (also the way to share cores among submitit_local's jobs).
    """
    launcher = launcher if launcher is not None else OmegaConf.create()
    cpus = OmegaConf.select(launcher, "cpus_per_task", default=None)
    if cpus:
        return max(1, int(cpus))
    n_jobs = OmegaConf.select(launcher, "n_jobs", default=None)
    if n_jobs is None:
        return cores
    return max(1, cores // min(joblib_workers(int(n_jobs), cores), cores))


def joblib_workers(n_jobs: int, cores: int) -> int:
    """Jobs joblib runs at once for its n_jobs (n_jobs < 0 means cores + 1 + n_jobs)."""
    return max(1, cores + 1 + n_jobs if n_jobs < 0 else n_jobs)


# ----------------------------------------------------------------------------- end of a sweep


class SweepReport(Callback):
    """At the end of a multirun: print the summary table; exit 1 if a job of this sweep failed."""

    def __init__(self) -> None:
        self.started = time.time()
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from hrnn.sweep.search import best_lines, study_in
        from hrnn.sweep.summary import format_markdown, read_jobs, summarize

        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        jobs = read_jobs(sweep_dir)
        study = study_in(sweep_dir)
        rows = summarize(jobs)
        if study is not None:  # a search: best first
            sign = -1.0 if study.direction.name == "MAXIMIZE" else 1.0
            rows.sort(key=lambda r: (r["val_metric_mean"] is None, sign * (r["val_metric_mean"] or 0.0)))
        if jobs:
            print("\n" + format_markdown(rows, jobs), flush=True)
        if study is not None:
            lines = best_lines(study)
            print("\n".join(lines), flush=True)
            if lines[0].startswith("search: no trial completed"):
                print(f"error: no trial of the search completed; see the jobs' {ERROR_FILE} under {sweep_dir}",
                      file=sys.stderr, flush=True)
                raise SystemExit(1)
            return
        failed = [j for j in jobs if j["status"] == "failed" and j.get("error_mtime", 0) >= self.started - 1]
        if failed:
            print(f"error: {len(failed)} of {len(jobs)} jobs failed ({', '.join(j['name'] for j in failed)}); "
                  f"each error is in its job's {ERROR_FILE} under {sweep_dir}", file=sys.stderr, flush=True)
            raise SystemExit(1)
