"""hrnn-train: train one model on one task, as Hydra composes it from conf/.

`train` reads top to bottom: `set_up` (config, seeds, task, model, optimizer, resume),
the loop of `train_step`s (batch, forward, task loss plus the clock's penalty, backward,
clip, step), `evaluate_and_checkpoint` every `trainer.eval_every` steps (writes
`checkpoints/last.pt`, and `best.pt` when the validation metric improves), and `finish`
(the final test on the best checkpoint; `metrics.json` records the outcome for sweeps
and the results study).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from hrnn.checkpoint import atomic_write_bytes, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from hrnn.config import validate
from hrnn.core import set_matmul_precision
from hrnn.errors import UserError
from hrnn.models import SequenceModel, build_model, count_parameters
from hrnn.search import TrialPruned, report_evaluation
from hrnn.seeds import stream_seed
from hrnn.sweep import override_unchanged, run_job, threads_per_job
from hrnn.tasks import Task, build_task
from hrnn.tensorboard_logging import format_periods, heatmap, log_clock, log_hparams

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("task", "model", "basis", "regularizer", "optim", "trainer", "experiment", "hparams_search")
# What may change when a run is resumed: nothing that alters the trajectory.
RESUMABLE_OVERRIDES = ("trainer.steps", "trainer.max_wall_s", "trainer.device", "trainer.num_threads", "trainer.progress", "trainer.log_every")
say = tqdm.write  # print without breaking the progress bar


def run_name(model: str, basis: str) -> str:
    """The run directory's suffix (conf/config.yaml): the model, and for hrnn its basis; the baselines have none."""
    return f"{model}_{basis}" if model == "hrnn" else model


OmegaConf.register_new_resolver("run_name", run_name, replace=True)


# ----------------------------------------------------------------------------- the loop


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Train, evaluate, test; write checkpoints and metrics.json into run_dir. Returns the final validation metric."""
    run = set_up(cfg, run_dir)
    trainer = run.cfg.trainer
    stop = _SignalFlag()
    bar = tqdm(total=trainer.steps, initial=run.step, disable=not trainer.progress, dynamic_ncols=True, unit="step")
    try:
        while run.step < trainer.steps:
            run.step += 1
            train_step(run, bar)
            bar.update(1)
            out_of_time = trainer.max_wall_s is not None and run.wall_s() >= trainer.max_wall_s
            if run.step % trainer.eval_every == 0 or run.step == trainer.steps or out_of_time:
                evaluate_and_checkpoint(run)
            if out_of_time:
                say(f"trainer.max_wall_s={trainer.max_wall_s:g} reached at step {run.step}")
                break
            if stop.signum is not None:
                stop_with_checkpoint(run, stop.signum)
    finally:
        bar.close()
        stop.restore()
    return finish(run)


@dataclass
class Run:
    """One run's objects and the state the loop advances; `checkpoint_state` is what last.pt and best.pt hold."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    task: Task
    model: SequenceModel
    optimizer: torch.optim.Optimizer
    started: float  # time.time() when this process started the run
    step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"value": None, "step": 0})
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation: the learning curve
    step_times: list[float] = field(default_factory=list)
    wall_before: float = 0.0  # wall time spent before a resume
    skipped: int = 0  # non-finite steps skipped (trainer.nonfinite=skip)
    writer: Any = None

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def wall_s(self) -> float:
        return self.wall_before + time.time() - self.started

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "task": self.task.state_dict(),
            "step": self.step,
            "best": self.best,
            "rng": capture_rng(),
            "step_times": self.step_times,
            "wall_s": self.wall_s(),
            "nonfinite_skipped": self.skipped,
            "threads": torch.get_num_threads(),  # reused on resume: gradient sums depend on it
            "history": self.history,
            "config": OmegaConf.to_yaml(self.cfg),
            "model_class": _describe_model(self.cfg),
        }

    def save(self, name: str) -> None:
        _save(self.ckpt_dir / name, self.checkpoint_state(), self.model)


