"""Where a run runs: device, threads, matmul precision, seeds, its output directory (and its one-writer
lock), and the signals that stop it.

Stop signals (Ctrl-C, kill, SLURM's warning) only set a flag; the loop checkpoints at the end of
the step and exits 128 + signal. In a SLURM job started by submitit, SIGUSR2 (preemption, or the
warning before the time limit) then goes on to submitit's handler, which requeues the job; the
requeued job (`requeued`) resumes from that checkpoint by itself (docs/cluster.md). For tests,
HRNN_SIGNAL_AT sends this process a signal at a chosen step, or waits there for one from outside
(`send_scheduled_signal`), so an interruption lands where the test says.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hrnn.errors import UserError, os_error_cause
from hrnn.ops import kernel_path, set_matmul_precision
from hrnn.seeds import stream_seed
from hrnn.sweep.callbacks import threads_per_job


def prepare(trainer: DictConfig, run_dir: Path) -> torch.device:
    """Device, subnormal floats, threads, matmul precision, a writable run directory and the global seeds,
    in that order."""
    device = pick_device(trainer.device)
    # The flag is per thread, and threads copy it when they start: set before the thread pool is (re)built.
    torch.set_flush_denormal(trainer.flush_denormal)
    torch.set_num_threads(num_threads(trainer.num_threads))
    set_matmul_precision(trainer.matmul_precision)
    check_writable(run_dir)
    seed_everything(trainer.seed)
    return device


def pick_device(name: str) -> torch.device:
    """`auto` is cuda where there is a GPU; validation has refused `cuda` without one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def num_threads(requested: int | None) -> int:
    """All cores for one job; a parallel sweep's jobs share them instead of oversubscribing."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if _multirun():
        return threads_per_job(OmegaConf.select(HydraConfig.get(), "launcher"), cores)
    return cores


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def seed_everything(seed: int) -> None:
    """The global RNGs (model initialisation, random clock starts) draw from the model stream."""
    model_seed = stream_seed("model", seed)
    random.seed(model_seed)
    np.random.seed(model_seed % 2**32)
    torch.manual_seed(model_seed)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to the output directory {run_dir}: {os_error_cause(exc)}; "
                        f"choose another with hydra.run.dir=<dir>") from None


# ----------------------------------------------------------------------------- one writer per run directory

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold run_dir/.lock (an advisory flock; the file names this PID) for a whole run, so that a second
    hrnn-train on the same directory is refused in one line instead of mixing its checkpoints in. The
    lock goes with the process however it ends; this block also removes the file on every way out."""
    path = run_dir / LOCK_FILE
    fd = _acquire(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the lock is released: a waiting writer then makes a file of its own
        os.close(fd)


def _acquire(path: Path) -> int:
    """A descriptor of `path` holding its exclusive lock; UserError naming the holder when it is taken."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot lock the run directory: cannot write {path}: {os_error_cause(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise UserError(in_use_message(path.parent, pid)) from None
        if _is_file_at(fd, path):
            return fd
        os.close(fd)  # a finishing run removed the file between our open and our lock: take the new one


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def lock_holder(run_dir: Path) -> str | None:
    """The PID holding run_dir's lock ("unknown" before it wrote it), or None; writes nothing."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock: free, so nobody writes there
        return None
    except BlockingIOError:
        return _pid_in(fd)
    finally:
        os.close(fd)


def in_use_message(run_dir: Path, pid: str) -> str:
    return (f"{run_dir} is in use: process {pid} holds its lock ({run_dir / LOCK_FILE}) and writes there; "
            f"wait until it ends, or choose another directory")


def _pid_in(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return text if text.isdigit() else "unknown"


def cpu_kernels(device: torch.device, model: torch.nn.Module) -> str | None:
    """Which CPU recurrence runs: a capability of the fused kernels (default, avx2, avx512),
    "pytorch loop" when they are not built or the model has none, or the torch.nn module; None
    off the CPU."""
    if device.type != "cpu":
        return None
    if model.recurrence() != "fused":
        return model.recurrence()
    return kernel_path("cpu")


# ----------------------------------------------------------------------------- signals

# Signals that ask the loop to checkpoint and stop: Ctrl-C, kill, and SIGUSR2, which SLURM jobs launched
# by submitit receive when preempted or shortly before their time limit (submitit's own handler would
# requeue mid-step, losing the steps since the last checkpoint).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))
# The one whose earlier handler is a scheduler's requeue (submitit's checkpoint_and_try_requeue), handed
# over once the checkpoint is written. Not SIGTERM: submitit only logs it ("bypass"), and SIGINT's is
# Python's KeyboardInterrupt.
REQUEUE_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR2",) if hasattr(signal, name))
SIGNAL_AT = "HRNN_SIGNAL_AT"


def slurm_submitit_job() -> bool:
    """Whether this process is a SLURM job started by submitit (its sbatch file exports this), whose
    requeue SLURM counts; submitit_local restarts a job without telling it, so it keeps today's stop."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def requeued() -> int:
    """How many times SLURM has started this job again after a requeue (0: the first attempt)."""
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(count) if count.isdigit() else 0


class StopSignals:
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

    def requeues(self) -> bool:
        """Whether the stop signal is a SLURM requeue request that submitit installed a handler for."""
        return (self.signum in REQUEUE_SIGNALS and slurm_submitit_job()
                and callable(self._previous.get(self.signum)))

    def hand_over(self) -> str:
        """Put the earlier handlers back and call the stop signal's, once the loop's checkpoint is written:
        submitit's pickles the job again, runs `scontrol requeue` and exits (SystemExit), so this returns
        only when it declines (e.g. the job timed out more than max_num_timeout times): then its reason.
        Restoring first matters: the requeue's SIGTERM must reach submitit's handler, not a second stop."""
        handler = self._previous[self.signum]
        self.restore()
        try:
            handler(self.signum, None)
        except Exception as exc:  # noqa: BLE001 - submitit says why it did not requeue by raising
            return str(exc).strip() or type(exc).__name__
        return "the scheduler's handler returned without requeueing"


def send_scheduled_signal(step: int, point: str) -> None:
    """For tests: HRNN_SIGNAL_AT="signal=SIGTERM,step=7[,at=checkpoint][,job=1][,notify=PATH]" sends this
    process that signal at that step, once its training step is done (at=step, the default) or while a
    checkpoint of that step is being written, its temporary file complete and not yet renamed
    (at=checkpoint); with job=N only in job N of a multirun. signal=await instead waits there, idle,
    for a stop signal from outside (a scheduler's), however fast this machine is. notify=PATH first
    appends "<pid> <step>" to PATH (a FIFO a test reads), so the test learns the run got there without
    polling. The loop calls this at both points. Never in a requeued SLURM job: the signal stands for one
    preemption, not one per attempt."""
    spec = os.environ.get(SIGNAL_AT, "")
    if not spec or requeued():
        return
    try:
        plan = dict(item.split("=", 1) for item in spec.split(","))
        signum = None if plan["signal"] == "await" else signal.Signals[plan["signal"]]
        at = (int(plan["step"]), plan.get("at", "step"))
    except (ValueError, KeyError):
        raise UserError(f"{SIGNAL_AT}={spec!r}: expected signal=<SIGNAME>|await,step=<N>[,at=step|checkpoint]"
                        f"[,job=<N>][,notify=<PATH>]") from None
    job = str(HydraConfig.get().job.num) if _multirun() else None
    if at != (step, point) or plan.get("job") not in (None, job):
        return
    if signum is None:
        _await_stop_signal(lambda: _notify(plan.get("notify"), step))
        return
    _notify(plan.get("notify"), step)
    os.kill(os.getpid(), signum)


def _notify(path: str | None, step: int) -> None:
    if path:
        with open(path, "a") as arrivals:
            arrivals.write(f"{os.getpid()} {step}\n")


def _await_stop_signal(announce) -> None:
    """Block until a stop signal arrives, then return (its handler has set the loop's flag). Python's C
    handler writes each handled signal's number to the wakeup fd, so one that lands between `announce`
    and the read is still seen: no race, no polling. Signals without a Python handler (SIGCONT) write
    nothing."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end)
    try:
        announce()
        while not any(number in STOP_SIGNALS for number in os.read(read_end, 64)):
            pass  # os.read blocks until the next handled signal
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)
