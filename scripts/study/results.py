#!/usr/bin/env python3
"""The results study's tables, built from the metrics.json files of its sweep directories.

`python scripts/study/results.py outputs/study` prints markdown (pasted into docs/results.md): one
table for the timescales task (seeds pooled per model and period set: how many seeds reached
the MSE threshold, recovered every true period, and both) and one for the other tasks (one
row per job). Failed and unfinished jobs are listed, never dropped. Imports torch only to read
the wave periods of runs written before metrics.json carried them (from their best.pt).

It lives here, next to study.sh, because it serves that study alone; what every sweep
needs (reading job directories, mean ± std) is hrnn.sweep.summary.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from hrnn.sweep.summary import mean_std, plus_minus, read_jobs  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
THRESHOLD = 0.01  # the validation MSE a timescales run must reach


# The settings a label names when a job changed them from conf/'s defaults, as (group, key, word).
LABELLED = {"coefficients": [("regularizer", "name", ""), ("basis", "sharpness", "sharpness"),
                             ("regularizer", "entropy_weight", "entropy"), ("regularizer", "temperature", "temperature"),
                             ("basis", "init", "init")],
            "period": [("basis", "init", "init"), ("basis", "open_ratio", "open")]}
# Settings of any model (the clock recipe search's and the activations' options), named the same way.
LABELLED_ANY = [("model", "activation", ""), ("model", "gate", "gate"), ("model", "gate_bias", "gate_bias"),
                ("model", "gate_slope", "slope"), ("model", "gate_hard_from", "hard from"),
                ("model", "update_weight", "update_weight"),
                ("model", "connectivity", "connectivity"),
                ("model", "hidden_size", "hidden"), ("model", "n_modules", "modules"), ("optim", "lr", "lr"),
                ("optim", "clock_lr", "clock_lr"), ("optim", "connectivity_lr", "connectivity_lr"),
                ("optim", "schedule", "lr"), ("trainer", "batch_size", "batch"), ("trainer", "grad_clip", "clip"),
                ("trainer", "max_wall_s", "wall budget s")]
NO_CLOCK = ("event", "chunker")  # activations without a clock: the basis means nothing there
# What "solved" means per task, on the validation history: (history key, threshold, below?).
THRESHOLDS = {"adding": ("val_mse", 0.01, True), "copy": ("val_recall_acc", 0.99, False),
              "smnist": ("val_acc", 0.985, False), "pmnist": ("val_acc", 0.95, False)}


@functools.lru_cache(maxsize=None)
def default_config(basis: str) -> dict[str, Any]:
    """conf/'s defaults with this basis: what a label leaves out."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=[f"basis={basis}"]))


def _word(word: str, value: Any) -> str:
    return (f"{word} {value:g}" if isinstance(value, float) else f"{word} {value}").strip()


def model_label(config: dict[str, Any]) -> str:
    """hrnn-binary, hrnn-dct, hrnn-period or the baseline's name; for hrnn its activation, always (the
    default changed from clock to clock_event); settings off their defaults appended (a clock frozen at
    its start, optim.clock_lr=0, reads "frozen clock")."""
    model = config.get("model", {}).get("name", "?")
    basis = config.get("basis", {}).get("name", "?")
    defaults = default_config(basis if basis in ("binary", "dct", "period") else "dct")
    activation = config.get("model", {}).get("activation", "clock")
    parts = [model] if model != "hrnn" else ["hrnn" if activation in NO_CLOCK else f"hrnn-{basis}"]
    if model == "hrnn" and activation not in NO_CLOCK:
        for group, key, word in LABELLED["period" if basis == "period" else "coefficients"]:
            value = config.get(group, {}).get(key, defaults[group].get(key))
            if value != defaults[group].get(key):
                parts.append(_word(word, value))
    for group, key, word in LABELLED_ANY:
        if model != "hrnn" and group == "model" and key != "hidden_size":
            continue
        if group == "optim" and key == "clock_lr" and (model != "hrnn" or activation in NO_CLOCK):
            continue
        if key == "connectivity_lr" and config.get("model", {}).get("connectivity") != "learned":
            continue
        if key == "connectivity_lr" and key not in config.get("optim", {}):
            parts.append("connectivity_lr = lr")  # runs from before optim.connectivity_lr trained the gates at optim.lr
            continue
        value = config.get(group, {}).get(key, defaults[group].get(key))
        if value != defaults[group].get(key) or (model == "hrnn" and key == "activation"):
            parts.append("frozen clock" if key == "clock_lr" and value == 0 else _word(word, value))
    return " ".join(parts)


