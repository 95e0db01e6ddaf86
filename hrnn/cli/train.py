"""hrnn-train: train one model on one task, as Hydra composes it from conf/ (the loop: hrnn/train/loop.py).

`main` checks the whole command line first (`preflight`: every configuration it asks for is
composed and validated, in one line on the first problem), then hands it to Hydra. This module
imports the runtime (and the recurrence op, whose CPU capability may be refused) only inside the
error wrapper, so that every mistake is one line.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import hrnn.config  # noqa: F401 - registers the run_name resolver conf/config.yaml uses
from hrnn.cli.wrapper import user_errors
from hrnn.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
MULTIRUN_FLAGS = ("-m", "--multirun")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    return run(cfg)  # Hydra names the job after this function's file: keep it undecorated


@user_errors
def run(cfg: DictConfig) -> float:
    """One run, or one job of a multirun; a UserError of a single run ends it in one line."""
    from hrnn.sweep.callbacks import run_job
    from hrnn.train.loop import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return run_job(locked(train), cfg, run_dir)  # a failure is kept in the job's error.txt; the sweep goes on
    return locked(train)(cfg, run_dir)


def locked(train: Callable[[DictConfig, Path], float]) -> Callable[[DictConfig, Path], float]:
    """`train` holding the run directory's lock throughout (one writer per directory), and refusing a new
    run where one started; in a sweep after resume=auto has found the job's directory."""
    from hrnn.train.environment import run_lock
    from hrnn.train.resume import check_new_run

    def locked_train(cfg: DictConfig, run_dir: Path) -> float:
        with run_lock(run_dir):
            if cfg.resume is None:
                check_new_run(run_dir)
            return train(cfg, run_dir)

    return locked_train


def main() -> None:
    """Console entry: check the command line up front, then hand it to Hydra."""
    args = sys.argv[1:]
    if "--verbose" in args:
        args.remove("--verbose")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [sys.argv[0], *check_command_line(args)]
    hydra_main()


@user_errors
def check_command_line(args: list[str]) -> list[str]:
    """The arguments for Hydra: validated by `preflight`, and resume=<dir> turned into that run's directory."""
    from hrnn.ops import cpu_capability  # noqa: F401 - loads the C++ kernels: a bad HRNN_CPU_CAPABILITY fails here
    from hrnn.train.resume import resume_dir, resume_dir_overrides

    multirun = any(a in MULTIRUN_FLAGS for a in args)
    if any(a.startswith("-") and a not in MULTIRUN_FLAGS for a in args):
        return args  # Hydra's own flags (--help, --cfg job, ...)
    preflight([a for a in args if a not in MULTIRUN_FLAGS], multirun)
    path = resume_dir(args, multirun)
    if path is not None:
        check_run_dir(path, "dir")
    return [*args, *resume_dir_overrides(path)]


