"""Checkpoints that survive a kill at any moment, and resuming a run from one (docs/resume.md).

A checkpoint is written to a temporary file in the same directory, flushed to disk,
then renamed over the old one: a reader sees either the old file or the new one,
never half of either. RNG states are stored as tensors and plain Python values so
`torch.load(..., weights_only=True)` accepts them.

A resumed run takes the config stored in its checkpoint; only the overrides in
RESUMABLE_OVERRIDES, which do not change the trajectory, may change it.
"""
from __future__ import annotations

import math
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

from hrnn.config import registry
from hrnn.config.schema import check_groups, validate
from hrnn.errors import UserError, os_error_cause, os_error_in
from hrnn.sweep.callbacks import has_run, override_unchanged
from hrnn.train.environment import num_threads

FORMAT_VERSION = 1
# What may change when a run is resumed: nothing that alters the trajectory.
RESUMABLE_OVERRIDES = ("trainer.steps", "trainer.max_wall_s", "trainer.device", "trainer.num_threads",
                       "trainer.progress", "trainer.log_every")
say = tqdm.write  # print without breaking the progress bar
# Keys a later hrnn added to a group's option, with the value that reproduces what a run written before
# them did (one layer; torch's own initialisation; no learned phase; the clock's starting periods from
# basis.init; a truncated gate's open target per module, as it was first written; subnormal floats kept), so
# that its checkpoint still evaluates and resumes. group -> option name ("default" for a group without
# names, as trainer) -> key -> value.
ADDED_KEYS = {
    "trainer": {"default": {"flush_denormal": False}},
    "model": {"lstm": {"num_layers": 1, "init": "default", "chrono_t_max": None},
              "gru": {"num_layers": 1, "init": "default", "chrono_t_max": None},
              "rnn": {"num_layers": 1},
              "hrnn": {"gate_threshold_warmup": 0.0, "gate_support": 0.0, "gate_open_target": 0.0,
                       "gate_open_rate": 0.01, "gate_open_per_module": True}},
    "basis": {"binary": {"learn_phase": False, "start_periods": None}, "dct": {"learn_phase": False, "start_periods": None},
              "logcos": {"start_periods": None}, "period": {"start_periods": None}},
}


# ----------------------------------------------------------------------------- writing and reading


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def save_checkpoint(path: Path, state: dict[str, Any], before_rename: Callable[[], None] | None = None) -> None:
    """Write `state` to `path` atomically (temp file, fsync, rename, fsync the directory);
    `before_rename` runs once the temporary file is complete."""
    _atomic(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f), before_rename)


def save_model_checkpoint(path: Path, state: dict[str, Any], model: torch.nn.Module,
                          before_rename: Callable[[], None] | None = None) -> None:
    """save_checkpoint, refused (UserError) when the model holds a non-finite weight."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"refusing to write {path}: the model holds non-finite weights")
    save_checkpoint(path, state, before_rename)


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


class WriteError(UserError):
    """A file that could not be written (disk full, read-only): the file it would replace is kept."""


def _atomic(path: Path, write, before_rename: Callable[[], None] | None = None) -> None:
    """Write through a temporary file renamed over `path`; any OS failure is one WriteError naming
    the path and its cause, with the temporary file removed and the old file untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path.parent)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if before_rename is not None:
                before_rename()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_directory(path.parent)
    except (OSError, RuntimeError) as exc:
        cause = os_error_in(exc)
        if cause is None:
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"{path.name} was not written"
        raise WriteError(f"cannot write {path}: {os_error_cause(cause)}; {kept}, and every file written "
                         f"before is intact") from None