def read_study(study_dir: Path | str) -> list[dict[str, Any]]:
    """Every job of every sweep directory under study_dir (read_jobs records, config included): its
    subdirectories, and deeper ones holding a multirun.yaml (e.g. clock_recipe/basis)."""
    study_dir = Path(study_dir)
    sweeps = {p for p in study_dir.iterdir() if p.is_dir()} | {p.parent for p in study_dir.rglob("multirun.yaml")}
    jobs = []
    for sweep in sorted(sweeps):
        for job in read_jobs(sweep):
            job["sweep"] = str(sweep.relative_to(study_dir))
            jobs.append(job)
    return jobs


def wave_recovered(job: dict[str, Any]) -> int | None:
    """How many true periods some module's wave period matches (Clock.wave_periods).

    Read from metrics.json; runs written before that field existed get it from their best
    checkpoint's clock (imports torch only then). Equal to `recovered` except on the cosine basis.
    """
    metrics = job["metrics"]
    if "recovered_wave" in metrics:
        return metrics["recovered_wave"]
    if "recovered" not in metrics:
        return None
    cfg = OmegaConf.create(job["config"])
    if cfg.model.name != "hrnn" or cfg.basis.name != "dct":
        return metrics["recovered"]
    import torch

    from hrnn.models import build_clock
    from hrnn.tasks.synthetic import recovered_periods

    clock = build_clock(cfg.model, cfg.basis, cfg.regularizer, cfg.task.seq_len)
    state = torch.load(Path(job["dir"]) / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["model"]
    with torch.no_grad():
        clock.coefficients.copy_(state["backbone.clock.coefficients"])
    return len(recovered_periods(metrics["true_periods"], clock.wave_periods()))


def first_step_below(history: list[dict[str, Any]], key: str, threshold: float) -> int | None:
    """The first evaluation step whose validation value is below threshold (None: never)."""
    return next((entry["step"] for entry in history if entry.get(key, float("inf")) < threshold), None)


def timescales_rows(jobs: list[dict[str, Any]], threshold: float = THRESHOLD) -> list[dict[str, Any]]:
    """One row per (model, period set): seeds pooled."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for job in jobs:
        task = job["config"].get("task", {})
        if task.get("name") != "timescales":
            continue
        key = (model_label(job["config"]), str(task.get("periods")), task.get("seq_len"))
        groups.setdefault(key, []).append(job)
    rows = []
    for (label, periods, seq_len), members in groups.items():
        done = [j for j in members if j["status"] == "finished"]
        metrics = [j["metrics"] for j in done]
        reached = [m["val_metric"] < threshold for m in metrics]
        has_clock = all("recovered" in m for m in metrics) and bool(metrics)
        recovered_all = [m["recovered"] == len(m["true_periods"]) for m in metrics] if has_clock else []
        wave_all = [wave_recovered(j) == len(j["metrics"]["true_periods"]) for j in done] if has_clock else []
        firsts = [first_step_below(m.get("history", []), "val_mse", threshold) for m in metrics]
        reached_steps = [s for s in firsts if s is not None]
        values = [m["val_metric"] for m in metrics]
        val_mean, val_std = mean_std(values)
        rows.append({
            "model": label,
            "periods": periods,
            "T": seq_len,
            "seeds": len(members),
            "finished": len(done),
            "reached": sum(reached),
            "recovered_all": sum(recovered_all) if has_clock else None,
            "solved": sum(r and a for r, a in zip(reached, recovered_all)) if has_clock else None,
            "wave_all": sum(wave_all) if has_clock else None,
            "wave_solved": sum(r and a for r, a in zip(reached, wave_all)) if has_clock else None,
            "recovered_counts": [m["recovered"] for m in metrics] if has_clock else None,
            "val_mean": val_mean,
            "val_std": val_std,
            "val_min": min(values) if values else None,
            "first_step_median": statistics.median(reached_steps) if reached_steps else None,
            "periods_seed0": next((m.get("periods") for m in metrics if m.get("seed") == 0), None),
            "step_s": statistics.median(m["train_step_s"] for m in metrics) if metrics else None,
            "wall_s": statistics.fmean(m["wall_s"] for m in metrics) if metrics else None,
            "baseline": metrics[0]["baseline"] if metrics else None,
        })
    return rows


def wall_to(entry: dict[str, Any] | None, metrics: dict[str, Any]) -> float | None:
    """Wall seconds to a history entry: recorded (runs since history carried wall_s), else the
    run's mean wall time per step times the step (an estimate, evaluations pro rata)."""
    if entry is None:
        return None
    return entry.get("wall_s", entry["step"] * metrics["wall_s"] / max(1, metrics["steps"]))


def task_rows(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, T, model label, steps) of the other tasks: seeds pooled."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for job in jobs:
        task = job["config"].get("task", {})
        if task.get("name") in (None, "timescales") or job["status"] != "finished":
            continue
        # A wall-clock budget ends each seed at its own step: pool them by the steps they were given.
        budgeted = job["config"].get("trainer", {}).get("max_wall_s") is not None
        steps = job["config"]["trainer"]["steps"] if budgeted else job["metrics"]["steps"]
        key = (task["name"], task.get("seq_len"), model_label(job["config"]), steps)
        groups.setdefault(key, []).append(job)
    rows = []
    for (name, seq_len, label, steps), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2], kv[0][3])):
        metrics = sorted((j["metrics"] for j in members), key=lambda m: m.get("seed") or 0)
        history_key, threshold, below = THRESHOLDS.get(name, (None, None, True))
        firsts = []
        for m in metrics:
            entry = next((e for e in m.get("history", []) if history_key in e
                          and (e[history_key] < threshold if below else e[history_key] >= threshold)), None)
            firsts.append((entry["step"] if entry else None, wall_to(entry, m)))
        walls = [w for _, w in firsts if w is not None]
        fractions = [m.get("test", {}).get("update_fraction") for m in metrics]
        recalls = [m.get("test", {}).get("recall_acc") for m in metrics]
        rows.append({
            "task": name, "T": seq_len, "model": label, "steps": _steps_done(metrics), "metric": metrics[0]["metric"],
            "seeds": [m.get("seed") for m in metrics],
            "val": mean_std([m["val_metric"] for m in metrics]), "test": mean_std([m["test_metric"] for m in metrics]),
            "baseline": metrics[0]["baseline"], "higher_is_better": metrics[0].get("higher_is_better", False),
            "threshold": (history_key, threshold, below),
            "solved": sum(s is not None for s, _ in firsts), "first_steps": [s for s, _ in firsts],
            "wall_to_threshold": statistics.median(walls) if walls else None,
            "recall_acc": mean_std(recalls) if None not in recalls else None,
            "update_fraction": statistics.fmean(fractions) if None not in fractions else None,
            "periods": next((m.get("periods") for m in metrics if m.get("seed") == 0), metrics[0].get("periods")),
            "connectivity": next((m.get("connectivity") for m in metrics if m.get("connectivity") is not None), None),
            "params": metrics[0]["params"], "step_s": statistics.median(m["train_step_s"] for m in metrics),
            "wall_s": statistics.fmean(m["wall_s"] for m in metrics),
        })
    return rows


