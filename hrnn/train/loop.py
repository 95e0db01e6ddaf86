"""The training loop of one run (hrnn-train), read top to bottom.

`train`: `set_up` (config, device, threads, seeds, task, model, optimizer, resume), the loop of
`train_step`s (batch, forward, task loss plus the model's penalty, backward, clip, step; on a text
task the forward starts from the state the last window ended in, hrnn/train/stream.py),
`evaluate_and_checkpoint` every `trainer.eval_every` steps (writes `checkpoints/last.pt`, and
`best.pt` when the validation metric improves), and `finish` (the final test on the best
checkpoint; `metrics.json` records the outcome for sweeps and the results study).
"""
from __future__ import annotations

import json
import math
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from hrnn.config.schema import validate
from hrnn.errors import UserError
from hrnn.models import SequenceModel, build_model, count_parameters
from hrnn.report.tensorboard import log_hparams, log_recovery, log_scalars, log_structure
from hrnn.report.text import write_text_report
from hrnn.sweep.search import TrialPruned, report_evaluation
from hrnn.tasks import Task, build_task
from hrnn.train import environment, resume
from hrnn.train.evaluate import evaluate
from hrnn.train.optim import build_optimizer, schedule_step
from hrnn.train.stream import Sequences, feed_for

say = tqdm.write  # print without breaking the progress bar


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Train, evaluate, test; write checkpoints and metrics.json into run_dir. Returns the final validation metric."""
    run = set_up(cfg, run_dir)
    trainer = run.cfg.trainer
    stop = environment.StopSignals()
    bar = tqdm(total=trainer.steps, initial=run.step, disable=not trainer.progress, dynamic_ncols=True, unit="step")
    try:
        while run.step < trainer.steps:
            run.step += 1
            train_step(run, bar)
            environment.send_scheduled_signal(run.step, "step")  # tests: a signal that lands in this step
            bar.update(1)
            out_of_time = trainer.max_wall_s is not None and run.wall_s() >= trainer.max_wall_s
            if run.step % trainer.eval_every == 0 or run.step == trainer.steps or out_of_time:
                evaluate_and_checkpoint(run)
            if out_of_time:
                say(f"trainer.max_wall_s={trainer.max_wall_s:g} reached at step {run.step}")
                break
            if stop.signum is not None:
                stop_with_checkpoint(run, stop)
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
    feed: Sequences  # the batches into the model: independent, or windows with the state carried
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
            "stream": self.feed.state_dict(),  # a text run's carried states
            "step": self.step,
            "best": self.best,
            "rng": resume.capture_rng(),
            "step_times": self.step_times,
            "wall_s": self.wall_s(),
            "nonfinite_skipped": self.skipped,
            "threads": torch.get_num_threads(),  # reused on resume: gradient sums depend on it
            "history": self.history,
            "config": OmegaConf.to_yaml(self.cfg),
            "model_class": describe_model(self.cfg),
        }

    def save(self, name: str) -> None:
        resume.save_model_checkpoint(self.ckpt_dir / name, self.checkpoint_state(), self.model,
                                     before_rename=lambda: environment.send_scheduled_signal(self.step, "checkpoint"))


def set_up(cfg: DictConfig, run_dir: Path) -> Run:
    """Validated config (the stored one on resume), device, threads, seeds, task, model, optimizer,
    the checkpoint's state on resume, and the TensorBoard writer."""
    started = time.time()
    state = resume.resume_state(cfg, run_dir)
    if state is not None:
        cfg = resume.config_for_resume(state, cfg, run_dir / "checkpoints" / "last.pt")
    cfg = validate(cfg)
    device = environment.prepare(cfg.trainer, run_dir)
    task = build_task(cfg.task, cfg.data_dir, cfg.trainer.seed, cfg.trainer.batch_size)
    model = build_model(cfg, task.spec).to(device)
    run = Run(cfg, run_dir, device, task, model, build_optimizer(cfg.optim, model), feed_for(task), started)
    if state is not None:
        resume.restore_run(run, state)
        run.feed.load_state_dict(state.get("stream", {}))

    from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow and only needed here

    run.writer = SummaryWriter(log_dir=str(run_dir), purge_step=run.step + 1 if run.step else None)
    kernels = environment.cpu_kernels(device, model)
    say(f"hrnn | task {task.name} (T={task.spec.seq_len}) | model {describe_model(cfg)} | "
        f"{count_parameters(model):,} parameters | {device}" + (f" (recurrence: {kernels})" if kernels else ""))
    say(f"baseline {task.metric_name} {task.baseline:.4f} ({task.baseline_note})")
    say(f"run dir {run_dir}" + (f" | resuming after step {run.step}" if run.step else ""))
    return run