def _fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint and check its structure (check_state); UserError naming the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever fails, the file is not a checkpoint to use
        raise UserError(f"corrupt or unreadable checkpoint {path}: {_load_failure(exc)}; it was left as it is") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise UserError(f"{path} is not an hrnn checkpoint (it has no format_version; hrnn-train writes "
                        f"format {FORMAT_VERSION})")
    version = state["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):  # compared before its type is known, a tensor raises
        raise UserError(f"checkpoint {path} is damaged: its 'format_version' is {_shown(version)}, not int")
    if version != FORMAT_VERSION:
        newer = version > FORMAT_VERSION
        raise UserError(f"{path} is a checkpoint of format {version!r}, written by {'a newer' if newer else 'another'} "
                        f"hrnn; this hrnn reads format {FORMAT_VERSION}: continue or evaluate it with the hrnn that wrote it")
    check_state(state, path)
    return state


# The sentences of torch's weights-only failure that advise rather than say what the file holds.
TORCH_ADVICE = ("weights_only", "Weights only", "documentation", "file an issue", "trust", "safe_globals")


def _load_failure(exc: Exception) -> str:
    """torch.load's failure in a few words. Its weights-only message advises weights_only=False, which would
    run whatever the file holds: only the part that says what was found is kept."""
    text = str(exc)
    if "Weights only load failed" in text:
        sentences = [line.strip().split(". ")[0].rstrip(".") for line in text.splitlines() if line.strip()]
        found = [s for s in sentences if not any(word in s for word in TORCH_ADVICE)]
        return (f"it holds more than tensors and plain values ({found[0] if found else 'not a checkpoint'}), "
                f"so hrnn refuses it unread")
    if isinstance(exc, EOFError):
        return "the file is empty or ends early"
    first = text.strip().split(". ")[0].splitlines()[0][:200] if text.strip() else ""
    return f"{type(exc).__name__}: {first}".rstrip(": ") + (" (truncated or damaged)" if "zip archive" in first else "")


NUMBER = (int, float)
# What a checkpoint of FORMAT_VERSION holds, with each field's type; hrnn-train writes all of them, and
# runs before the thread count and the learning curve were stored lack only OPTIONAL_FIELDS.
FIELDS = {"model": dict, "optimizer": dict, "task": dict, "step": int, "best": dict, "rng": dict,
          "step_times": list, "wall_s": NUMBER, "nonfinite_skipped": int, "config": str}
OPTIONAL_FIELDS = {"threads": int, "history": list, "model_class": str}


def check_state(state: dict[str, Any], path: Path) -> None:
    """The one check of a loaded checkpoint's structure and types, before anything uses it: a field
    missing, of the wrong type or out of range is a UserError naming it and what it holds."""
    for key, kind in {**FIELDS, **OPTIONAL_FIELDS}.items():
        if key not in state and key in FIELDS:
            raise UserError(f"checkpoint {path} is incomplete: it has no {key!r}")
        if key in state and (not isinstance(state[key], kind) or isinstance(state[key], bool)):
            raise UserError(f"checkpoint {path} is damaged: its {key!r} is {_shown(state[key])}, "
                            f"not {' or '.join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))}")
    for key, what, ok in _value_checks(state):
        if not ok():
            raise UserError(f"checkpoint {path} is damaged: its {key!r} is {_shown(state.get(key))}, not {what}")


def _value_checks(state: dict[str, Any]) -> list[tuple[str, str, Callable[[], bool]]]:
    """(field, what it must be, the check) for the values whose types check_state has confirmed."""
    def number(x: Any) -> bool:
        return isinstance(x, NUMBER) and not isinstance(x, bool) and math.isfinite(x)

    best, optimizer = state["best"], state["optimizer"]
    return [
        ("step", "a step count (>= 0)", lambda: state["step"] >= 0),
        ("nonfinite_skipped", "a count (>= 0)", lambda: state["nonfinite_skipped"] >= 0),
        ("wall_s", "seconds (>= 0)", lambda: number(state["wall_s"]) and state["wall_s"] >= 0),
        ("threads", "a thread count (>= 1)", lambda: state.get("threads", 1) >= 1),
        ("model", "parameter names -> tensors",
         lambda: all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items())),
        ("optimizer", "an optimizer's state and param_groups", lambda: isinstance(optimizer.get("state"), dict)
         and isinstance(optimizer.get("param_groups"), list) and all(isinstance(g, dict) for g in optimizer["param_groups"])),
        ("best", "{value: a number or null, step: >= 0}", lambda: set(best) >= {"value", "step"} and  # NaN: a
         (best["value"] is None or isinstance(best["value"], float) or number(best["value"]))  # diverged first eval
         and isinstance(best["step"], int) and best["step"] >= 0),
        ("step_times", "a list of seconds", lambda: all(number(t) for t in state["step_times"])),
        ("history", "a list of evaluations", lambda: all(isinstance(e, dict) for e in state.get("history", []))),
        ("rng", "the RNG states hrnn-train stores (torch, python, numpy)", lambda: _rng_ok(state["rng"])),
    ]