def preflight(args: list[str], multirun: bool = False) -> None:
    """Compose every configuration the command line asks for and validate it; UserError on the first problem."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hrnn.config.schema import validate
    from hrnn.sweep.cluster import check_cluster

    choices = _choices(args, multirun)
    if any(c.startswith("resume=") and c not in ("resume=auto", "resume=null") for cs in choices for c in cs):
        return  # the stored config of the run is validated when it is loaded
    # Hydra's settings that preflight reads: where the runs go, and which launcher takes them
    dir_overrides = [a for a in args if a.startswith(("hydra.run.dir=", "hydra.sweep.dir=", "hydra/launcher="))]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for index, combination in enumerate(itertools.islice(itertools.product(*choices), 256)):
            try:
                cfg = compose(config_name="config", overrides=[*combination, *dir_overrides], return_hydra_config=index == 0)
            except (HydraException, OmegaConfBaseException) as exc:
                raise UserError(_one_line(exc, combination)) from None
            if index == 0:
                out_dir = Path(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
                _check_output_dir(out_dir)
                (_check_sweep_dir if multirun else check_run_dir)(out_dir, cfg.resume)
                if multirun:
                    check_cluster(cfg.hydra.launcher)  # a SLURM sweep: sbatch and sacct answer
                del cfg.hydra
            cfg = validate(cfg)
            if not multirun:  # a sweep's job without its data fails alone, kept in its error.txt
                _check_data(cfg)


def check_run_dir(path: Path, resume: str | None) -> None:
    """Before Hydra writes into `path`: nobody else writes there, a new run does not go where one started,
    and a run to continue can take new checkpoints."""
    from hrnn.sweep.callbacks import has_run
    from hrnn.train.environment import in_use_message, lock_holder
    from hrnn.train.resume import check_new_run, check_writable_run

    holder = lock_holder(path)
    if holder is not None:
        raise UserError(in_use_message(path, holder))
    if resume is None:
        check_new_run(path)
    elif has_run(path):
        check_writable_run(path)


def _check_sweep_dir(sweep: Path, resume: str | None) -> None:
    """check_run_dir for each job directory an earlier sweep left; without resume=auto there must be none
    (a search says so itself, naming its study)."""
    from hrnn.sweep.callbacks import has_run
    from hrnn.sweep.search import STUDY_FILE

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) if sweep.is_dir() else []
    for job in jobs:
        if resume is None and has_run(job) and not (sweep / STUDY_FILE).exists():
            raise UserError(f"{sweep} already holds the runs of a sweep ({job.name}, ...); continue that sweep with "
                            f"resume=auto, or choose another directory with hydra.sweep.dir=<dir>")
        check_run_dir(job, "auto")


def _check_data(cfg: DictConfig) -> None:
    """A task that reads files is built once here, so that missing or damaged data fail before Hydra
    makes a run directory."""
    from hrnn.config import registry
    from hrnn.tasks import build_task

    if cfg.task.name in registry.DATA_TASKS:
        build_task(cfg.task, cfg.data_dir, cfg.trainer.seed, cfg.trainer.batch_size)


def _choices(args: list[str], multirun: bool) -> list[list[str]]:
    """Each non-hydra override's values as `key=value` lines; the config groups' options checked by name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as exc:
        raise UserError(f"cannot parse the command line: {str(exc).splitlines()[0]}") from None
    choices = []
    for override in parsed:
        if override.get_key_element().startswith("hydra"):
            continue  # Hydra's own settings; hydra.run.dir and hydra.sweep.dir are composed with every choice
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override() and not override.is_discrete_sweep():
            continue  # interval(...) of a search: the search's jobs are validated when they start
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        for value in values:
            _check_option(key, value, multirun)
        choices.append([f"{override.get_key_element()}={v}" for v in values])
    return choices


def _check_option(key: str, value: str, multirun: bool) -> None:
    """A config group's option on the command line: one of its names (hrnn.config.registry), or for the
    groups without names one of its files in conf/; a search preset only with -m."""
    from hrnn.config import registry

    if key in registry.NAMED_GROUPS:
        allowed = sorted(registry.NAMED_GROUPS[key])
    elif key in registry.FILE_GROUPS:
        allowed = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
    else:
        return
    if value not in allowed and not (key in registry.PRESET_GROUPS and value == "null"):
        raise UserError(f"unknown {key} {value!r}; allowed: {', '.join(allowed)}")
    if key == "hparams_search" and value != "null" and not multirun:
        raise UserError(f"hparams_search={value} is a search of many runs: add -m (hrnn-train -m hparams_search={value})")


def _check_output_dir(path: Path) -> None:
    """Fail before Hydra does (with a traceback) when the run directory cannot be created."""
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        problem = "is not a directory" if not ancestor.is_dir() else "is not writable"
        raise UserError(f"cannot write the output directory {path}: {ancestor} {problem}; "
                        f"choose another with hydra.run.dir=<dir> (hydra.sweep.dir=<dir> with -m)")


def _one_line(exc: Exception, overrides: tuple[str, ...]) -> str:
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "Could not override" in text or "not in struct mode" in text or "Key '" in text:
        key = first.split("'")[1] if "'" in first else first
        return f"unknown config key {key!r}; see the keys with `hrnn-train --cfg job`, or add new ones with +{key}=..."
    return f"bad override ({' '.join(overrides)}): {first}"


if __name__ == "__main__":
    main()
