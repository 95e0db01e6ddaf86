#!/usr/bin/env python3
"""The results study's tables, built from the metrics.json files of its sweep directories.

`python scripts/results.py outputs/study` prints markdown (pasted into docs/results.md): one
table for the timescales task (seeds pooled per model and period set: how many seeds reached
the MSE threshold, recovered every true period, and both) and one for the other tasks (one
row per job). Failed and unfinished jobs are listed, never dropped. Imports torch only to read
the wave periods of runs written before metrics.json carried them (from their best.pt).

It lives here, next to scripts/study.sh, because it serves that study alone; what every sweep
needs (reading job directories, mean ± std) is hrnn.summary.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from hrnn.summary import mean_std, plus_minus, read_jobs  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
THRESHOLD = 0.01  # the validation MSE a timescales run must reach


# The settings a label names when a job changed them from conf/'s defaults, as (group, key, word).
LABELLED = {"coefficients": [("regularizer", "name", ""), ("basis", "sharpness", "sharpness"),
                             ("regularizer", "entropy_weight", "entropy")],
            "period": [("basis", "init", "init"), ("basis", "open_ratio", "open")]}


@functools.lru_cache(maxsize=None)
def default_config(basis: str) -> dict[str, Any]:
    """conf/'s defaults with this basis: what a label leaves out."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=[f"basis={basis}"]))


def model_label(config: dict[str, Any]) -> str:
    """hrnn-binary, hrnn-dct, hrnn-period or the baseline's name; clock settings off their defaults appended."""
    model = config.get("model", {}).get("name", "?")
    if model != "hrnn":
        return model
    basis = config.get("basis", {}).get("name", "?")
    defaults, parts = default_config(basis), [f"hrnn-{basis}"]
    for group, key, word in LABELLED["period" if basis == "period" else "coefficients"]:
        value = config.get(group, {}).get(key, defaults[group].get(key))
        if value != defaults[group].get(key):
            parts.append(f"{word} {value:g}".strip() if isinstance(value, float) else f"{word} {value}".strip())
    return " ".join(parts)


def read_study(study_dir: Path | str) -> list[dict[str, Any]]:
    """Every job of every sweep directory under study_dir (read_jobs records, config included)."""
    jobs = []
    for sweep in sorted(p for p in Path(study_dir).iterdir() if p.is_dir()):
        for job in read_jobs(sweep):
            job["sweep"] = sweep.name
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


def task_rows(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per job of any other task."""
    rows = []
    for job in jobs:
        task = job["config"].get("task", {})
        if task.get("name") in (None, "timescales") or job["status"] != "finished":
            continue
        m = job["metrics"]
        rows.append({
            "task": task["name"], "T": task.get("seq_len"), "model": model_label(job["config"]), "seed": m.get("seed"),
            "metric": m["metric"], "val": m["val_metric"], "test": m["test_metric"], "baseline": m["baseline"],
            "recall_acc": m.get("test", {}).get("recall_acc"), "periods": m.get("periods"),
            "steps": m["steps"], "step_s": m["train_step_s"], "wall_s": m["wall_s"], "params": m["params"],
        })
    return sorted(rows, key=lambda r: (r["task"], r["T"] or 0, r["model"]))


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
    head = ["task", "T", "model", "seed", "steps", "val", "test", "baseline", "test / baseline", "recall acc",
            "learned periods", "params", "step s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], str(r["T"]), r["model"], str(r["seed"]), str(r["steps"]),
                 f"{r['metric']} {_fmt(r['val'])}", _fmt(r["test"]), _fmt(r["baseline"]),
                 _fmt(r["test"] / r["baseline"], 3) if r["baseline"] else "-",
                 _fmt(r["recall_acc"], 3), _periods(r["periods"]), f"{r['params']:,}",
                 _fmt(r["step_s"], 4), _fmt(r["wall_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_problems(jobs: list[dict[str, Any]]) -> str:
    problems = [j for j in jobs if j["status"] != "finished"]
    if not problems:
        return "Every job finished."
    return "\n".join(f"- {j['sweep']}/{j['name']}: {j['status']}: {j['error']}" for j in problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Markdown tables of the results study (scripts/study.sh).")
    parser.add_argument("study_dir", type=Path, help="the directory holding the study's sweep directories")
    args = parser.parse_args(argv)
    if not args.study_dir.is_dir():
        print(f"error: {args.study_dir} is not a directory; run scripts/study.sh first", file=sys.stderr)
        return 2
    jobs = read_study(args.study_dir)
    if not jobs:
        print(f"error: no job directories under {args.study_dir}; run scripts/study.sh first", file=sys.stderr)
        return 1
    sections = []
    ts = timescales_rows(jobs)
    if ts:
        sections += ["### Timescales", "", format_timescales(ts), ""]
    other = task_rows(jobs)
    if other:
        sections += ["### Adding and copy", "", format_tasks(other), ""]
    sections += ["### Jobs that did not finish", "", format_problems(jobs)]
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
