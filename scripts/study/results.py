#!/usr/bin/env python3
"""The results study's tables and figures, built from the metrics.json files of its sweep directories.

`python scripts/study/results.py outputs/study` prints markdown (docs/results_appendix.md): one
table for the timescales task (seeds pooled per model and period set: how many seeds reached
the MSE threshold, recovered every true period, and both) and one for the other tasks (one
row per configuration). Failed and unfinished jobs are listed, never dropped. Imports torch only to read
the wave periods of runs written before metrics.json carried them (from their best.pt).

`python scripts/study/results.py outputs/ablation --summary --plan ablation --figures docs/figures`
prints the summary table of docs/results.md (task x model: mean ± std over the finished seeds, their
count, parameters, steps, wall time, update fraction; jobs still running or not run say so) and
writes its figures as PNG (learning curves against steps and against wall time, update fractions
and each module's period over training; mean ± std over seeds, the seed count in every legend).
`--commands` prints the plan's hrnn-train commands. `--sweeps` keeps only the named sweep directories
(shell patterns, comma-separated), for a figure of one comparison out of a folder that holds many.

It lives here, next to study.sh, because it serves that study alone; what every sweep
needs (reading job directories, mean ± std) is hrnn.sweep.summary.
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from hrnn.sweep.summary import mean_std, plus_minus, read_jobs  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
THRESHOLD = 0.01  # the validation MSE a timescales run must reach


# The settings a label names when a job changed them from conf/'s defaults, as (group, key, word).
LABELLED = {"coefficients": [("regularizer", "name", ""), ("basis", "sharpness", "sharpness"),
                             ("regularizer", "entropy_weight", "entropy"), ("regularizer", "temperature", "temperature"),
                             ("basis", "init", "init"), ("basis", "learn_phase", "learned phase")],
            "period": [("basis", "init", "init"), ("basis", "open_ratio", "open")]}
# Settings of any model (the clock recipe search's and the activations' options), named the same way.
LABELLED_ANY = [("model", "activation", ""), ("model", "gate", "gate"), ("model", "gate_bias", "gate_bias"),
                ("model", "gate_slope", "slope"), ("model", "gate_hard_from", "hard from"),
                ("model", "gate_threshold", "threshold"), ("model", "gate_threshold_warmup", "threshold warm-up"),
                ("model", "gate_support", "support"),
                ("model", "update_weight", "update_weight"),
                ("model", "connectivity", "connectivity"),
                ("model", "hidden_size", "hidden"), ("model", "num_layers", "layers"), ("model", "init", "init"),
                ("model", "n_modules", "modules"), ("optim", "lr", "lr"),
                ("optim", "clock_lr", "clock_lr"), ("optim", "connectivity_lr", "connectivity_lr"),
                ("optim", "schedule", "lr"), ("trainer", "batch_size", "batch"), ("trainer", "grad_clip", "clip"),
                ("trainer", "max_wall_s", "wall budget s")]
NO_CLOCK = ("event", "chunker")  # activations without a clock: the basis means nothing there
# What "solved" means per task, on the validation history: (history key, threshold, below?).
THRESHOLDS = {"adding": ("val_mse", 0.01, True), "copy": ("val_recall_acc", 0.99, False),
              "smnist": ("val_acc", 0.985, False), "pmnist": ("val_acc", 0.95, False)}


@functools.lru_cache(maxsize=None)
def default_config(basis: str, model: str = "hrnn") -> dict[str, Any]:
    """conf/'s defaults with this basis and model: what a label leaves out."""
    overrides = [f"basis={basis}"] + ([f"model={model}"] if (CONF_DIR / "model" / f"{model}.yaml").is_file() else [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=overrides))


def _word(word: str, value: Any) -> str:
    if isinstance(value, bool):  # a switch: its name when on, "no <name>" when off
        return word if value else f"no {word}"
    return (f"{word} {value:g}" if isinstance(value, float) else f"{word} {value}").strip()