def train_step(run: Run, bar: tqdm) -> None:
    """Batch, forward, task loss plus the model's penalty, backward, clip, step.

    A non-finite loss or gradient stops the run (trainer.nonfinite=stop) or skips only the
    optimizer update (skip): the step still counts, and its evaluation and checkpoint happen."""
    trainer, task, model, device = run.cfg.trainer, run.task, run.model, run.device
    model.train()
    model.set_progress(run.step / trainer.steps)  # e.g. the annealed gate's slope
    x, y = run.feed.next_batch(trainer.batch_size, device)
    tick = time.perf_counter()
    output = run.feed.forward(model, x)
    loss = task.loss(output, y)
    total = loss + model.penalty().to(device)
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip or math.inf)
    if not (torch.isfinite(total) and torch.isfinite(grad_norm)):
        skip_nonfinite(run)
        return
    schedule_step(run.optimizer, run.cfg.optim.schedule, run.step, trainer.steps)
    run.optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    run.step_times.append(time.perf_counter() - tick)
    if run.step % trainer.log_every == 0 or run.step == trainer.steps:
        log_train(run, bar, output.detach(), y, loss, total, grad_norm)


def skip_nonfinite(run: Run) -> None:
    """A non-finite step: UserError naming the last good checkpoint (nonfinite=stop), or counted and skipped."""
    if run.cfg.trainer.nonfinite == "stop":
        last = run.ckpt_dir / "last.pt"
        where = f"last good checkpoint {last}" if last.exists() else "no checkpoint was written yet"
        raise UserError(f"non-finite loss or gradient at step {run.step}; {where}; "
                        f"lower optim.lr or set trainer.nonfinite=skip")
    run.skipped += 1
    run.writer.add_scalar("train/nonfinite_skipped", run.skipped, run.step)


def log_train(run: Run, bar: tqdm, output: Tensor, y: Tensor, loss: Tensor, total: Tensor, grad_norm: Tensor) -> None:
    task = run.task
    with torch.no_grad():
        train_metric = task.metrics(output, y)[task.metric_name]
    log_scalars(run.writer, "train", {
        "loss": loss.item(), task.metric_name: train_metric, "penalty": (total - loss).item(),
        "grad_norm": grad_norm.item(), "lr": run.optimizer.param_groups[0]["lr"],
        "steps_per_s": 1.0 / statistics.median(run.step_times[-run.cfg.trainer.log_every:])}, run.step)
    bar.set_postfix(loss=f"{loss.item():.4f}", **{task.metric_name: f"{train_metric:.4f}"}, refresh=False)


def evaluate_and_checkpoint(run: Run) -> None:
    """Validation metrics and the clock to TensorBoard and the history; best.pt when the metric improves; last.pt."""
    task, writer, step, trainer = run.task, run.writer, run.step, run.cfg.trainer
    tock = time.perf_counter()
    val = evaluate(run.model, task, "val", trainer.eval_batch_size, run.device)
    log_scalars(writer, "val", val, step)
    writer.add_scalar("val/eval_s", time.perf_counter() - tock, step)
    line = f"step {step}/{trainer.steps} | val {task.metric_name} {val[task.metric_name]:.4f}"
    if task.is_better(val[task.metric_name], run.best["value"]):
        run.best = {"value": val[task.metric_name], "step": step}
        run.save("best.pt")
    line += f" (best {run.best['value']:.4f} at {run.best['step']})"
    # wall_s: time to this evaluation (resumes included), so a table can say how long a threshold took.
    entry: dict[str, Any] = {"step": step, "wall_s": run.wall_s(), **{f"val_{name}": value for name, value in val.items()}}
    line += log_structure(writer, run.model, task, step, run.history, entry)
    run.history.append(entry)
    run.save("last.pt")
    writer.flush()
    say(line)
    try:  # in a hyperparameter search, a hopeless trial stops here, its files kept
        report_evaluation(step, val[task.metric_name], task.higher_is_better)
    except TrialPruned:
        writer.close()
        raise


