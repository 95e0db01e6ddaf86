"""Checkpoints that survive a kill at any moment and load with weights_only=True.

A checkpoint is written to a temporary file in the same directory, flushed to disk,
then renamed over the old one: a reader sees either the old file or the new one,
never half of either. RNG states are stored as tensors and plain Python values so
`torch.load(..., weights_only=True)` accepts them.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrnn.errors import UserError

FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (temp file, fsync, rename, fsync the directory)."""
    _atomic(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))


def _remove_stale_temps(directory: Path) -> None:
    """Delete our temp files (".NAME.tmpPID") in `directory` whose writer has died mid-write
    (SIGKILL skips `finally`); a live writer's file is left alone."""
    for stale in directory.glob(".*.tmp*"):
        pid = stale.name.rsplit(".tmp", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # still running (or not ours to signal): leave it alone
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except PermissionError:
            pass


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint or raise UserError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"corrupt or unreadable checkpoint {path}: {reason[:200]}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not an hrnn checkpoint (format_version {FORMAT_VERSION} expected)")
    for key in ("model", "optimizer", "step", "rng", "config"):
        if key not in state:
            raise UserError(f"checkpoint {path} is incomplete: it has no {key!r}")
    return state


def capture_rng() -> dict[str, Any]:
    """Every global RNG state a training step can touch."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    version, mt_state, gauss = rng["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = rng["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