def model_label(config: dict[str, Any]) -> str:
    """hrnn-binary, hrnn-dct, hrnn-period or the baseline's name; for hrnn its activation, always (the
    default changed from clock to clock_event); settings off their defaults appended (a clock frozen at
    its start, optim.clock_lr=0, reads "frozen clock")."""
    model = config.get("model", {}).get("name", "?")
    basis = config.get("basis", {}).get("name", "?")
    defaults = default_config(basis if basis in ("binary", "dct", "period") else "dct", model)
    activation = config.get("model", {}).get("activation", "clock")
    parts = [model] if model != "hrnn" else ["hrnn" if activation in NO_CLOCK else f"hrnn-{basis}"]
    if model == "hrnn" and activation not in NO_CLOCK:
        for group, key, word in LABELLED["period" if basis == "period" else "coefficients"]:
            value = config.get(group, {}).get(key, defaults[group].get(key))
            if value != defaults[group].get(key):
                parts.append(_word(word, value))
    for group, key, word in LABELLED_ANY:
        if model != "hrnn" and group == "model" and key not in ("hidden_size", "num_layers", "init"):
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
    subdirectories, and deeper ones holding a multirun.yaml (e.g. clock_recipe/basis). A finished run
    copied into a second sweep (the same metrics.json, to its wall times; its config may have gained keys
    added since, at their old values) is read once, so it is not counted twice."""
    study_dir = Path(study_dir)
    sweeps = {p for p in study_dir.iterdir() if p.is_dir()} | {p.parent for p in study_dir.rglob("multirun.yaml")}
    jobs, seen = [], set()
    for sweep in sorted(sweeps):
        for job in read_jobs(sweep):
            if job["metrics"] is not None:
                run = json.dumps(job["metrics"], sort_keys=True, default=str)  # its history's wall times: one run
                if run in seen:
                    continue
                seen.add(run)
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
    from hrnn.train.resume import with_added_keys

    cfg = with_added_keys(cfg)  # a run made before a basis key existed: the value it ran with
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
        firsts = []
        for m in metrics:
            entry = solved_entry(m, name)
            firsts.append((entry["step"] if entry else None, wall_to(entry, m)))
        walls = [w for _, w in firsts if w is not None]
        fractions = [m.get("test", {}).get("update_fraction") for m in metrics]
        recalls = [m.get("test", {}).get("recall_acc") for m in metrics]
        rows.append({
            "task": name, "T": seq_len, "model": label, "steps": _steps_done(metrics), "metric": metrics[0]["metric"],
            "seeds": [m.get("seed") for m in metrics],
            "val": mean_std([m["val_metric"] for m in metrics]), "test": mean_std([m["test_metric"] for m in metrics]),
            "baseline": metrics[0]["baseline"], "higher_is_better": metrics[0].get("higher_is_better", False),
            "threshold": solved_bar(name) or (None, None, True),
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


# The clock ablation (3 seeds of each): the default model with its clock learned and frozen, its event gates
# alone and its clock alone, on four tasks. One multirun per sweep directory; `commands()` prints them.
ABLATION_LAUNCH = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=1", "trainer.num_threads=1",
                   "trainer.progress=false", "resume=auto"]
ABLATION_TASKS = {"adding200": ["task=adding"],
                  "timescales": ["task=timescales", "task.periods=[2,7,30]", "trainer.steps=1500", "trainer.eval_every=100"],
                  "adding1000": ["task=adding", "task.seq_len=1000", "trainer.steps=3000", "trainer.eval_every=250"],
                  "copy100": ["experiment=copy_long", "trainer.steps=5000", "trainer.eval_every=500"],
                  "smnist": ["experiment=smnist", "trainer.steps=5000"],
                  "pmnist": ["experiment=pmnist", "trainer.steps=5000"]}
ABLATION: dict[str, list[str]] = {}
for _name, _task in ABLATION_TASKS.items():
    ABLATION[f"ablation_{_name}"] = ["trainer.seed=0,1,2", *_task, "model.activation=clock_event,event,clock"]
    ABLATION[f"ablation_{_name}_frozen"] = ["trainer.seed=0,1,2", *_task, "model.activation=clock_event", "optim.clock_lr=0"]
PLANS = {"ablation": ABLATION}
RUNNING_WITHIN_S = 1800.0  # an unfinished job whose files changed this recently counts as running


def commands(plan: dict[str, list[str]], out: str = "outputs/ablation") -> list[str]:
    """The hrnn-train command of each sweep of a plan, in order."""
    return [" ".join(["hrnn-train", *ABLATION_LAUNCH, *(f"'{o}'" if "[" in o else o for o in overrides),
                      f"hydra.sweep.dir={out}/{name}"]) for name, overrides in plan.items()]


def split_sweep(value: str) -> list[str]:
    """A sweep override's values: split at the commas outside brackets ('[2,7,30]' is one value)."""
    values, depth, current = [], 0, ""
    for char in value:
        depth += 1 if char in "[({" else -1 if char in "])}" else 0
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return values + [current]