def _rng_ok(rng: dict[str, Any]) -> bool:
    """The shape capture_rng gives: restore_rng can at least unpack it (it checks the values itself)."""
    def byte_tensor(x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 1

    def sequence(x: Any, n: int) -> bool:
        return isinstance(x, (list, tuple)) and len(x) == n

    python, numpy, cuda = rng.get("python"), rng.get("numpy"), rng.get("cuda", [])
    return (byte_tensor(rng.get("torch")) and sequence(python, 3) and isinstance(python[1], (list, tuple))
            and sequence(numpy, 5) and isinstance(numpy[1], torch.Tensor)
            and isinstance(cuda, list) and all(byte_tensor(t) for t in cuda))


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list, torch.Tensor)) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


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
    """Set every global RNG; TypeError, ValueError or RuntimeError when a stored state is not one."""
    torch.set_rng_state(rng["torch"])
    version, mt_state, gauss = rng["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = rng["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ----------------------------------------------------------------------------- resume


def resume_state(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint a run continues from: run_dir's last.pt with resume=<dir> (which must exist)
    or with resume=auto (where it exists); None for a new run."""
    if cfg.resume is None:
        return None
    last = run_dir / "checkpoints" / "last.pt"
    if str(cfg.resume) == "auto":
        return load_checkpoint(last) if last.exists() else None
    if not last.exists():
        raise UserError(no_run_message(cfg.resume))
    return load_checkpoint(last)


def no_run_message(value: Any) -> str:
    return f"resume={value} holds no run (no checkpoints/last.pt); give a run directory written by hrnn-train"


def config_for_resume(state: dict[str, Any], cfg: DictConfig, path: Path) -> DictConfig:
    """The stored config of checkpoint `path`, plus command-line overrides that do not change the
    trajectory, validated.

    The thread count is the run's own: the kernels sum gradients per thread, so the stored
    count is reused (docs/resume.md); an explicit trainer.num_threads still wins, with a note."""
    stored = stored_config(state, path)
    # Keys added since the run was made (trainer.matmul_precision, model.activation, ...) take
    # today's defaults, which keep the old behaviour; only within the same option of a group.
    for group in registry.RUN_GROUPS:
        if group in stored and stored[group].get("name") == cfg[group].get("name"):
            defaults = OmegaConf.create(OmegaConf.to_container(cfg[group], resolve=True))  # not struct: a key
            stored[group] = OmegaConf.merge(defaults, stored[group])  # since removed is reported by validation
    overridden = _apply_resumable_overrides(cfg, stored)
    if "threads" in state:  # checkpoints written before the count was stored resolve it again
        if "trainer.num_threads" not in overridden:
            _check_thread_count(state["threads"], path)
            stored.trainer.num_threads = state["threads"]
        elif num_threads(stored.trainer.num_threads) != state["threads"]:
            say(f"note: trainer.num_threads={stored.trainer.num_threads} differs from the {state['threads']} threads "
                f"this run used so far; the continuation equals the uninterrupted run only up to floating-point "
                f"summation order")
    stored.resume = cfg.resume
    return validated_config(stored, path, given=overridden)


def _check_thread_count(threads: int, path: Path) -> None:
    """A run made on a bigger machine: its thread count would oversubscribe this one."""
    cpus = os.cpu_count() or 1
    if threads > cpus:
        raise UserError(f"{path}: this run used {threads} threads and this machine has {cpus} CPUs; continue it with "
                        f"trainer.num_threads={cpus} (then it equals the uninterrupted run only up to "
                        f"floating-point summation order)")


def stored_config(state: dict[str, Any], path: Path) -> DictConfig:
    """The config stored in checkpoint `path`, resolved, with every run group a mapping (UserError otherwise)."""
    try:
        cfg = OmegaConf.create(state["config"])
        OmegaConf.resolve(cfg)
    except Exception as exc:  # noqa: BLE001 - YAML and interpolation errors alike: the text is not a config
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} holds a config that cannot be read: {reason}") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"checkpoint {path} holds a config that is not a mapping of keys")
    try:
        check_groups(cfg)
    except UserError as exc:
        raise UserError(f"checkpoint {path} holds a config this hrnn cannot run: {exc}") from None
    return with_added_keys(cfg)


def with_added_keys(cfg: DictConfig) -> DictConfig:
    """cfg with each ADDED_KEYS key its group's option lacks set to the value that reproduces the run (in place)."""
    for group, options in ADDED_KEYS.items():
        section = cfg.get(group)
        if section is None:
            continue
        name = section.get("name", "default")
        added = {key: value for key, value in options.get(name, {}).items() if key not in section}
        with open_dict(section):
            for key, value in added.items():
                section[key] = value
    return cfg


def validated_config(cfg: DictConfig, path: Path, given: Iterable[str] = ()) -> DictConfig:
    """validate(), with the checkpoint named: an older or newer hrnn may have stored keys this one does not
    know. A problem with a key the command line `given` is the command line's, and said as such."""
    try:
        return validate(cfg)
    except UserError as exc:
        if any(key in str(exc) for key in given):
            raise
        raise UserError(f"checkpoint {path} (checkpoint format {FORMAT_VERSION}) holds a config this hrnn "
                        f"cannot run: {exc}") from None


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """The checkpoint's weights into `model`; UserError when they are another model's (names or shapes)."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UserError(_misfit(path, state, exc)) from None


def _misfit(path: Path, state: dict[str, Any], exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    reason = (lines[0] + " " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0])[:300]
    return f"checkpoint {path} does not fit this model/task ({state.get('model_class')}): {reason}"


def _apply_resumable_overrides(cfg: DictConfig, stored: DictConfig) -> set[str]:
    """Copy this command line's overrides into the stored config; UserError for one that would change the run."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    overridden = set()
    for override in overrides:
        key, _, _ = override.lstrip("+~").partition("=")
        if key in ("resume", *registry.PRESET_GROUPS) or key.startswith("hydra"):
            continue  # presets are no keys of the run: the stored config holds the values they chose
        if key not in RESUMABLE_OVERRIDES and override_unchanged(key, cfg, stored):
            continue  # e.g. a sweep's own overrides when resume=auto continues its job
        if key not in RESUMABLE_OVERRIDES:
            raise UserError(f"cannot change {key} when resuming (it would change the run); "
                            f"allowed with resume: {', '.join(RESUMABLE_OVERRIDES)}")
        OmegaConf.update(stored, key, OmegaConf.select(cfg, key), merge=False)
        overridden.add(key)
    return overridden


def restore_run(run: Any, state: dict[str, Any]) -> None:
    """Load a checkpoint's state into a freshly set-up run (hrnn.train.loop.Run): weights, optimizer,
    task stream, RNGs, the step, the best value, the history and the time spent."""
    path, best = run.ckpt_dir / "last.pt", run.ckpt_dir / "best.pt"
    if best.exists():  # the final test reads it: a damaged one is refused now, before anything is written
        load_weights(run.model, load_checkpoint(best), best)
    load_weights(run.model, state, path)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        _check_optimizer_state(run.optimizer)
        run.task.load_state_dict(state["task"])
        for group in run.optimizer.param_groups:  # checkpoints from before optim.schedule ran at constant rates
            group.setdefault("base_lr", group["lr"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise UserError(_misfit(path, state, exc)) from None
    try:
        restore_rng(state["rng"])
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} holds an RNG state that cannot be restored: {reason}") from None
    run.step, run.best = state["step"], dict(state["best"])
    run.history = [dict(entry) for entry in state.get("history", [])]
    run.step_times = list(state["step_times"])
    run.wall_before, run.skipped = state["wall_s"], state["nonfinite_skipped"]


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """ValueError when a loaded moment or buffer has another shape than its parameter: torch accepts it
    and fails only in the next step, mid-run."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"optimizer state {name!r} has shape {tuple(value.shape)}, its parameter "
                                     f"{tuple(param.shape)}")


# ----------------------------------------------------------------------------- the command line


def resume_argument(run_dir: Path) -> str:
    """The shell argument that resumes run_dir. A sweep job's directory name holds '=' and ',',
    which Hydra's override grammar reads as syntax unless the value is quoted."""
    if re.fullmatch(r"[\w/.\-]+", str(run_dir)):
        return f"resume={run_dir}"
    return f'"resume={_quoted(run_dir)}"'


def _quoted(path: Path) -> str:
    """A path as a quoted value of Hydra's override grammar."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_dir(args: list[str], multirun: bool) -> Path | None:
    """The run directory resume=<dir> names (UserError unless it holds a run); None without one or with resume=auto."""
    for arg in args:
        if arg.startswith("resume="):
            value = arg.split("=", 1)[1]
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":  # Hydra's quoting
                value = value[1:-1].replace("\\'", "'").replace("\\\\", "\\")
            if value in ("auto", "null", ""):
                return None
            if multirun:
                raise UserError(f"resume={value} names one run; in a multirun use resume=auto")
            path = Path(value).expanduser()
            if not (path / "checkpoints" / "last.pt").exists():
                raise UserError(no_run_message(value))
            return path
    return None


def resume_dir_overrides(path: Path | None) -> list[str]:
    """resume=<dir> continues that run in place: Hydra writes into it and adds no .hydra copy."""
    return [] if path is None else [f"hydra.run.dir={_quoted(path.resolve())}", "hydra.output_subdir=null"]


def check_new_run(run_dir: Path) -> None:
    """A new run (no resume) never starts where one started: their checkpoints and metrics would mix."""
    if has_run(run_dir):
        raise UserError(f"{run_dir} already holds a run (checkpoints/ or metrics.json); continue it with "
                        f"`hrnn-train {resume_argument(run_dir)}` (or resume=auto), or start the new run in "
                        f"another directory with hydra.run.dir=<dir>")


def check_writable_run(run_dir: Path) -> None:
    """A run to continue must take new checkpoints: a read-only one is refused before anything is written."""
    for directory in (run_dir, run_dir / "checkpoints"):
        if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
            raise UserError(f"cannot continue the run in {run_dir}: {directory} is read-only; make it writable, or "
                            f"evaluate the run without writing into it: hrnn-eval {run_dir} out=<file>")
