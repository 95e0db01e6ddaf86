"""hrnn-train: train one model on one task, as Hydra composes it from conf/.

One training step, top to bottom, is in `train`: batch from the task, forward,
task loss plus the clock's penalty, backward, clip, step. Evaluation every
`trainer.eval_every` steps writes `checkpoints/last.pt` (and `best.pt` when the
validation metric improves); the final test uses the best checkpoint, and
`metrics.json` records the outcome for sweeps and the results study.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from hrnn.checkpoint import atomic_write_bytes, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from hrnn.config import validate
from hrnn.errors import UserError
from hrnn.models import build_model, count_parameters
from hrnn.spectrum import format_periods, heatmap, log_clock
from hrnn.sweep import log_hparams, override_unchanged, run_job, threads_per_job
from hrnn.tasks import Task, build_task

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("task", "model", "basis", "regularizer", "optim", "trainer", "experiment")
# What may change when a run is resumed: nothing that alters the trajectory.
RESUMABLE_OVERRIDES = ("trainer.steps", "trainer.device", "trainer.num_threads", "trainer.progress", "trainer.log_every")


# ----------------------------------------------------------------------------- the loop


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Train, evaluate, test; write checkpoints and metrics.json into run_dir. Returns the best validation metric."""
    started = time.time()
    resume_state = _resume_state(cfg, run_dir)
    if resume_state is not None:
        cfg = _config_for_resume(resume_state, cfg)
    cfg = validate(cfg)
    trainer = cfg.trainer
    device = pick_device(trainer.device)
    torch.set_num_threads(_num_threads(trainer.num_threads))
    _check_writable(run_dir)
    seed_everything(trainer.seed)

    task = build_task(cfg.task, cfg.data_dir, trainer.seed)
    model = build_model(cfg, task.spec).to(device)
    optimizer = build_optimizer(cfg.optim, model)
    params = count_parameters(model)
    ckpt_dir = run_dir / "checkpoints"

    step, best, step_times, wall_before, skipped = 0, {"value": None, "step": 0}, [], 0.0, 0
    history: list[dict[str, Any]] = []  # one entry per evaluation: the learning curve, kept in metrics.json
    if resume_state is not None:
        _load_into(resume_state, model, optimizer, task, ckpt_dir / "last.pt")
        step, best = resume_state["step"], dict(resume_state["best"])
        history = [dict(entry) for entry in resume_state.get("history", [])]
        step_times = list(resume_state["step_times"])
        wall_before, skipped = resume_state["wall_s"], resume_state["nonfinite_skipped"]

    from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow and only needed here

    writer = SummaryWriter(log_dir=str(run_dir), purge_step=step + 1 if step else None)
    say = tqdm.write
    say(f"hrnn | task {task.name} (T={task.spec.seq_len}) | model {_describe_model(cfg)} | {params:,} parameters | {device}")
    say(f"baseline {task.metric_name} {task.baseline:.4f} ({task.baseline_note})")
    say(f"run dir {run_dir}" + (f" | resuming after step {step}" if step else ""))

    def checkpoint_state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "task": task.state_dict(),
            "step": step,
            "best": best,
            "rng": capture_rng(),
            "step_times": step_times,
            "wall_s": wall_before + time.time() - started,
            "nonfinite_skipped": skipped,
            "history": history,
            "config": OmegaConf.to_yaml(cfg),
            "model_class": _describe_model(cfg),
        }

    stop = _SignalFlag()
    bar = tqdm(total=trainer.steps, initial=step, disable=not trainer.progress, dynamic_ncols=True, unit="step")
    try:
        while step < trainer.steps:
            step += 1
            model.train()
            x, y = task.train_batch(trainer.batch_size)
            x, y = x.to(device), y.to(device)
            tick = time.perf_counter()
            output = model(x)
            loss = task.loss(output, y)
            total = loss + model.penalty().to(device)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip or math.inf)
            if not (torch.isfinite(total) and torch.isfinite(grad_norm)):
                if trainer.nonfinite == "stop":
                    last = ckpt_dir / "last.pt"
                    where = f"last good checkpoint {last}" if last.exists() else "no checkpoint was written yet"
                    raise UserError(f"non-finite loss or gradient at step {step}; {where}; "
                                    f"lower optim.lr or set trainer.nonfinite=skip")
                skipped += 1
                writer.add_scalar("train/nonfinite_skipped", skipped, step)
                continue
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - tick)

            if step % trainer.log_every == 0 or step == trainer.steps:
                with torch.no_grad():
                    train_metric = task.metrics(output.detach(), y)[task.metric_name]
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar(f"train/{task.metric_name}", train_metric, step)
                writer.add_scalar("train/penalty", (total - loss).item(), step)
                writer.add_scalar("train/grad_norm", grad_norm.item(), step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                writer.add_scalar("train/steps_per_s", 1.0 / statistics.median(step_times[-trainer.log_every:]), step)
                bar.set_postfix(loss=f"{loss.item():.4f}", **{task.metric_name: f"{train_metric:.4f}"}, refresh=False)
            bar.update(1)

            if step % trainer.eval_every == 0 or step == trainer.steps:
                tock = time.perf_counter()
                val = evaluate(model, task, "val", trainer.eval_batch_size, device)
                for name, value in val.items():
                    writer.add_scalar(f"val/{name}", value, step)
                writer.add_scalar("val/eval_s", time.perf_counter() - tock, step)
                line = f"step {step}/{trainer.steps} | val {task.metric_name} {val[task.metric_name]:.4f}"
                if task.is_better(val[task.metric_name], best["value"]):
                    best = {"value": val[task.metric_name], "step": step}
                    _save(ckpt_dir / "best.pt", checkpoint_state(), model)
                line += f" (best {best['value']:.4f} at {best['step']})"
                entry: dict[str, Any] = {"step": step, **{f"val_{name}": value for name, value in val.items()}}
                if model.clock is not None:
                    summary = log_clock(writer, model.clock, task.spec.seq_len, step)
                    entry["periods"] = [float(p) for p in summary["periods"]]
                    entry["wave_periods"] = [float(p) for p in model.clock.wave_periods()]
                    if hasattr(task, "recovered"):
                        found, found_wave = _log_recovery(writer, task, entry["periods"], entry["wave_periods"], step)
                        entry["recovered"], entry["recovered_wave"] = len(found), len(found_wave)
                        line += f" | recovered {len(found)}/{len(task.periods)} (wave {len(found_wave)})"
                    line += f" | periods {format_periods(summary['periods'])}"  # always last
                connectivity = model.connectivity()
                if connectivity is not None:  # (M, M), row i reads column j: a square image and a matrix
                    square = heatmap(connectivity, row_height=max(1, 256 // len(connectivity)))
                    writer.add_image("model/connectivity", square, step)
                    entry["connectivity"] = connectivity.tolist()
                history.append(entry)
                _save(ckpt_dir / "last.pt", checkpoint_state(), model)
                writer.flush()
                say(line)
            if stop.signum is not None:
                _save(ckpt_dir / "last.pt", checkpoint_state(), model)
                writer.close()
                say(f"stopped by {signal.Signals(stop.signum).name} at step {step}; checkpoint saved; "
                    f"continue with: hrnn-train resume={run_dir}")
                raise SystemExit(128 + stop.signum)
    finally:
        bar.close()
        stop.restore()

    # Final test on the best checkpoint.
    best_state = load_checkpoint(ckpt_dir / "best.pt")
    model.load_state_dict(best_state["model"])
    test = evaluate(model, task, "test", trainer.eval_batch_size, device)
    val = evaluate(model, task, "val", trainer.eval_batch_size, device)
    for name, value in test.items():
        writer.add_scalar(f"test/{name}", value, step)
    metrics = {
        "metric": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "val_metric": val[task.metric_name],
        "test_metric": test[task.metric_name],
        "baseline": task.baseline,
        "best_step": best["step"],
        "val": val,
        "test": test,
        "params": params,
        "steps": step,
        "wall_s": wall_before + time.time() - started,
        "train_step_s": statistics.median(step_times) if step_times else None,
        "nonfinite_skipped": skipped,
        "task": task.name,
        "model": cfg.model.name,
        "basis": cfg.basis.name,
        "regularizer": cfg.regularizer.name,
        "seed": trainer.seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "status": "finished",
        "history": history,
    }
    if model.connectivity() is not None:
        metrics["connectivity"] = model.connectivity().tolist()
    if model.clock is not None:
        metrics["periods"] = model.clock.periods()
        metrics["wave_periods"] = [float(p) for p in model.clock.wave_periods()]
        if hasattr(task, "recovered"):
            found, found_wave = _log_recovery(writer, task, metrics["periods"], metrics["wave_periods"], step)
            metrics.update(true_periods=task.periods, recovered=len(found), recovered_periods=found,
                           recovered_wave=len(found_wave))
    log_hparams(writer, cfg, metrics)
    atomic_write_bytes(run_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    writer.close()
    say(f"test {task.metric_name} {test[task.metric_name]:.4f} | val {val[task.metric_name]:.4f} "
        f"(best step {best['step']}) | baseline {task.baseline:.4f} | {run_dir / 'metrics.json'}")
    return float(val[task.metric_name])


def _log_recovery(writer: Any, task: Task, periods: list[float], wave_periods: list[float],
                  step: int) -> tuple[list[int], list[int]]:
    """The true periods found by the dominant and by the wave reading, logged under clock/."""
    found, found_wave = task.recovered(periods), task.recovered(wave_periods)
    writer.add_scalar("clock/recovered", len(found), step)
    writer.add_scalar("clock/recovered_wave", len(found_wave), step)
    return found, found_wave


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, split: str, batch_size: int, device: torch.device) -> dict[str, float]:
    """Sample-weighted means of the task's metrics (and loss) over a fixed split."""
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    for x, y in task.eval_batches(split, batch_size):
        x, y = x.to(device), y.to(device)
        output = model(x)
        values = {"loss": task.loss(output, y).item(), **task.metrics(output, y), **model.statistics()}
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value * len(x)
        count += len(x)
    return {name: total / count for name, total in totals.items()}


def build_optimizer(optim_cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Clock parameters get their own learning rate: a softmax logit must move by several
    units for a module to change period, which takes thousands of steps at the weights' rate."""
    clock = model.clock if hasattr(model, "clock") else None
    clock_params = [p for p in clock.parameters() if p.requires_grad] if clock is not None else []
    clock_ids = {id(p) for p in clock_params}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in clock_ids]}]
    if clock_params:
        groups.append({"params": clock_params, "lr": optim_cfg.clock_lr or optim_cfg.lr, "weight_decay": 0.0})
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
    return kinds[optim_cfg.name](groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


# ----------------------------------------------------------------------------- set-up helpers


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is available; allowed here: cpu, auto")
    return torch.device(name)


def _num_threads(requested: int | None) -> int:
    """All cores for one job; a parallel sweep's jobs share them instead of oversubscribing."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return threads_per_job(OmegaConf.select(HydraConfig.get(), "launcher"), cores)
    return cores


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to the output directory {run_dir}: {exc.strerror}; "
                        f"choose another with hydra.run.dir=<dir>") from None


def _describe_model(cfg: DictConfig) -> str:
    model = cfg.model
    if model.name == "hrnn":
        return (f"hrnn {model.n_modules}x{model.hidden_size // model.n_modules} basis={cfg.basis.name} "
                f"regularizer={cfg.regularizer.name} connectivity={model.connectivity} activation={model.activation}")
    if model.name == "cwrnn":
        return f"cwrnn {model.n_modules}x{model.hidden_size // model.n_modules}"
    return f"{model.name} {model.hidden_size}"


def _save(path: Path, state: dict[str, Any], model: torch.nn.Module) -> None:
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"refusing to write {path}: the model holds non-finite weights")
    save_checkpoint(path, state)


class _SignalFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the end of the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (some launchers): keep default behaviour
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- resume


def _resume_state(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    if cfg.resume is None:
        return None
    last = run_dir / "checkpoints" / "last.pt"
    if str(cfg.resume) == "auto":
        return load_checkpoint(last) if last.exists() else None
    if not last.exists():
        raise UserError(f"resume={cfg.resume} holds no run (no checkpoints/last.pt); give a run directory written by hrnn-train")
    return load_checkpoint(last)


def _config_for_resume(state: dict[str, Any], cfg: DictConfig) -> DictConfig:
    """The stored config, plus command-line overrides that do not change the trajectory."""
    stored = OmegaConf.create(state["config"])
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    for override in overrides:
        key, _, _ = override.lstrip("+~").partition("=")
        if key == "resume" or key.startswith("hydra"):
            continue
        if key not in RESUMABLE_OVERRIDES and override_unchanged(key, cfg, stored):
            continue  # e.g. a sweep's own overrides when resume=auto continues its job
        if key not in RESUMABLE_OVERRIDES:
            raise UserError(f"cannot change {key} when resuming (it would change the run); "
                            f"allowed with resume: {', '.join(RESUMABLE_OVERRIDES)}")
        OmegaConf.update(stored, key, OmegaConf.select(cfg, key), merge=False)
    stored.resume = cfg.resume
    return stored


def _load_into(state: dict[str, Any], model, optimizer, task: Task, path: Path) -> None:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        task.load_state_dict(state["task"])
    except (RuntimeError, KeyError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not fit this model/task ({state.get('model_class')}): {reason[:200]}") from None
    restore_rng(state["rng"])


# ----------------------------------------------------------------------------- command line


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return run_job(train, cfg, run_dir)  # a failure is kept in the job's error.txt; the sweep goes on
    try:
        return train(cfg, run_dir)
    except UserError as exc:
        message = f"error: {exc}"
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(message, file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    """Console entry: check the command line up front, then hand it to Hydra."""
    args = sys.argv[1:]
    if "--verbose" in args:
        args.remove("--verbose")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    multirun = "-m" in args or "--multirun" in args
    try:
        if not any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
            preflight([a for a in args if a not in ("-m", "--multirun")], multirun)
            args += _resume_dir_overrides(args, multirun)
    except UserError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = [sys.argv[0]] + args
    hydra_main()


def _resume_dir_overrides(args: list[str], multirun: bool) -> list[str]:
    """resume=<dir> continues that run in place: Hydra writes into it and adds no .hydra copy."""
    for arg in args:
        if arg.startswith("resume="):
            value = arg.split("=", 1)[1]
            if value in ("auto", "null", ""):
                return []
            if multirun:
                raise UserError(f"resume={value} names one run; in a multirun use resume=auto")
            path = Path(value).expanduser()
            if not (path / "checkpoints" / "last.pt").exists():
                raise UserError(f"resume={value} holds no run (no checkpoints/last.pt); give a run directory written by hrnn-train")
            quoted = str(path.resolve()).replace("\\", "\\\\").replace("'", "\\'")
            return [f"hydra.run.dir='{quoted}'", "hydra.output_subdir=null"]
    return []


def preflight(args: list[str], multirun: bool = False) -> None:
    """Compose every configuration the command line asks for and validate it; UserError on the first problem."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as exc:
        raise UserError(f"cannot parse the command line: {str(exc).splitlines()[0]}") from None
    dir_overrides = [a for a in args if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    parsed = [o for o in parsed if not o.get_key_element().startswith("hydra")]
    choices = []
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        if key in GROUPS:
            allowed = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
            for value in values:
                if value not in allowed and not (key == "experiment" and value == "null"):
                    raise UserError(f"unknown {key} {value!r}; allowed: {', '.join(allowed)}")
        choices.append([f"{override.get_key_element()}={v}" for v in values])
    if any(c.startswith("resume=") and c != "resume=auto" and c != "resume=null" for cs in choices for c in cs):
        return  # the stored config of the run is validated when it is loaded
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for index, combination in enumerate(itertools.islice(itertools.product(*choices), 256)):
            try:
                cfg = compose(config_name="config", overrides=[*combination, *dir_overrides], return_hydra_config=index == 0)
            except (HydraException, OmegaConfBaseException) as exc:
                raise UserError(_one_line(exc, combination)) from None
            if index == 0:
                _check_output_dir(Path(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
                del cfg.hydra
            validate(cfg)


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
