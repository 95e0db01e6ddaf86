"""Shared helpers: compose configs like the CLI does, and run the CLI in a subprocess."""
from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
# Small enough for a 2-core machine: a run of a few steps takes seconds.
TINY = ["model.hidden_size=16", "model.n_modules=4", "trainer.batch_size=8", "trainer.eval_batch_size=50",
        "task.n_val=50", "task.n_test=50", "trainer.progress=false", "trainer.log_every=1"]


def pytest_configure(config):
    """`make test` (and CI) set HRNN_REQUIRE_FUSED=1: a C++ core that did not build stops the run
    before any test, instead of its tests skipping and the suite passing on the slow fallback."""
    if os.environ.get("HRNN_REQUIRE_FUSED", "0") != "0":
        from hrnn import ops

        if not ops.fused_available():
            raise pytest.UsageError(f"HRNN_REQUIRE_FUSED=1 but {ops.fused_unavailable_reason()}")


def pytest_collection_modifyitems(config, items):
    """The SLURM cluster's tests first (a stable sort): they mostly wait on the cluster, so that with one
    file per worker (`make test`) they overlap the other files instead of running last, alone."""
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)


def load_script(name: str, folder: str = ""):
    """scripts/<folder>/<name>.py as a module (the scripts are not part of the hrnn package)."""
    module_name = f"scripts_{folder}_{name}" if folder else f"scripts_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "scripts" / folder / f"{name}.py")
        sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_cli(args: list[str], cwd: Path, timeout: int = 300, check: bool = True, env: dict | None = None,
            cores: set[int] | None = None) -> subprocess.CompletedProcess:
    """Run `hrnn-train ARGS` as a user would, in cwd; `cores` pins it, as on a machine with only those cores."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    result = subprocess.run([sys.executable, "-m", "hrnn.cli.train", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=full_env, preexec_fn=pin)
    if check and result.returncode != 0:
        raise AssertionError(f"hrnn-train {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def exit_status(main, args: list[str], argv0: str | None = None) -> int:
    """A command line's main run in this process, as its console script would (much faster than a
    subprocess): its return value, or the status it exits with. With `argv0`, main reads sys.argv
    (hrnn-train, whose Hydra part does); Hydra's job state is cleared after, as a new process starts without it."""
    from hydra.core.hydra_config import HydraConfig

    saved = sys.argv
    try:
        if argv0 is None:
            return main(args) or 0
        sys.argv = [argv0, *args]
        return main() or 0
    except SystemExit as exit:
        return exit.code
    finally:
        sys.argv = saved
        HydraConfig.instance().cfg = None


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def without_wall_times(history: list[dict]) -> list[dict]:
    """A metrics.json history without its wall_s, the one field a resumed run cannot reproduce."""
    return [{k: v for k, v in entry.items() if k != "wall_s"} for entry in history]


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


class Arrivals:
    """A FIFO that runs write "<pid> <step>" to as they reach a chosen step (HRNN_SIGNAL_AT's notify=),
    read as the lines come: `next` blocks in select() until one does, the watched process ends, or the
    deadline passes. No polling. The FIFO is also held open for writing here, so it never reads as ended
    between two runs' lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep_open = os.open(path, os.O_WRONLY)
        self._pending = b""

    def next(self, what: str, timeout: float, process: subprocess.Popen | None = None) -> tuple[int, int]:
        """The (pid, step) of the next run to arrive; fails with `what` if `process` ends first or time runs out."""
        watched = [self._read]
        ended = os.pidfd_open(process.pid) if process is not None else None
        if ended is not None:
            watched.append(ended)
        deadline = time.monotonic() + timeout
        try:
            while b"\n" not in self._pending:
                ready, _, _ = select.select(watched, [], [], max(0.0, deadline - time.monotonic()))
                if self._read in ready:
                    self._pending += os.read(self._read, 4096)
                elif ready:
                    stdout, stderr = process.communicate()
                    raise AssertionError(f"the process ended before {what}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
                else:
                    raise AssertionError(f"no {what} after {timeout} s")
        finally:
            if ended is not None:
                os.close(ended)
        line, _, self._pending = self._pending.partition(b"\n")
        pid, step = line.split()
        return int(pid), int(step)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._keep_open)


def wait_until_gone(pid: int, what: str, timeout: float) -> None:
    """Block until process `pid` (not necessarily a child) has exited: its pidfd turns readable."""
    try:
        gone = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([gone], [], [], timeout)
        assert ready, f"no {what} after {timeout} s"
    finally:
        os.close(gone)


@pytest.fixture
def arrivals(tmp_path: Path) -> Iterator[Arrivals]:
    fifo = Arrivals(tmp_path / "arrivals")
    yield fifo
    fifo.close()