def _steps_done(metrics: list[dict[str, Any]]) -> str:
    """The steps the seeds ran: one number, or their range (runs ended by a wall-clock budget)."""
    done = sorted(m["steps"] for m in metrics)
    return str(done[0]) if done[0] == done[-1] else f"{done[0]}-{done[-1]}"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _periods(periods: list[float] | None) -> str:
    return "-" if not periods else " ".join(f"{p:.3g}" for p in periods)


def format_timescales(rows: list[dict[str, Any]], threshold: float = THRESHOLD) -> str:
    head = ["model", "true periods", "T", "val MSE < " + str(threshold), "all periods recovered", "both",
            "all recovered (wave)", "both (wave)",
            "recovered per seed", "val MSE mean ± std (min)", "first step < " + str(threshold) + " (median)",
            "learned periods (seed 0)", "step s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["periods"], r["T"] or 0, r["model"])):
        n = r["finished"]
        of = f"/{n}" + (f" ({r['seeds'] - n} did not finish)" if r["seeds"] != n else "")
        cells = [r["model"], r["periods"], str(r["T"]), f"{r['reached']}{of}",
                 "-" if r["recovered_all"] is None else f"{r['recovered_all']}{of}",
                 "-" if r["solved"] is None else f"{r['solved']}{of}",
                 "-" if r["wave_all"] is None else f"{r['wave_all']}{of}",
                 "-" if r["wave_solved"] is None else f"{r['wave_solved']}{of}",
                 "-" if r["recovered_counts"] is None else ",".join(map(str, r["recovered_counts"])),
                 f"{plus_minus(r['val_mean'], r['val_std'])} ({_fmt(r['val_min'])})",
                 "-" if r["first_step_median"] is None else f"{r['first_step_median']:g}",
                 _periods(r["periods_seed0"]), _fmt(r["step_s"], 4), _fmt(r["wall_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_tasks(rows: list[dict[str, Any]]) -> str:
    head = ["task", "T", "model", "seeds", "steps", "val", "test", "test / baseline", "solved", "first eval solved",
            "wall s to solved (median)", "recall acc", "update fraction", "learned periods (seed 0)", "params",
            "step s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        key, threshold, below = r["threshold"]
        solved = "-" if key is None else f"{r['solved']}/{len(r['seeds'])} ({key[4:]} {'<' if below else '>='} {threshold:g})"
        cells = [r["task"], str(r["T"]), r["model"], ",".join(map(str, r["seeds"])), str(r["steps"]),
                 f"{r['metric']} {plus_minus(*r['val'])}", plus_minus(*r["test"]),
                 _fmt(r["test"][0] / r["baseline"], 3) if r["baseline"] and not r["higher_is_better"] else "-", solved,
                 ", ".join("never" if s is None else str(s) for s in r["first_steps"]),
                 _fmt(r["wall_to_threshold"], 0), "-" if r["recall_acc"] is None else plus_minus(*r["recall_acc"], digits=3),
                 _fmt(r["update_fraction"], 3), _periods(r["periods"]), f"{r['params']:,}",
                 _fmt(r["step_s"], 4), _fmt(r["wall_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    connectivity = [r for r in rows if r["connectivity"] is not None]
    if connectivity:
        lines += ["", "Connectivity at the best checkpoint (row i reads column j; the first seed that logged one):", ""]
        for r in connectivity:
            matrix = "\n".join("  " + " ".join(f"{v:.2f}" for v in row) for row in r["connectivity"])
            lines += [f"{r['task']} T={r['T']} {r['model']}:", "```", matrix, "```"]
    return "\n".join(lines)


def format_problems(jobs: list[dict[str, Any]]) -> str:
    problems = [j for j in jobs if j["status"] != "finished"]
    if not problems:
        return "Every job finished."
    return "\n".join(f"- {j['sweep']}/{j['name']}: {j['status']}: {j['error']}" for j in problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Markdown tables of the results study (scripts/study/study.sh).")
    parser.add_argument("study_dir", type=Path, help="the directory holding the study's sweep directories")
    args = parser.parse_args(argv)
    if not args.study_dir.is_dir():
        print(f"error: {args.study_dir} is not a directory; run scripts/study/study.sh first", file=sys.stderr)
        return 2
    jobs = read_study(args.study_dir)
    if not jobs:
        print(f"error: no job directories under {args.study_dir}; run scripts/study/study.sh first", file=sys.stderr)
        return 1
    sections = []
    ts = timescales_rows(jobs)
    if ts:
        sections += ["### Timescales", "", format_timescales(ts), ""]
    other = task_rows(jobs)
    if other:
        sections += ["### Adding, copy and MNIST", "", format_tasks(other), ""]
    sections += ["### Jobs that did not finish", "", format_problems(jobs)]
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