def expand(overrides: list[str]) -> list[dict[str, str]]:
    """Every job of a multirun: one key -> value dict per combination of the swept values."""
    combos: list[dict[str, str]] = [{}]
    for item in overrides:
        key, _, value = str(item).partition("=")
        combos = [{**combo, key: v} for combo in combos for v in split_sweep(value)]
    return combos


@functools.lru_cache(maxsize=None)
def composed_config(overrides: tuple[str, ...]) -> dict[str, Any]:
    """conf/ composed with a job's overrides: the config of a job that has not started."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)), resolve=False)


def _recently_changed(path: Path, now: float, within_s: float) -> bool:
    return any(now - p.stat().st_mtime < within_s for p in path.rglob("*") if p.is_file())


def planned_jobs(study_dir: Path | str, plan: dict[str, list[str]] | None = None, now: float | None = None,
                 running_within_s: float = RUNNING_WITHIN_S) -> list[dict[str, Any]]:
    """read_study's jobs, each unfinished one marked running (its files changed in the last
    running_within_s seconds) or stopped, plus one record (status "not started") for each job a sweep
    will run and has not begun: from its multirun.yaml, or from the plan where the sweep has no directory."""
    study_dir = Path(study_dir)
    now = time.time() if now is None else now
    jobs = read_study(study_dir) if study_dir.is_dir() else []
    for job in jobs:
        if job["status"] == "unfinished":
            job["status"] = "running" if _recently_changed(Path(job["dir"]), now, running_within_s) else "stopped"
    sweeps: dict[str, list[str]] = {}
    for multirun in sorted(study_dir.rglob("multirun.yaml")) if study_dir.is_dir() else []:
        task = OmegaConf.select(OmegaConf.load(multirun), "hydra.overrides.task", default=[]) or []
        sweeps[str(multirun.parent.relative_to(study_dir))] = [str(item) for item in task]
    for name, overrides in (plan or {}).items():
        sweeps.setdefault(name, list(overrides))
    for sweep, overrides in sweeps.items():
        combos = expand(overrides)
        varied = [key for key in combos[0] if len({c[key] for c in combos}) > 1]
        started = [{k: j["overrides"].get(k) for k in varied} for j in jobs if j["sweep"] == sweep]
        for combo in combos:
            if {k: combo[k] for k in varied} in started:
                continue
            config = composed_config(tuple(f"{k}={v}" for k, v in combo.items() if not k.startswith("hydra")))
            jobs.append({"name": ",".join(f"{k}={combo[k]}" for k in varied), "dir": None, "sweep": sweep,
                         "overrides": combo, "config": config, "seed": config.get("trainer", {}).get("seed"),
                         "status": "not started", "metrics": None, "error": None})
    return jobs


def only_sweeps(jobs: list[dict[str, Any]], patterns: str | None) -> list[dict[str, Any]]:
    """The jobs whose sweep directory (relative to the study's), or whose <sweep>/<job directory>, matches
    one of the comma-separated shell patterns; every job when there are none."""
    if not patterns:
        return jobs
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]

    def chosen(job: dict[str, Any]) -> bool:
        names = [job["sweep"]] if job["dir"] is None else [job["sweep"], f"{job['sweep']}/{job['name']}"]
        return any(fnmatch.fnmatchcase(name, p) for name in names for p in wanted)

    return [job for job in jobs if chosen(job)]


def group_key(config: dict[str, Any]) -> tuple:
    """(task, T, periods, model label, steps, wall budget): the jobs one summary row pools."""
    task, trainer = config.get("task", {}), config.get("trainer", {})
    periods = task.get("periods") if task.get("name") == "timescales" else None
    return (task.get("name"), task.get("seq_len"), None if periods is None else str(list(periods)),
            model_label(config), trainer.get("steps"), trainer.get("max_wall_s"))


def solved_bar(task: str) -> tuple[str, float, bool] | None:
    """(history key, threshold, below?) of the task's "solved", None for a task without one (text, ...)."""
    return THRESHOLDS.get(task, ("val_mse", THRESHOLD, True) if task == "timescales" else None)


def solved_entry(metrics: dict[str, Any], task: str) -> dict[str, Any] | None:
    """The first evaluation at the task's bar (THRESHOLDS; timescales: val MSE < THRESHOLD), None: never
    or no bar."""
    bar = solved_bar(task)
    if bar is None:
        return None
    key, threshold, below = bar
    return next((e for e in metrics.get("history", []) if key in e
                 and (e[key] < threshold if below else e[key] >= threshold)), None)


def solved_step(metrics: dict[str, Any], task: str) -> int | None:
    entry = solved_entry(metrics, task)
    return None if entry is None else entry["step"]


def summary_rows(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task x model (group_key): mean ± std over the finished seeds and how many there are, with
    the jobs of the group that are running, stopped, failed or not started counted beside them."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for job in jobs:
        if job.get("config", {}).get("task", {}).get("name") is None:
            continue
        groups.setdefault(group_key(job["config"]), []).append(job)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1] or 0, k[2] or "", k[3], k[4] or 0, k[5] or 0)):
        name, seq_len, periods, label, steps, budget = key
        members = groups[key]
        done = sorted((j for j in members if j["status"] == "finished"), key=lambda j: j["metrics"].get("seed") or 0)
        metrics = [j["metrics"] for j in done]
        counts = {status: sum(j["status"] == status for j in members)
                  for status in ("running", "stopped", "failed", "not started")}
        first = metrics[0] if metrics else {}
        rows.append({
            "task": name, "T": seq_len, "periods": periods, "model": label, "planned_steps": steps, "budget": budget,
            "jobs": len(members), "n": len(metrics), "seeds": [m.get("seed") for m in metrics], **counts,
            "metric": first.get("metric"), "higher_is_better": first.get("higher_is_better", False),
            "val": mean_std([m["val_metric"] for m in metrics]), "test": mean_std([m["test_metric"] for m in metrics]),
            "baseline": first.get("baseline"),
            "solved": None if solved_bar(name) is None else sum(solved_step(m, name) is not None for m in metrics),
            "recall_acc": mean_std([m.get("test", {}).get("recall_acc") for m in metrics]),
            "update_fraction": mean_std([m.get("test", {}).get("update_fraction") for m in metrics]),
            "params": sorted({m["params"] for m in metrics}),
            "steps": sorted({m["steps"] for m in metrics}),
            "wall_s": mean_std([m["wall_s"] for m in metrics]),
        })
    return rows