def set_up(cfg: DictConfig, run_dir: Path) -> Run:
    """Validated config (the stored one on resume), device, threads, seeds, task, model, optimizer,
    the checkpoint's state on resume, and the TensorBoard writer."""
    started = time.time()
    resume_state = _resume_state(cfg, run_dir)
    if resume_state is not None:
        cfg = _config_for_resume(resume_state, cfg)
    cfg = validate(cfg)
    trainer = cfg.trainer
    device = pick_device(trainer.device)
    torch.set_num_threads(_num_threads(trainer.num_threads))
    set_matmul_precision(trainer.matmul_precision)
    _check_writable(run_dir)
    seed_everything(trainer.seed)

    task = build_task(cfg.task, cfg.data_dir, trainer.seed)
    model = build_model(cfg, task.spec).to(device)
    run = Run(cfg, run_dir, device, task, model, build_optimizer(cfg.optim, model), started)
    if resume_state is not None:
        _load_into(resume_state, model, run.optimizer, task, run.ckpt_dir / "last.pt")
        run.step, run.best = resume_state["step"], dict(resume_state["best"])
        run.history = [dict(entry) for entry in resume_state.get("history", [])]
        run.step_times = list(resume_state["step_times"])
        run.wall_before, run.skipped = resume_state["wall_s"], resume_state["nonfinite_skipped"]

    from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow and only needed here

    run.writer = SummaryWriter(log_dir=str(run_dir), purge_step=run.step + 1 if run.step else None)
    say(f"hrnn | task {task.name} (T={task.spec.seq_len}) | model {_describe_model(cfg)} | "
        f"{count_parameters(model):,} parameters | {device}"
        + (f" (recurrence: {_cpu_kernels(device, model)})" if device.type == "cpu" else ""))
    say(f"baseline {task.metric_name} {task.baseline:.4f} ({task.baseline_note})")
    say(f"run dir {run_dir}" + (f" | resuming after step {run.step}" if run.step else ""))
    return run


def _cpu_kernels(device: torch.device, model: SequenceModel) -> str | None:
    """Which CPU recurrence runs: a capability of the fused kernels (default, avx2, avx512),
    "pytorch loop" when they are not built or the model has none, or the torch.nn module; None
    off the CPU."""
    from hrnn import fused  # imported by main first: a bad HRNN_CPU_CAPABILITY is reported there

    if device.type != "cpu":
        return None
    if model.recurrence() != "fused":
        return model.recurrence()
    return fused.cpu_capability() if fused.available() else "pytorch loop"


