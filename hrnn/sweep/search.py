"""Bayesian hyperparameter search (`hrnn-train -m hparams_search=<preset>`) on Optuna.

Two processes take part, and the study's SQLite file in the sweep directory is their channel:
- the sweeper (hydra_plugins/hrnn_optuna_sweeper) asks the study for trials, launches them as
  jobs through any Hydra launcher (basic, joblib, SLURM) and tells the study how each ended;
- each job (`report_evaluation`, called by the runner at every evaluation) opens its own trial
  in that file, reports the validation metric at that step and raises `TrialPruned` when the
  pruner finds the trial hopeless next to the completed ones. The job writes its own files as
  usual and ends cleanly; the sweeper marks the trial pruned.
The objective is the validation metric, minimised or maximised as the task's metric requires.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from hrnn.errors import UserError

STUDY_FILE = "optuna.db"  # in the sweep directory
# How the sweeper tells a job which trial it is (through hydra.job.env_set, so also on SLURM).
ENV_STORAGE, ENV_STUDY, ENV_TRIAL = "HRNN_SEARCH_STORAGE", "HRNN_SEARCH_STUDY", "HRNN_SEARCH_TRIAL"
PRUNED_AT = "pruned_at_step"  # user attribute a job sets on its trial when the pruner stops it


class TrialPruned(Exception):
    """Raised at an evaluation when the search's pruner stops this trial (after its checkpoint is written)."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"pruned by the search at step {step} (val {value:.4f})")
        self.step, self.value = step, value


def storage_url(path: Path) -> str:
    return f"sqlite:///{Path(path).absolute()}"


def open_storage(url: str):
    """SQLite storage that waits for the other processes' writes instead of failing with 'database is locked'."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})


# ----------------------------------------------------------------------------- search space


def distribution(key: str, sweep: Any):
    """Optuna distribution of a Hydra sweep value: choice(...) / a,b,c, range(a,b[,step]),
    interval(a,b), with tags `log` (log scale) and `int` (integers) on intervals."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(list(sweep.list))
    if isinstance(sweep, RangeSweep):
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)) and sweep.step > 0:
            last = sweep.start + (sweep.stop - 1 - sweep.start) // sweep.step * sweep.step  # range() excludes stop
            return IntDistribution(sweep.start, last, step=sweep.step)
        raise UserError(f"search parameter {key}=range(...) needs integer start, stop and a positive step")
    if isinstance(sweep, IntervalSweep):
        log = "log" in sweep.tags
        if "int" in sweep.tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log=log)
        return FloatDistribution(sweep.start, sweep.end, log=log)
    raise UserError(f"search parameter {key} is not a sweep; use choice(...), range(...) or interval(...)")


def as_override(key: str, value: Any) -> str:
    """`key=value` that Hydra parses back to the same value."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return f"{key}={text}"


# ----------------------------------------------------------------------------- job side

_trial_cache: dict[tuple[str, str, int], Any] = {}


def report_evaluation(step: int, value: float, higher_is_better: bool) -> None:
    """Inside a search trial: report the validation metric; raise TrialPruned if the pruner says stop.
    Outside a search (no trial in the environment) it does nothing."""
    if ENV_TRIAL not in os.environ:
        return
    trial = _job_trial(higher_is_better)
    trial.report(float(value), step)
    if trial.should_prune():
        trial.set_user_attr(PRUNED_AT, step)
        raise TrialPruned(step, float(value))


def _job_trial(higher_is_better: bool):
    """This job's running trial, opened from the study's storage with the search's pruner."""
    import optuna

    key = (os.environ[ENV_STORAGE], os.environ[ENV_STUDY], int(os.environ[ENV_TRIAL]))
    if key not in _trial_cache:
        url, name, number = key
        study = optuna.load_study(study_name=name, storage=open_storage(url), pruner=_search_pruner())
        wanted = optuna.study.StudyDirection.MAXIMIZE if higher_is_better else optuna.study.StudyDirection.MINIMIZE
        if study.direction != wanted:
            word = "higher" if higher_is_better else "lower"
            raise UserError(f"hydra.sweeper.direction={study.direction.name.lower()} but this task's metric is better "
                            f"when {word}; set hydra.sweeper.direction={wanted.name.lower()}")
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        _trial_cache.clear()  # a joblib worker runs one trial after another
        _trial_cache[key] = optuna.Trial(study, trial_id)
    return _trial_cache[key]


def _search_pruner():
    """The pruner of this job's search, from the sweeper's config in the job's Hydra config."""
    import optuna
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    config = HydraConfig.get().sweeper.get("pruner") if HydraConfig.initialized() else None
    return instantiate(config) if config is not None else optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------- reading a study


def study_in(sweep_dir: Path):
    """The study stored in a sweep directory, or None when the sweep was not a search."""
    path = Path(sweep_dir) / STUDY_FILE
    if not path.exists():
        return None
    import optuna

    storage = open_storage(storage_url(path))
    (summary,) = optuna.study.get_all_study_summaries(storage) or (None,)
    return None if summary is None else optuna.load_study(study_name=summary.study_name, storage=storage)


def best_lines(study) -> list[str]:
    """The best trial's value and parameters, as printed at the end of a search."""
    from optuna.trial import TrialState

    states = [t.state for t in study.trials]
    counts = ", ".join(f"{states.count(s)} {s.name.lower()}" for s in TrialState if states.count(s))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    if not done:
        return [f"search: no trial completed ({counts})"]
    best = study.best_trial
    return [f"search: {len(states)} trials ({counts}); objective: val metric, {study.direction.name.lower()}d",
            f"best trial {best.number}: value {best.value:.6g}",
            "best parameters: " + " ".join(as_override(k, v) for k, v in best.params.items())]