def _status(row: dict[str, Any]) -> str:
    if row["n"] == 0 and row["not started"] == row["jobs"]:
        return "not run"
    parts = [f"{row['n']}/{row['jobs']} finished"]
    parts += [f"{row[s]} {s}" for s in ("running", "stopped", "failed", "not started") if row[s]]
    return ", ".join(parts)


def _seeds(n: int) -> str:
    return {0: "0", 1: "1 (single seed)", 2: "2 (two seeds)"}.get(n, str(n))


def _range(values: list[Any], fmt: str = "{:,}") -> str:
    if not values:
        return "-"
    return fmt.format(values[0]) if len(values) == 1 else f"{fmt.format(values[0])}-{fmt.format(values[-1])}"


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary table, task x model: every cell's seed count beside it; a group with no finished seed says
    whether it is running or was not run."""
    head = ["task", "model", "test (mean ± std)", "val (mean ± std)", "solved", "n seeds", "params", "steps",
            "wall s (mean ± std)", "update fraction (test)", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        task = f"{r['task']} T = {r['T']}" + (f" periods {r['periods']}" if r["periods"] else "")
        digits = 4 if not r["higher_is_better"] else 4
        test = plus_minus(*r["test"], digits=digits)
        if r["recall_acc"][0] is not None:
            test += f" (recall {plus_minus(*r['recall_acc'], digits=3)})"
        bar = solved_bar(r["task"])
        bar = None if bar is None else f"{bar[0][4:]} {'<' if bar[2] else '>='} {bar[1]:g}"
        planned = "-" if r["planned_steps"] is None else f"{r['planned_steps']:,}"
        steps = (f"budget {r['budget']:g} s: {_range(r['steps'])}" if r["budget"] is not None
                 else _range(r["steps"]) if r["steps"] else planned)
        metric = f"{r['metric']} " if r["metric"] else ""
        cells = [task, r["model"], f"{metric}{test}" if r["n"] else "-", plus_minus(*r["val"], digits=digits),
                 f"{r['solved']}/{r['n']} ({bar})" if r["n"] and bar else "-", _seeds(r["n"]), _range(r["params"]), steps,
                 plus_minus(*r["wall_s"], digits=0), plus_minus(*r["update_fraction"], digits=3), _status(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Figures: learning curves (against steps and against wall time), update fractions and periods over training.

def curve(metrics: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The seeds' mean ± std of one history key at the evaluations every seed has (std None for one seed),
    with the seeds' mean wall time to each (recorded, or wall_to's estimate)."""
    per_seed = [{e["step"]: e for e in m.get("history", []) if e.get(key) is not None} for m in metrics]
    steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    out: dict[str, Any] = {"n": len(metrics), "steps": steps, "mean": [], "std": [], "wall_s": []}
    for step in steps:
        mean, std = mean_std([s[step][key] for s in per_seed])
        out["mean"].append(mean)
        out["std"].append(std)
        out["wall_s"].append(statistics.fmean(wall_to(s[step], m) for s, m in zip(per_seed, metrics)))
    return out