def train_step(run: Run, bar: tqdm) -> None:
    """Batch, forward, task loss plus the clock's penalty, backward, clip, step.

    A non-finite loss or gradient stops the run (trainer.nonfinite=stop) or skips only the
    optimizer update (skip): the step still counts, and its evaluation and checkpoint happen."""
    trainer, task, model, device = run.cfg.trainer, run.task, run.model, run.device
    model.train()
    model.set_progress(run.step / trainer.steps)  # e.g. the annealed gate's slope
    x, y = task.train_batch(trainer.batch_size)
    x, y = x.to(device), y.to(device)
    tick = time.perf_counter()
    output = model(x)
    loss = task.loss(output, y)
    total = loss + model.penalty().to(device)
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip or math.inf)
    if not (torch.isfinite(total) and torch.isfinite(grad_norm)):
        if trainer.nonfinite == "stop":
            last = run.ckpt_dir / "last.pt"
            where = f"last good checkpoint {last}" if last.exists() else "no checkpoint was written yet"
            raise UserError(f"non-finite loss or gradient at step {run.step}; {where}; "
                            f"lower optim.lr or set trainer.nonfinite=skip")
        run.skipped += 1
        run.writer.add_scalar("train/nonfinite_skipped", run.skipped, run.step)
        return
    factor = lr_factor(run.cfg.optim.schedule, run.step, trainer.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    run.optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    run.step_times.append(time.perf_counter() - tick)
    if run.step % trainer.log_every == 0 or run.step == trainer.steps:
        _log_train(run, bar, output.detach(), y, loss, total, grad_norm)


def _log_train(run: Run, bar: tqdm, output: Tensor, y: Tensor, loss: Tensor, total: Tensor, grad_norm: Tensor) -> None:
    task, writer, step = run.task, run.writer, run.step
    with torch.no_grad():
        train_metric = task.metrics(output, y)[task.metric_name]
    writer.add_scalar("train/loss", loss.item(), step)
    writer.add_scalar(f"train/{task.metric_name}", train_metric, step)
    writer.add_scalar("train/penalty", (total - loss).item(), step)
    writer.add_scalar("train/grad_norm", grad_norm.item(), step)
    writer.add_scalar("train/lr", run.optimizer.param_groups[0]["lr"], step)
    writer.add_scalar("train/steps_per_s", 1.0 / statistics.median(run.step_times[-run.cfg.trainer.log_every:]), step)
    bar.set_postfix(loss=f"{loss.item():.4f}", **{task.metric_name: f"{train_metric:.4f}"}, refresh=False)


def evaluate_and_checkpoint(run: Run) -> None:
    """Validation metrics and the clock to TensorBoard and the history; best.pt when the metric improves; last.pt."""
    task, model, writer, step, trainer = run.task, run.model, run.writer, run.step, run.cfg.trainer
    tock = time.perf_counter()
    val = evaluate(model, task, "val", trainer.eval_batch_size, run.device)
    for name, value in val.items():
        writer.add_scalar(f"val/{name}", value, step)
    writer.add_scalar("val/eval_s", time.perf_counter() - tock, step)
    line = f"step {step}/{trainer.steps} | val {task.metric_name} {val[task.metric_name]:.4f}"
    if task.is_better(val[task.metric_name], run.best["value"]):
        run.best = {"value": val[task.metric_name], "step": step}
        run.save("best.pt")
    line += f" (best {run.best['value']:.4f} at {run.best['step']})"
    # wall_s: time to this evaluation (resumes included), so a table can say how long a threshold took.
    entry: dict[str, Any] = {"step": step, "wall_s": run.wall_s(), **{f"val_{name}": value for name, value in val.items()}}
    if model.clock is not None:
        summary = log_clock(writer, model.clock, task.spec.seq_len, step, run.history)
        entry["periods"] = [float(p) for p in summary["periods"]]
        entry["wave_periods"] = [float(p) for p in model.clock.wave_periods()]
        if hasattr(task, "recovered"):
            found, found_wave = _log_recovery(writer, task, entry["periods"], entry["wave_periods"], step)
            entry["recovered"], entry["recovered_wave"] = len(found), len(found_wave)
            line += f" | recovered {len(found)}/{len(task.periods)} (wave {len(found_wave)})"
        line += f" | periods {format_periods(summary['periods'])}"  # always last
    connectivity = model.connectivity()
    if connectivity is not None:  # (M, M), row i reads column j: a square image and a matrix
        writer.add_image("model/connectivity", heatmap(connectivity, row_height=max(1, 256 // len(connectivity))), step)
        entry["connectivity"] = connectivity.tolist()
    run.history.append(entry)
    run.save("last.pt")
    writer.flush()
    say(line)
    try:  # in a hyperparameter search, a hopeless trial stops here, its files kept
        report_evaluation(step, val[task.metric_name], task.higher_is_better)
    except TrialPruned:
        writer.close()
        raise


def stop_with_checkpoint(run: Run, signum: int) -> None:
    """After SIGINT/SIGTERM: save last.pt, say how to continue, exit 128 + signum."""
    run.save("last.pt")
    run.writer.close()
    say(f"stopped by {signal.Signals(signum).name} at step {run.step}; checkpoint saved; "
        f"continue with: hrnn-train {resume_argument(run.run_dir)}")
    raise SystemExit(128 + signum)


def finish(run: Run) -> float:
    """Test the best checkpoint, write metrics.json and the hparams; return the final validation metric."""
    task, model, writer, step, cfg = run.task, run.model, run.writer, run.step, run.cfg
    best_state = load_checkpoint(run.ckpt_dir / "best.pt")
    model.load_state_dict(best_state["model"])
    test = evaluate(model, task, "test", cfg.trainer.eval_batch_size, run.device)
    val = evaluate(model, task, "val", cfg.trainer.eval_batch_size, run.device)
    for name, value in test.items():
        writer.add_scalar(f"test/{name}", value, step)
    metrics = {
        "metric": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "val_metric": val[task.metric_name],
        "test_metric": test[task.metric_name],
        "baseline": task.baseline,
        "best_step": run.best["step"],
        "val": val,
        "test": test,
        "params": count_parameters(model),
        "steps": step,
        "wall_s": run.wall_s(),
        "max_wall_s": cfg.trainer.max_wall_s,
        "train_step_s": statistics.median(run.step_times) if run.step_times else None,
        "nonfinite_skipped": run.skipped,
        "task": task.name,
        "model": cfg.model.name,
        "basis": cfg.basis.name,
        "regularizer": cfg.regularizer.name,
        "seed": cfg.trainer.seed,
        "device": str(run.device),
        "cpu_kernels": _cpu_kernels(run.device, model),
        "threads": torch.get_num_threads(),
        "status": "finished",
        "history": run.history,
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
    atomic_write_bytes(run.run_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    writer.close()
    say(f"test {task.metric_name} {test[task.metric_name]:.4f} | val {val[task.metric_name]:.4f} "
        f"(best step {run.best['step']}) | baseline {task.baseline:.4f} | {run.run_dir / 'metrics.json'}")
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
    units for a module to change period, which takes thousands of steps at the weights' rate.

    optim.clock_lr=0 freezes the clock at its start (the ablation against a fixed hierarchy):
    its parameters stop requiring gradients, so they get no update, no optimizer state and no
    share of the clipped gradient norm. null gives them optim.lr. Learned connectivity's gate
    logits get optim.connectivity_lr for the same reason (at optim.lr they stayed at their start)."""
    clock = model.clock if hasattr(model, "clock") else None
    clock_params = [p for p in clock.parameters() if p.requires_grad] if clock is not None else []
    if optim_cfg.clock_lr == 0:
        for p in clock_params:
            p.requires_grad_(False)
        clock_params = []
    logits = getattr(model, "connectivity_logits", None)
    gate_params = [logits] if logits is not None else []
    own = {id(p) for p in clock_params + gate_params}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in own]}]
    if clock_params:
        clock_lr = optim_cfg.lr if optim_cfg.clock_lr is None else optim_cfg.clock_lr
        groups.append({"params": clock_params, "lr": clock_lr, "weight_decay": 0.0})
    if gate_params:  # like a clock logit, a gate logit must move by units, not by lr-sized steps
        gate_lr = optim_cfg.lr if optim_cfg.connectivity_lr is None else optim_cfg.connectivity_lr
        groups.append({"params": gate_params, "lr": gate_lr, "weight_decay": 0.0})
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
    optimizer = kinds[optim_cfg.name](groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    for group in optimizer.param_groups:  # the schedule scales each group's own starting rate
        group["base_lr"] = group["lr"]
    return optimizer


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate of step `step` (1-based) as a fraction of optim.lr: cosine runs from 1 at
    step 1 to 0 after trainer.steps. A function of the step alone, so a resumed run keeps it."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
    return 1.0


# ----------------------------------------------------------------------------- set-up helpers


def pick_device(name: str) -> torch.device:
    """`auto` is cuda where there is a GPU; validation has refused `cuda` without one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    """The global RNGs (model initialisation, random clock starts) draw from the model stream."""
    model_seed = stream_seed("model", seed)
    random.seed(model_seed)
    np.random.seed(model_seed % 2**32)
    torch.manual_seed(model_seed)


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


# Signals that ask the loop to checkpoint and stop: Ctrl-C, kill, and SIGUSR2, which SLURM jobs launched
# by submitit receive shortly before their time limit (submitit's own handler would raise mid-step).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))


class _SignalFlag:
    """A stop signal asks the loop to checkpoint and stop at the end of the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}
        for sig in STOP_SIGNALS:
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
    """The stored config, plus command-line overrides that do not change the trajectory.

    The thread count is the run's own: the kernels sum gradients per thread, so the stored
    count is reused (docs/resume.md); an explicit trainer.num_threads still wins, with a note."""
    stored = OmegaConf.create(state["config"])
    # Keys added since the run was made (trainer.matmul_precision, model.activation, ...) take
    # today's defaults, which keep the old behaviour; only within the same option of a group.
    for group in ("task", "model", "basis", "regularizer", "optim", "trainer"):
        if group in stored and stored[group].get("name") == cfg[group].get("name"):
            stored[group] = OmegaConf.merge(cfg[group], stored[group])
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    overridden = set()
    for override in overrides:
        key, _, _ = override.lstrip("+~").partition("=")
        if key in ("resume", "experiment", "hparams_search") or key.startswith("hydra"):
            continue  # presets are no keys of the run: the stored config holds the values they chose
        if key not in RESUMABLE_OVERRIDES and override_unchanged(key, cfg, stored):
            continue  # e.g. a sweep's own overrides when resume=auto continues its job
        if key not in RESUMABLE_OVERRIDES:
            raise UserError(f"cannot change {key} when resuming (it would change the run); "
                            f"allowed with resume: {', '.join(RESUMABLE_OVERRIDES)}")
        OmegaConf.update(stored, key, OmegaConf.select(cfg, key), merge=False)
        overridden.add(key)
    if "threads" in state:  # checkpoints written before the count was stored resolve it again
        if "trainer.num_threads" not in overridden:
            stored.trainer.num_threads = state["threads"]
        elif _num_threads(stored.trainer.num_threads) != state["threads"]:
            say(f"note: trainer.num_threads={stored.trainer.num_threads} differs from the {state['threads']} threads "
                f"this run used so far; the continuation equals the uninterrupted run only up to floating-point "
                f"summation order")
    stored.resume = cfg.resume
    return stored


def _load_into(state: dict[str, Any], model, optimizer, task: Task, path: Path) -> None:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        task.load_state_dict(state["task"])
        for group in optimizer.param_groups:  # checkpoints from before optim.schedule ran at constant rates
            group.setdefault("base_lr", group["lr"])
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
        from hrnn import fused  # noqa: F401 - a bad HRNN_CPU_CAPABILITY fails here, in one line
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


def resume_argument(run_dir: Path) -> str:
    """The shell argument that resumes run_dir. A sweep job's directory name holds '=' and ',',
    which Hydra's override grammar reads as syntax unless the value is quoted."""
    if re.fullmatch(r"[\w/.\-]+", str(run_dir)):
        return f"resume={run_dir}"
    return "\"resume='" + str(run_dir).replace("\\", "\\\\").replace("'", "\\'") + "'\""


def _resume_dir_overrides(args: list[str], multirun: bool) -> list[str]:
    """resume=<dir> continues that run in place: Hydra writes into it and adds no .hydra copy."""
    for arg in args:
        if arg.startswith("resume="):
            value = arg.split("=", 1)[1]
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":  # Hydra's quoting
                value = value[1:-1].replace("\\'", "'").replace("\\\\", "\\")
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
        if override.is_sweep_override() and not override.is_discrete_sweep():
            continue  # interval(...) of a search: the search's jobs are validated when they start
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        if key in GROUPS:
            allowed = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
            for value in values:
                if value not in allowed and not (key in ("experiment", "hparams_search") and value == "null"):
                    raise UserError(f"unknown {key} {value!r}; allowed: {', '.join(allowed)}")
                if key == "hparams_search" and value != "null" and not multirun:
                    raise UserError(f"hparams_search={value} is a search of many runs: add -m "
                                    f"(hrnn-train -m hparams_search={value})")
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
