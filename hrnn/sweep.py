"""Sweeps (`hrnn-train -m ...`): one job per directory, failures kept, finished jobs skipped.

- `run_job` wraps `train` for a multirun job: with `resume=auto` a finished job returns its
  stored validation metric without training; a failure of one job is recorded in that job's
  `error.txt` (one line, then the traceback for unexpected exceptions) and the sweep goes on.
- `SweepReport` (a Hydra callback, see conf/config.yaml) prints the summary table when the
  sweep ends and exits non-zero with one line when a job of this sweep failed.
- `threads_per_job` divides the cores among the jobs a launcher runs at once.
- `log_hparams` writes the run's hyperparameters and final metrics for TensorBoard's HPARAMS tab.
"""
from __future__ import annotations

import json
import math
import sys
import time
import traceback
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hrnn.errors import UserError

FAILED = float("nan")  # a failed job's return value (sweepers such as Optuna treat NaN as a failed trial)
ERROR_FILE = "error.txt"


# ----------------------------------------------------------------------------- one job


def run_job(train: Callable[[DictConfig, Path], float], cfg: DictConfig, run_dir: Path) -> float:
    """Run one multirun job; never raises an Exception (Ctrl-C and SystemExit still stop the sweep)."""
    stored = finished_value(cfg, run_dir)
    if stored is not None:
        print(f"{run_dir.name}: already finished (val {stored:.4f}); skipped (resume=auto)", flush=True)
        return stored
    (run_dir / ERROR_FILE).unlink(missing_ok=True)  # a re-run replaces an old failure
    try:
        return train(cfg, run_dir)
    except UserError as exc:
        message, detail = f"error: {exc}", ""
    except Exception as exc:  # noqa: BLE001 - a job's bug must not stop the other jobs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"error: {type(exc).__name__}: {first}".rstrip(": ")
        detail = traceback.format_exc()
    from hrnn.checkpoint import atomic_write_bytes

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / ERROR_FILE, (message + "\n" + (f"\n{detail}" if detail else "")).encode())
    print(f"{message}\n  (job {run_dir.name} failed; kept in {run_dir / ERROR_FILE}; the other jobs go on)",
          file=sys.stderr, flush=True)
    return FAILED


def finished_value(cfg: DictConfig, run_dir: Path) -> float | None:
    """With resume=auto: the stored val_metric of a job that already finished its trainer.steps, else None."""
    if cfg.get("resume") is None or str(cfg.resume) != "auto":
        return None
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("status") != "finished" or metrics.get("steps", 0) < OmegaConf.select(cfg, "trainer.steps", default=0):
        return None  # more steps asked for: resume from the last checkpoint instead
    return float(metrics["val_metric"])


def override_unchanged(key: str, current: DictConfig, stored: DictConfig) -> bool:
    """Whether a command-line override leaves the stored (validated) config as it is, e.g. a
    sweep's `basis=dct` when resume=auto continues that very job."""
    from hrnn.config import validate

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
    n_jobs = int(n_jobs)
    workers = cores + 1 + n_jobs if n_jobs < 0 else n_jobs
    return max(1, cores // max(1, min(workers, cores)))


# ----------------------------------------------------------------------------- TensorBoard HPARAMS

HPARAM_GROUPS = ("task", "model", "basis", "regularizer", "optim", "trainer")
HPARAM_METRICS = ("val_metric", "test_metric", "baseline", "wall_s", "train_step_s", "params")


def hparam_types() -> dict[str, type]:
    """Every key any option of a group can have, with one type each (float or str), so every
    job of any sweep writes the same keys with the same types (TensorBoard takes the list of
    hyperparameters from one run's summary, so runs with other keys would lose columns)."""
    from hrnn.config import SCHEMAS, TrainerSchema

    out: dict[str, type] = {}
    for group in HPARAM_GROUPS:
        schemas = list(SCHEMAS[group].values()) if group in SCHEMAS else [TrainerSchema]
        hints = [typing.get_type_hints(schema) for schema in dict.fromkeys(schemas)]
        names = dict.fromkeys(f.name for schema in dict.fromkeys(schemas) for f in fields(schema))
        for name in names:
            kinds = {h.get(name) for h in hints}
            if kinds and kinds <= {int, float}:
                out[f"{group}.{name}"] = float
            else:  # bool, optional, list, str, or absent from some option
                out[f"{group}.{name}"] = str
    return out


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The config as {"group.key": float | str}, the same keys and types for every run."""
    values = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, Any] = {}
    for key, kind in hparam_types().items():
        group, name = key.split(".", 1)
        present = isinstance(values.get(group), dict) and name in values[group]
        value = values[group][name] if present else None
        if kind is str:
            out[key] = "-" if not present else "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        else:
            out[key] = kind(value)
    return out


def log_hparams(writer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Write the hparams summary into this run's own event file (no sub-run), with the final metrics."""
    from torch.utils.tensorboard.summary import hparams

    values = {f"hparams/{k}": _number(metrics.get(k)) for k in HPARAM_METRICS}
    for summary in hparams(flat_hparams(cfg), values):
        writer.file_writer.add_summary(summary)
    for tag, value in values.items():
        writer.add_scalar(tag, value, metrics.get("steps", 0))
    writer.flush()


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


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
        from hrnn.summary import format_markdown, read_jobs, summarize

        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        jobs = read_jobs(sweep_dir)
        if jobs:
            print("\n" + format_markdown(summarize(jobs), jobs), flush=True)
        failed = [j for j in jobs if j["status"] == "failed" and j.get("error_mtime", 0) >= self.started - 1]
        if failed:
            print(f"error: {len(failed)} of {len(jobs)} jobs failed ({', '.join(j['name'] for j in failed)}); "
                  f"each error is in its job's {ERROR_FILE} under {sweep_dir}", file=sys.stderr, flush=True)
            raise SystemExit(1)
