"""The smallest Hydra Sweeper that runs an Optuna study (hydra-optuna-sweeper 1.3.0 needs optuna<3,
whose SQLite storage fails on SQLAlchemy 2 and which cannot prune: see docs/search.md).

Each round asks the study for `n_jobs` trials, launches them as one batch through the configured
launcher (basic, joblib, SLURM), then tells the study how each ended: its validation metric,
pruned (the job marked its trial), or failed. Job k of the sweep is trial k of the study, so a
trial's files are in `<sweep dir>/<k>`; a trial left running by an interrupted search is
launched again with the same number and parameters, and `resume=auto` continues it from its
checkpoint. Its configuration (defaults included) is conf/hydra/sweeper/hrnn_optuna.yaml.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hrnn.cli.wrapper import user_errors
from hrnn.errors import UserError
from hrnn.sweep import search
from hrnn.sweep.callbacks import joblib_workers


class OptunaSweeper(Sweeper):
    def __init__(self, direction: str, study_name: str, storage: str | None, n_trials: int, n_jobs: int,
                 sampler: DictConfig, pruner: DictConfig, params: DictConfig | None) -> None:
        super().__init__()
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials = n_trials
        self.n_jobs = joblib_workers(n_jobs, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    @user_errors
    def sweep(self, arguments: list[str]) -> list[Any]:
        """Batches of trials until the study holds n_trials; trials an interrupted search left running come first."""
        path = self._storage_path()
        space, fixed = self._space(arguments)
        study, env = self._study(path)
        stale = _running(study)
        if stale:
            print(f"search: continuing {len(stale)} trial(s) left running: {', '.join(str(t.number) for t in stale)}",
                  flush=True)
        returns = []
        while True:
            if stale:
                batch, stale = _stale_batch(study, stale[: self.n_jobs]), stale[self.n_jobs:]
            else:
                remaining = self.n_trials - len(study.trials)
                if remaining <= 0:
                    break
                batch = [(trial.number, trial.params) for trial in
                         (study.ask(space) for _ in range(min(self.n_jobs, remaining)))]
            for group in _consecutive(batch):
                returns.append(self._launch(study, group, fixed, env))
        return returns

    def _storage_path(self) -> Path:
        """The study's file; UserError where a search is there already (without resume=auto) or the direction is bad."""
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        path = Path(self.storage) if self.storage else sweep_dir / search.STUDY_FILE
        if path.exists() and str(self.config.get("resume")) != "auto":
            raise UserError(f"{path} already holds a search; continue it with resume=auto, "
                            f"or start a new one in another hydra.sweep.dir")
        if self.direction not in ("minimize", "maximize"):
            raise UserError(f"hydra.sweeper.direction={self.direction!r}; allowed: minimize, maximize")
        return path

    def _study(self, path: Path):
        """The study (created, or loaded with resume=auto) with this run's sampler, and the jobs' environment."""
        import optuna  # here, not at the top: Hydra imports every plugin on every hrnn-train

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        url = search.storage_url(path)
        study = optuna.create_study(study_name=self.study_name, storage=search.open_storage(url),
                                    direction=self.direction, load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            raise UserError(f"the study stored in {path} is to {study.direction.name.lower()}, "
                            f"not to {self.direction} (hydra.sweeper.direction)")
        # A resumed search draws new points, not the first run's again: the seed moves on by the trials stored.
        study.sampler = instantiate(self.sampler_cfg, **({"seed": self.sampler_cfg.seed + len(study.trials)}
                                                         if self.sampler_cfg.get("seed") is not None else {}))
        return study, {search.ENV_STORAGE: url, search.ENV_STUDY: self.study_name}

    def _launch(self, study, group: list[tuple[int, Any]], fixed: list[str], env: dict[str, str]) -> Any:
        """Launch trials of consecutive numbers as one batch of jobs (job number = trial number); tell the study."""
        from optuna.trial import TrialState

        jobs = [[*fixed, *(search.as_override(k, v) for k, v in params.items()),
                 *(_env_override(k, v) for k, v in {**env, search.ENV_TRIAL: str(number)}.items())]
                for number, params in group]
        try:  # composed here first: a bad parameter is one line, not a failure in every job
            self.validate_batch_is_legal(jobs)
        except (HydraException, OmegaConfBaseException) as exc:
            for number, _ in group:
                study.tell(number, state=TrialState.FAIL)
            raise UserError(f"cannot compose trial {group[0][0]} "
                            f"({' '.join(jobs[0][len(fixed):-3])}): {str(exc).strip().splitlines()[0]}") from None
        results = self.launcher.launch(jobs, initial_job_idx=group[0][0])
        for (number, _), result in zip(group, results):
            self._tell(study, number, result)
        return results

    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        """Search distributions (the preset's params, then sweeps on the command line) and fixed overrides."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space, fixed = {}, []
        for override in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()]):
            space[override.get_key_element()] = search.distribution(override.get_key_element(), override.value())
        for override in parser.parse_overrides(arguments):
            key = override.get_key_element()
            if override.is_sweep_override():
                space[key] = search.distribution(key, override.value())
            else:
                space.pop(key, None)  # a fixed value on the command line takes the key out of the search
                fixed.append(override.input_line)
        if not space:
            raise UserError("the search has no parameters; set hydra.sweeper.params or give key=choice(...)")
        return space, fixed

    @staticmethod
    def _tell(study, number: int, result) -> None:
        from optuna.trial import TrialState as state

        trial = _stored(study, number)  # as the job left it
        value = result._return_value if result.status == JobStatus.COMPLETED else None
        if search.PRUNED_AT in trial.user_attrs:
            study.tell(number, state=state.PRUNED)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            study.tell(number, float(value))
        else:
            study.tell(number, state=state.FAIL)
        outcome = _stored(study, number)
        shown = "" if outcome.value is None else f" value {outcome.value:.6g}"
        print(f"search: trial {number} {outcome.state.name.lower()}{shown}", flush=True)


def _running(study) -> list:
    from optuna.trial import TrialState

    return list(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _stale_batch(study, chunk: list) -> list[tuple[int, Any]]:
    """Trials left running, to launch again: those whose job had marked them pruned are told so instead."""
    from optuna.trial import TrialState

    for trial in chunk:
        if search.PRUNED_AT in trial.user_attrs:
            study.tell(trial.number, state=TrialState.PRUNED)
    return [(t.number, t.params) for t in chunk if search.PRUNED_AT not in t.user_attrs]


def _stored(study, number: int):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _consecutive(batch: list[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
    """Runs of consecutive trial numbers: one launch each, so that job number == trial number."""
    groups: list[list[tuple[int, Any]]] = []
    for item in batch:
        if groups and groups[-1][-1][0] + 1 == item[0]:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _env_override(key: str, value: str) -> str:
    quoted = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"++hydra.job.env_set.{key}='{quoted}'"


__all__: Sequence[str] = ["OptunaSweeper"]