def stop_with_checkpoint(run: Run, stop: environment.StopSignals) -> None:
    """After SIGINT/SIGTERM/SIGUSR2: save last.pt, say how to continue, exit 128 + signum. A SLURM job's
    SIGUSR2 (preemption, time limit) instead goes on to submitit, which requeues the job: it resumes from
    this checkpoint by itself. If submitit declines, the job fails in one line (error.txt of its sweep)."""
    run.save("last.pt")
    run.writer.close()
    stopped = f"stopped by {signal.Signals(stop.signum).name} at step {run.step}; checkpoint saved"
    if stop.requeues():
        say(f"{stopped}; handing over to submitit, which requeues this job to resume from it")
        reason = stop.hand_over()  # exits when the job is requeued
        raise UserError(f"{stopped}; not requeued ({reason}); continue with the same sweep and resume=auto")
    say(f"{stopped}; continue with: hrnn-train {resume.resume_argument(run.run_dir)}")
    raise SystemExit(128 + stop.signum)


def finish(run: Run) -> float:
    """Test the best checkpoint, write metrics.json and the hparams (and a text run's boundary rates and excerpt
    figure, hrnn/report/text.py); return the final validation metric."""
    task, writer, cfg = run.task, run.writer, run.cfg
    best = run.ckpt_dir / "best.pt"
    resume.load_weights(run.model, resume.load_checkpoint(best), best)
    test = evaluate(run.model, task, "test", cfg.trainer.eval_batch_size, run.device)
    val = evaluate(run.model, task, "val", cfg.trainer.eval_batch_size, run.device)
    log_scalars(writer, "test", test, run.step)
    metrics = final_metrics(run, val, test)
    metrics.update(write_text_report(run.model, task, run.run_dir, "val", cfg.trainer.eval_batch_size, run.device))
    log_hparams(writer, cfg, metrics)
    resume.atomic_write_bytes(run.run_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    writer.close()
    say(f"test {task.metric_name} {test[task.metric_name]:.4f} | val {val[task.metric_name]:.4f} "
        f"(best step {run.best['step']}) | baseline {task.baseline:.4f} | {run.run_dir / 'metrics.json'}")
    return float(val[task.metric_name])


def final_metrics(run: Run, val: dict[str, float], test: dict[str, float]) -> dict[str, Any]:
    """metrics.json: the outcome, what ran and how long, the learning curve, and the model's structure."""
    task, model, cfg = run.task, run.model, run.cfg
    metrics = {
        "metric": task.metric_name, "higher_is_better": task.higher_is_better,
        "val_metric": val[task.metric_name], "test_metric": test[task.metric_name], "baseline": task.baseline,
        "best_step": run.best["step"], "val": val, "test": test, "params": count_parameters(model),
        "steps": run.step, "wall_s": run.wall_s(), "max_wall_s": cfg.trainer.max_wall_s,
        "train_step_s": statistics.median(run.step_times) if run.step_times else None,
        "nonfinite_skipped": run.skipped, "task": task.name, "model": cfg.model.name, "basis": cfg.basis.name,
        "regularizer": cfg.regularizer.name, "seed": cfg.trainer.seed, "device": str(run.device),
        "cpu_kernels": environment.cpu_kernels(run.device, model), "threads": torch.get_num_threads(),
        "status": "finished", "history": run.history,
    }
    if model.connectivity() is not None:
        metrics["connectivity"] = model.connectivity().tolist()
    if model.clock is not None:
        metrics["periods"] = model.clock.periods()
        metrics["wave_periods"] = [float(p) for p in model.clock.wave_periods()]
        if model.clock.phases() is not None:
            metrics["phases"] = model.clock.phases()
        if hasattr(task, "recovered"):
            found, found_wave = log_recovery(run.writer, task, metrics["periods"], metrics["wave_periods"], run.step)
            metrics.update(true_periods=task.periods, recovered=len(found), recovered_periods=found,
                           recovered_wave=len(found_wave))
    return metrics


def describe_model(cfg: DictConfig) -> str:
    """The model in a few words, for the run's header line and its checkpoints."""
    model = cfg.model
    if model.name == "hrnn":
        return (f"hrnn {model.n_modules}x{model.hidden_size // model.n_modules} basis={cfg.basis.name} "
                f"regularizer={cfg.regularizer.name} connectivity={model.connectivity} activation={model.activation}")
    if model.name == "cwrnn":
        return f"cwrnn {model.n_modules}x{model.hidden_size // model.n_modules}"
    return f"{model.name} {model.hidden_size}"