def up_to(c: dict[str, Any], x_name: str, limit: float | None) -> dict[str, Any]:
    """A curve's evaluations whose x_name ("steps" or "wall_s") is at most limit; all of them without one."""
    if limit is None:
        return c
    shown = [j for j, x in enumerate(c[x_name]) if x <= limit]
    return {**c, **{k: [c[k][j] for j in shown] for k in ("steps", "mean", "std", "wall_s")}}


def series_label(label: str, n: int) -> str:
    return f"{label} (n = {n} seed{'s' if n != 1 else ''})"


def _slug(*parts: Any) -> str:
    text = "_".join(str(p) for p in parts if p is not None)
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").replace("__", "_")


def _task_title(name: str, seq_len: Any, periods: str | None) -> str:
    return f"{name}, T = {seq_len}" + (f", periods {periods}" if periods else "")


def figure_groups(jobs: list[dict[str, Any]]) -> dict[tuple, dict[str, list[dict[str, Any]]]]:
    """Finished jobs by (task, T, periods), then by series label (model label; its steps appended where one
    label ran with different budgets): the metrics of each series' seeds."""
    tasks: dict[tuple, dict[tuple, list[dict[str, Any]]]] = {}
    for job in jobs:
        if job["status"] != "finished":
            continue
        name, seq_len, periods, label, steps, budget = group_key(job["config"])
        tasks.setdefault((name, seq_len, periods), {}).setdefault((label, steps, budget), []).append(job["metrics"])
    out: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for task, series in tasks.items():
        labels = [label for label, _, _ in series]
        out[task] = {}
        for (label, steps, budget), metrics in sorted(series.items(), key=lambda kv: str(kv[0])):
            if labels.count(label) > 1:
                label += f", budget {budget:g} s" if budget is not None else f", {steps:,} steps"
            out[task][label] = sorted(metrics, key=lambda m: m.get("seed") or 0)
    return out


def _band(ax, x, c, color, log: bool) -> None:
    mean = np.asarray(c["mean"], dtype=float)
    std = np.asarray([0.0 if s is None else s for s in c["std"]], dtype=float)
    low = mean - std
    if log:
        low = np.maximum(low, mean / 10)  # a band below zero cannot be drawn on a log axis
    ax.fill_between(x, low, mean + std, color=color, alpha=0.2, linewidth=0)


