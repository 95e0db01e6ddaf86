"""hrnn-eval: evaluate a finished (or interrupted) run's checkpoint again, without training.

    hrnn-eval <run dir> [split=val|test] [checkpoint=best|last] [trainer.device=cpu|cuda|auto]
              [trainer.eval_batch_size=N] [trainer.num_threads=N] [data_dir=DIR] [out=FILE] [--figures]

It rebuilds the model and task from the configuration stored in the checkpoint, loads the
weights (onto the CPU first, so a checkpoint written on CUDA reads anywhere), evaluates the
split as training did, prints the metrics, and only then writes eval_<split>_<checkpoint>.json into the run
directory, or the file out=FILE names (for a run directory that is read-only or not yours; the figures then
go to figures/ next to it). With --figures it also writes the clock's figures as PNG and PDF into
<run dir>/figures/, and for a text run the excerpt figure (excerpt.png) and the modules' update rates at
word and verse boundaries over the split (boundary_rates.json; hrnn/report/text.py) there too.
The runtime (and the recurrence op, whose CPU capability may be refused) is imported inside the
error wrapper, so that every mistake is one line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from hrnn.cli.wrapper import user_errors
from hrnn.errors import UserError, os_error_cause

CHOICES = {"split": ("val", "test"), "checkpoint": ("best", "last")}
OUTPUT = "out"  # where the metrics go instead of the run directory
# Keys of the stored config that may change: none of them changes what the model computes.
CONFIG_OVERRIDES = ("trainer.device", "trainer.eval_batch_size", "trainer.num_threads", "data_dir")
USAGE = ("usage: hrnn-eval <run dir> [split=val|test] [checkpoint=best|last] [trainer.device=...] "
         "[trainer.eval_batch_size=N] [trainer.num_threads=N] [data_dir=DIR] [out=FILE] [--figures]")


def parse_args(argv: list[str]) -> tuple[Path, dict[str, str], dict[str, str], bool]:
    """(run dir, split/checkpoint/out choices, config overrides, figures); UserError on the first bad argument."""
    figures = "--figures" in argv
    args = [a for a in argv if a != "--figures"]
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise UserError(f"unknown option {flags[0]!r}; {USAGE}")
    if not args or ("=" in args[0] and not Path(args[0]).is_dir()):  # a sweep's job directory holds "=" in its name
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
        elif key == OUTPUT and value:
            choices[key] = value
        else:
            raise UserError(f"unknown key {key!r}; allowed: {', '.join([*CHOICES, *CONFIG_OVERRIDES, OUTPUT])}")
    return run_dir, choices, overrides, figures


def load_run(run_dir: Path, checkpoint: str, overrides: dict[str, str]) -> tuple[Any, Any, torch.nn.Module, dict[str, Any]]:
    """(validated config, task, model with the checkpoint's weights on the CPU, checkpoint state) of a run
    directory; UserError naming the problem when it is not one hrnn-train wrote or does not fit its config."""
    from hrnn.models import build_model
    from hrnn.tasks import build_task
    from hrnn.train.resume import load_checkpoint, load_weights, stored_config, validated_config

    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give a run directory written by hrnn-train")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.exists():
        raise UserError(f"{run_dir} has no checkpoints/{checkpoint}.pt; give a run directory written by hrnn-train"
                        + (" (or checkpoint=last)" if checkpoint == "best" and (run_dir / "checkpoints" / "last.pt").exists() else ""))
    state = load_checkpoint(path)
    cfg = stored_config(state, path)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, _yaml_value(key, value), merge=False)
    cfg = validated_config(cfg, path, given=overrides)
    task = build_task(cfg.task, cfg.data_dir, cfg.trainer.seed)
    model = build_model(cfg, task.spec)
    load_weights(model, state, path)
    return cfg, task, model, state


def evaluate_run(run_dir: Path, split: str, checkpoint: str, overrides: dict[str, str], figures: bool = False,
                 out: str | None = None, show: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate `split` with the run's `checkpoint`; `show` the result, then write it to `out` (by default
    eval_<split>_<checkpoint>.json in the run directory) and return it. Writing comes last, so that a
    directory that cannot be written loses no result: it is on the screen, and out= puts it elsewhere."""
    from hrnn.train.resume import atomic_write_bytes

    result, (model, task, state, device) = measure(run_dir, split, checkpoint, overrides, figures)
    if show is not None:
        show(result)
    path = Path(out) if out else run_dir / f"eval_{split}_{checkpoint}.json"
    try:
        atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
        result["written"] = [str(path)]
        if figures:
            reading = (split, result["eval_batch_size"], device)
            result["written"] += [str(p) for p in write_figures(model, task, state, path.parent / "figures", reading)]
    except (UserError, OSError) as exc:
        problem = exc if isinstance(exc, UserError) else f"cannot write {exc.filename}: {os_error_cause(exc)}"
        raise UserError(f"{problem}; the result above is complete: write it elsewhere with out=<file>") from None
    return result


def measure(run_dir: Path, split: str, checkpoint: str, overrides: dict[str, str],
            figures: bool) -> tuple[dict[str, Any], tuple]:
    """The evaluation's result, and (model, task, state, device) for the figures; nothing is written."""
    from hrnn.train.environment import num_threads, pick_device
    from hrnn.train.evaluate import evaluate

    cfg, task, model, state = load_run(run_dir, checkpoint, overrides)
    device = pick_device(cfg.trainer.device)
    torch.set_num_threads(num_threads(cfg.trainer.num_threads))
    model.to(device)
    if figures:
        _check_figures(model, task)
    metrics = evaluate(model, task, split, cfg.trainer.eval_batch_size, device)
    result = {"split": split, "checkpoint": checkpoint, "step": state["step"], "metric": task.metric_name,
              "higher_is_better": task.higher_is_better, "value": metrics[task.metric_name], "metrics": metrics,
              "device": str(device), "threads": torch.get_num_threads(), "eval_batch_size": cfg.trainer.eval_batch_size}
    if model.clock is not None:
        result["periods"] = model.clock.periods()
    return result, (model, task, state, device)


def write_figures(model: torch.nn.Module, task: Any, state: dict[str, Any], out_dir: Path,
                  reading: tuple[str, int, torch.device]) -> list[Path]:
    """The clock's figures (as TensorBoard shows them at the checkpoint's step) as PNG and PDF; for a text run
    also the text report of the split `reading` names (split, eval batch size, device)."""
    from hrnn.report import figures
    from hrnn.report.tensorboard import clock_summary
    from hrnn.report.text import write_text_report

    _check_figures(model, task)
    written = [out_dir / name for name in write_text_report(model, task, out_dir, *reading).get("text_report", [])]
    if model.clock is None:
        return written
    hierarchy = [(e["step"], e["periods"]) for e in state.get("history", []) if "periods" in e]
    summary = clock_summary(model.clock.cpu(), task.spec.seq_len)
    if not hierarchy or hierarchy[-1][0] != state["step"]:
        hierarchy.append((state["step"], summary["periods"]))
    return figures.save_figures(figures.clock_figures(summary, hierarchy), out_dir) + written


def _check_figures(model: torch.nn.Module, task: Any) -> None:
    from hrnn.report import figures
    from hrnn.report.text import has_modules

    if model.clock is None and not (task.streams and has_modules(model)):
        raise UserError("this run's model has no clock, so there are no clock figures; drop --figures")
    if not figures.available():
        raise UserError("--figures needs matplotlib: pip install -e .[figures]")


def _yaml_value(key: str, value: str) -> Any:
    """A command-line value as YAML reads it (numbers as numbers, null as None)."""
    try:
        return OmegaConf.create({"v": value}).v if key == "data_dir" else OmegaConf.create(f"v: {value}").v
    except Exception:  # noqa: BLE001 - a value YAML cannot read is kept as the text given
        return value


@user_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\nRe-evaluates a run's checkpoint on a split; writes eval_<split>_<checkpoint>.json "
              f"in the run directory (docs/search.md).")
        return 0
    run_dir, choices, overrides, figures = parse_args(argv)
    result = evaluate_run(run_dir, choices["split"], choices["checkpoint"], overrides, figures,
                          out=choices.get(OUTPUT), show=_print_result)
    for path in result["written"]:
        print(f"wrote {path}")
    return 0


def _print_result(result: dict[str, Any]) -> None:
    metrics = " | ".join(f"{name} {value:.6g}" for name, value in result["metrics"].items())
    print(f"{result['split']} ({result['checkpoint']}.pt, step {result['step']}, {result['device']}) | {metrics}",
          flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
