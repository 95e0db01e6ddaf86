"""hrnn-eval: evaluate a finished (or interrupted) run's checkpoint again, without training.

    hrnn-eval <run dir> [split=val|test] [checkpoint=best|last] [trainer.device=cpu|cuda|auto]
              [trainer.eval_batch_size=N] [trainer.num_threads=N] [data_dir=DIR] [--figures]

It rebuilds the model and task from the configuration stored in the checkpoint, loads the
weights (onto the CPU first, so a checkpoint written on CUDA reads anywhere), evaluates the
split as training did, prints the metrics and writes eval_<split>_<checkpoint>.json into the run
directory. With --figures it also writes the clock's figures as PNG and PDF into <run dir>/figures/.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from hrnn.checkpoint import atomic_write_bytes, load_checkpoint
from hrnn.config import validate
from hrnn.errors import UserError

CHOICES = {"split": ("val", "test"), "checkpoint": ("best", "last")}
# Keys of the stored config that may change: none of them changes what the model computes.
CONFIG_OVERRIDES = ("trainer.device", "trainer.eval_batch_size", "trainer.num_threads", "data_dir")
USAGE = ("usage: hrnn-eval <run dir> [split=val|test] [checkpoint=best|last] [trainer.device=...] "
         "[trainer.eval_batch_size=N] [trainer.num_threads=N] [data_dir=DIR] [--figures]")


def parse_args(argv: list[str]) -> tuple[Path, dict[str, str], dict[str, str], bool]:
    """(run dir, split/checkpoint choices, config overrides, figures); UserError on the first bad argument."""
    figures = "--figures" in argv
    args = [a for a in argv if a != "--figures"]
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise UserError(f"unknown option {flags[0]!r}; {USAGE}")
    if not args or "=" in args[0]:
        raise UserError(f"give the run directory first; {USAGE}")
    run_dir, choices, overrides = Path(args[0]), {"split": "test", "checkpoint": "best"}, {}
    for arg in args[1:]:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"bad argument {arg!r}: expected key=value; {USAGE}")
        if key in CHOICES:
            if value not in CHOICES[key]:
                raise UserError(f"{key}={value!r} is not allowed; allowed: {', '.join(CHOICES[key])}")
            choices[key] = value
        elif key in CONFIG_OVERRIDES:
            overrides[key] = value
        else:
            raise UserError(f"unknown key {key!r}; allowed: {', '.join([*CHOICES, *CONFIG_OVERRIDES])}")
    return run_dir, choices, overrides, figures


def load_run(run_dir: Path, checkpoint: str, overrides: dict[str, str]) -> tuple[Any, Any, torch.nn.Module, dict[str, Any]]:
    """(validated config, task, model with the checkpoint's weights on the CPU, checkpoint state) of a run
    directory; UserError naming the problem when it is not one hrnn-train wrote or does not fit its config."""
    from hrnn.models import build_model
    from hrnn.tasks import build_task

    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give a run directory written by hrnn-train")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.exists():
        raise UserError(f"{run_dir} has no checkpoints/{checkpoint}.pt; give a run directory written by hrnn-train"
                        + (" (or checkpoint=last)" if checkpoint == "best" and (run_dir / "checkpoints" / "last.pt").exists() else ""))
    state = load_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, _yaml_value(key, value), merge=False)
    cfg = validate(cfg)
    task = build_task(cfg.task, cfg.data_dir, cfg.trainer.seed)
    model = build_model(cfg, task.spec)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not fit its own config ({state.get('model_class')}): "
                        f"{str(exc).strip().splitlines()[0][:200]}") from None
    return cfg, task, model, state


def evaluate_run(run_dir: Path, split: str, checkpoint: str, overrides: dict[str, str],
                 figures: bool = False) -> dict[str, Any]:
    """Evaluate `split` with the run's `checkpoint`; write eval_<split>_<checkpoint>.json and return its content."""
    from hrnn.run import evaluate, pick_device, _num_threads

    cfg, task, model, state = load_run(run_dir, checkpoint, overrides)
    device = pick_device(cfg.trainer.device)
    torch.set_num_threads(_num_threads(cfg.trainer.num_threads))
    model.to(device)
    if figures:
        _check_figures(model)
    metrics = evaluate(model, task, split, cfg.trainer.eval_batch_size, device)
    result = {"split": split, "checkpoint": checkpoint, "step": state["step"], "metric": task.metric_name,
              "higher_is_better": task.higher_is_better, "value": metrics[task.metric_name], "metrics": metrics,
              "device": str(device), "threads": torch.get_num_threads(), "eval_batch_size": cfg.trainer.eval_batch_size}
    if model.clock is not None:
        result["periods"] = model.clock.periods()
    out = run_dir / f"eval_{split}_{checkpoint}.json"
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    result["written"] = [str(out)]
    if figures:
        result["written"] += [str(p) for p in write_figures(model, task.spec.seq_len, state, run_dir / "figures")]
    return result


def write_figures(model: torch.nn.Module, seq_len: int, state: dict[str, Any], out_dir: Path) -> list[Path]:
    """The clock's figures (as TensorBoard shows them at the checkpoint's step) as PNG and PDF."""
    from hrnn import figures
    from hrnn.tensorboard_logging import clock_summary

    _check_figures(model)
    hierarchy = [(e["step"], e["periods"]) for e in state.get("history", []) if "periods" in e]
    summary = clock_summary(model.clock.cpu(), seq_len)
    if not hierarchy or hierarchy[-1][0] != state["step"]:
        hierarchy.append((state["step"], summary["periods"]))
    return figures.save_figures(figures.clock_figures(summary, hierarchy), out_dir)


def _check_figures(model: torch.nn.Module) -> None:
    from hrnn import figures

    if model.clock is None:
        raise UserError("this run's model has no clock, so there are no clock figures; drop --figures")
    if not figures.available():
        raise UserError("--figures needs matplotlib: pip install -e .[figures]")


def _yaml_value(key: str, value: str) -> Any:
    """A command-line value as YAML reads it (numbers as numbers, null as None)."""
    try:
        return OmegaConf.create({"v": value}).v if key == "data_dir" else OmegaConf.create(f"v: {value}").v
    except Exception:  # noqa: BLE001 - a value YAML cannot read is kept as the text given
        return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\nRe-evaluates a run's checkpoint on a split; writes eval_<split>_<checkpoint>.json "
              f"in the run directory (docs/search.md).")
        return 0
    try:
        run_dir, choices, overrides, figures = parse_args(argv)
        result = evaluate_run(run_dir, choices["split"], choices["checkpoint"], overrides, figures)
    except UserError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = " | ".join(f"{name} {value:.6g}" for name, value in result["metrics"].items())
    print(f"{result['split']} ({result['checkpoint']}.pt, step {result['step']}, {result['device']}) | {metrics}")
    for path in result["written"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