def legend_layout(labels: list[str]) -> tuple[int, int]:
    """(columns, rows) of a figure-wide legend: three columns of short labels, fewer of long ones, so that
    none runs off the figure's edge."""
    longest = max((len(label) for label in labels), default=0)
    ncol = 3 if longest <= 45 else 2 if longest <= 70 else 1
    return ncol, -(-len(labels) // ncol)


def render_figures(jobs: list[dict[str, Any]], out_dir: Path | str, max_step: int | None = None,
                   max_wall: float | None = None, suffix: str = "") -> list[Path]:
    """PNG figures of every task with finished jobs, into out_dir; returns the paths written:
    curves_<task><suffix>.png (validation metric against step and against wall time, every series; also
    recall on copy), update_fraction_<task><suffix>.png (mean activation against step),
    periods_<task><suffix>.png (each module's dominant period against step, one panel per clocked model and
    seed). max_step and max_wall end the curves' step and wall-time panels there, so that short runs
    are not drawn at the scale of the longest."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
              "tab:olive", "tab:cyan"]
    written = []
    for (name, seq_len, periods), series in sorted(figure_groups(jobs).items(), key=lambda kv: str(kv[0])):
        title = _task_title(name, seq_len, periods)
        stem = _slug(name, f"T{seq_len}", periods)
        first = next(iter(series.values()))[0]
        metric, higher = first["metric"], first.get("higher_is_better", False)
        keys = [f"val_{metric}"] + (["val_recall_acc"] if any("val_recall_acc" in e for e in first.get("history", []))
                                    and metric != "recall_acc" else [])
        ncol, legend_rows = legend_layout([series_label(label, len(m)) for label, m in series.items()])
        height = 3.3 * len(keys) + 0.85 + 0.17 * legend_rows
        fig = Figure(figsize=(11, height))
        fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.55 / height, bottom=(0.7 + 0.17 * legend_rows) / height,
                            wspace=0.22, hspace=0.5)
        for row, key in enumerate(keys):
            log = not higher and key != "val_recall_acc"
            for col, x_name in enumerate(("steps", "wall_s")):
                ax = fig.add_subplot(len(keys), 2, 2 * row + col + 1)
                limit = max_step if x_name == "steps" else max_wall
                for i, (label, metrics) in enumerate(series.items()):
                    c = curve(metrics, key)
                    if not c["steps"]:
                        continue
                    color = colors[i % len(colors)]
                    c = up_to(c, x_name, limit)
                    x = np.asarray(c[x_name], dtype=float)
                    ax.plot(x, c["mean"], color=color, marker="o", markersize=3, label=series_label(label, c["n"]))
                    _band(ax, x, c, color, log)
                baseline = first.get("baseline")
                if baseline and key == f"val_{metric}" and not higher:
                    ax.axhline(baseline, color="black", linestyle=":", linewidth=1, label="memoryless baseline")
                if log:
                    ax.set_yscale("log")
                ax.set_xlabel("training step" if x_name == "steps" else "wall time, s (mean over seeds; one thread each)")
                ax.set_ylabel(f"validation {key[4:]}")
                ax.set_title(("at equal steps" if x_name == "steps" else "at equal wall time")
                             + (f", the first {limit:,.0f}" + (" steps" if x_name == "steps" else " s") if limit else ""),
                             fontsize=9)
                ax.grid(True, alpha=0.3)
                if row == 0 and col == 0:
                    handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.suptitle(f"{title}: validation {metric} (mean ± std over seeds)", fontsize=10)
        written.append(_save(fig, out_dir / f"curves_{stem}{suffix}.png"))

        with_fraction = {label: m for label, m in series.items() if curve(m, "val_update_fraction")["steps"]}
        if with_fraction:
            with_open = {label for label, m in with_fraction.items()  # soft gates open everything: nothing to draw
                         if any(v < 1 for v in curve(m, "val_open_fraction")["mean"])}
            ncol = min(legend_layout([series_label(label, len(m)) for label, m in with_fraction.items()])[0], 2)
            legend_rows = -(-(len(with_fraction) + bool(with_open)) // ncol)  # the dashed line's key too
            height = 3.5 + 0.17 * legend_rows
            fig = Figure(figsize=(7 if ncol == 2 else 11, height))
            fig.subplots_adjust(left=0.12 if ncol == 2 else 0.08, right=0.97, top=1 - 0.45 / height,
                                bottom=(0.7 + 0.17 * legend_rows) / height)
            ax = fig.add_subplot()
            for i, (label, metrics) in enumerate(series.items()):
                if label not in with_fraction:
                    continue
                c = curve(metrics, "val_update_fraction")
                color = colors[i % len(colors)]
                ax.plot(c["steps"], c["mean"], color=color, marker="o", markersize=3, label=series_label(label, c["n"]))
                _band(ax, np.asarray(c["steps"], dtype=float), c, color, False)
                if label in with_open:
                    c = curve(metrics, "val_open_fraction")
                    ax.plot(c["steps"], c["mean"], color=color, linestyle="--", linewidth=1)
            if with_open:
                ax.plot([], [], color="black", linestyle="--", linewidth=1,
                        label="dashed: the share of updates open (truncated gates: what the kernels compute)")
            ax.set_xlabel("training step")
            ax.set_ylabel("update fraction (validation)")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
            ax.set_title(f"{title}: how often the modules update (mean ± std over seeds)", fontsize=10)
            written.append(_save(fig, out_dir / f"update_fraction_{stem}{suffix}.png"))

        clocked = {label: m for label, m in series.items() if any("periods" in e for e in m[0].get("history", []))}
        if clocked:
            n_cols = max(len(m) for m in clocked.values())
            fig = Figure(figsize=(3.6 * n_cols + 1.6, 2.8 * len(clocked) + 0.6))
            fig.subplots_adjust(left=0.08, right=0.85, top=1 - 0.55 / (2.8 * len(clocked) + 0.6), bottom=0.1,
                                wspace=0.25, hspace=0.55)
            for row, (label, metrics) in enumerate(clocked.items()):
                for col, m in enumerate(metrics):
                    ax = fig.add_subplot(len(clocked), n_cols, row * n_cols + col + 1)
                    history = [e for e in m.get("history", []) if "periods" in e]
                    n_modules = len(history[0]["periods"])
                    for module in range(n_modules):
                        ax.plot([e["step"] for e in history], [e["periods"][module] for e in history],
                                marker="o", markersize=2, color=matplotlib.colormaps["viridis"](module / max(1, n_modules - 1)),
                                label=f"module {module}")
                    ax.set_yscale("log", base=2)
                    ax.set_title(f"{label}, seed {m.get('seed')}", fontsize=8)
                    ax.set_xlabel("training step", fontsize=8)
                    if col == 0:
                        ax.set_ylabel("dominant period (steps)", fontsize=8)
                    ax.tick_params(labelsize=7)
                    ax.grid(True, alpha=0.3)
                    if row == 0 and col == len(metrics) - 1:
                        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
            fig.suptitle(f"{title}: each module's dominant period over training (one panel per seed)", fontsize=10)
            written.append(_save(fig, out_dir / f"periods_{stem}{suffix}.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Markdown tables and figures of the results study (scripts/study/study.sh).")
    parser.add_argument("study_dir", type=Path, help="the directory holding the study's sweep directories")
    parser.add_argument("--summary", action="store_true", help="print the summary table (task x model) instead of the study's tables")
    parser.add_argument("--figures", type=Path, metavar="DIR", help="write the figures (PNG) into DIR")
    parser.add_argument("--max-step", type=int, metavar="N", help="draw the curves against steps up to step N only")
    parser.add_argument("--max-wall", type=float, metavar="S", help="draw the curves against wall time up to S seconds only")
    parser.add_argument("--suffix", default="", help="append this to the figures' file names (curves_<task><suffix>.png)")
    parser.add_argument("--plan", choices=sorted(PLANS), help="count the plan's sweeps that have not started as not run")
    parser.add_argument("--commands", action="store_true", help="print the plan's hrnn-train commands and stop")
    parser.add_argument("--sweeps", metavar="PATTERNS", help="only these sweep directories, or <sweep>/<job directory> (shell patterns, comma-separated)")
    args = parser.parse_args(argv)
    plan = PLANS.get(args.plan) if args.plan else None
    if args.commands:
        print("\n".join(commands(plan or ABLATION, out=str(args.study_dir))))
        return 0
    if not args.study_dir.is_dir() and plan is None:
        print(f"error: {args.study_dir} is not a directory; run scripts/study/study.sh first", file=sys.stderr)
        return 2
    if args.summary or args.figures:
        jobs = only_sweeps(planned_jobs(args.study_dir, plan), args.sweeps)
        if not jobs:
            print(f"error: no job directories under {args.study_dir}"
                  + (f" in sweeps matching {args.sweeps}" if args.sweeps else ""), file=sys.stderr)
            return 1
        if args.summary:
            print(format_summary(summary_rows(jobs)))
        if args.figures:
            for path in render_figures(jobs, args.figures, args.max_step, args.max_wall, args.suffix):
                print(f"wrote {path}", file=sys.stderr)
        return 0
    jobs = only_sweeps(read_study(args.study_dir), args.sweeps)
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
