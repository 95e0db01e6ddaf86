"""Summarise a sweep directory: the overrides that varied against the final metrics.

Each job directory (`<num>_<override_dirname>`) holds `.hydra/overrides.yaml` and, once it
ends, `metrics.json` or `error.txt`. Jobs are grouped by every override that varied except
`trainer.seed`; each group shows mean ± std over its seeds. Failed and unfinished jobs are
counted in their group and listed under the table. Used by hrnn-summary (hrnn/cli/summary.py)
and at the end of every `hrnn-train -m` sweep; importing this module does not import torch.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

SEED_KEY = "trainer.seed"
ALWAYS_IGNORED = ("resume",)  # changes how a job runs, not what it computes


def read_jobs(sweep_dir: Path | str) -> list[dict[str, Any]]:
    """One record per job directory: name, dir, overrides, ignored keys, config, seed, status, metrics, error."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for path in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        markers = (path / ".hydra" / "overrides.yaml", path / "metrics.json", path / "error.txt")
        if not any(m.exists() for m in markers):
            continue
        jobs.append(_read_job(path))
    jobs.sort(key=lambda j: (_job_num(j["name"]), j["name"]))
    return jobs


def _read_job(path: Path) -> dict[str, Any]:
    job: dict[str, Any] = {"name": path.name, "dir": str(path), "overrides": {}, "ignored": set(ALWAYS_IGNORED),
                           "metrics": None, "error": None, "status": "unfinished"}
    try:
        for item in OmegaConf.load(path / ".hydra" / "overrides.yaml"):
            key, _, value = str(item).partition("=")
            job["overrides"][key.lstrip("+~")] = value
    except Exception:  # noqa: BLE001 - a missing or broken file leaves the job without overrides
        pass
    try:
        hydra_cfg = OmegaConf.load(path / ".hydra" / "hydra.yaml")
        job["ignored"].update(OmegaConf.select(hydra_cfg, "hydra.job.config.override_dirname.exclude_keys", default=[]) or [])
    except Exception:  # noqa: BLE001
        pass
    try:  # the composed config, as plain containers ({} when missing or unreadable)
        job["config"] = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"))
    except Exception:  # noqa: BLE001
        job["config"] = {}
    job["seed"] = job["config"].get("trainer", {}).get("seed")
    error = path / "error.txt"
    metrics = path / "metrics.json"
    if error.exists():
        lines = error.read_text(errors="replace").strip().splitlines()
        job.update(status="failed", error=lines[0] if lines else "error (no message)", error_mtime=error.stat().st_mtime)
    elif metrics.exists():
        try:
            job["metrics"] = json.loads(metrics.read_text())
            if job["metrics"].get("status") == "finished":
                job["status"] = "finished"
        except ValueError as exc:
            job.update(status="failed", error=f"unreadable metrics.json: {exc}")
    if job["status"] == "unfinished" and (path / "pruned.txt").exists():  # stopped early by a search
        job["error"] = (path / "pruned.txt").read_text(errors="replace").strip()
    elif job["status"] == "unfinished":
        job["error"] = "no metrics.json" + (" (has checkpoints/last.pt; resume=auto continues it)"
                                            if (path / "checkpoints" / "last.pt").exists() else "")
    return job


def _job_num(name: str) -> int:
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def varied_keys(jobs: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (or that only some jobs set), in command-line order."""
    ignored = set().union(*(j["ignored"] for j in jobs)) if jobs else set()
    keys = list(dict.fromkeys(k for j in jobs for k in j["overrides"] if k not in ignored and not k.startswith("hydra")))
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]


def summarize(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the table: one per combination of varied overrides (seeds pooled)."""
    varied = varied_keys(jobs)
    group_keys = [k for k in varied if k != SEED_KEY]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for job in jobs:
        groups.setdefault(tuple(job["overrides"].get(k, "") for k in group_keys), []).append(job)
    rows = []
    for values, members in groups.items():
        done = [j for j in members if j["status"] == "finished"]
        row: dict[str, Any] = dict(zip(group_keys, values))
        seeds = [str(j["metrics"]["seed"]) if j["metrics"] and "seed" in j["metrics"]
                 else j["overrides"].get(SEED_KEY, "-" if j.get("seed") is None else str(j["seed"])) for j in members]
        row["seeds"] = ",".join(seeds)
        row["finished"] = len(done)
        row["failed"] = sum(j["status"] == "failed" for j in members)
        row["unfinished"] = sum(j["status"] == "unfinished" for j in members)
        row["metric"] = ",".join(dict.fromkeys(str(j["metrics"].get("metric")) for j in done))
        for name in ("val_metric", "test_metric", "wall_s"):
            mean, std = mean_std([j["metrics"].get(name) for j in done])
            row[f"{name}_mean"], row[f"{name}_std"] = mean, std
        baselines = [j["metrics"].get("baseline") for j in done if j["metrics"].get("baseline") is not None]
        row["baseline"] = baselines[0] if baselines else None
        row["periods"] = " ".join(_periods(j["metrics"].get("periods")) for j in done if j["metrics"].get("periods") is not None)
        row["problems"] = "; ".join(f"{j['name']}: {j['status']}: {j['error']}" for j in members if j["status"] != "finished")
        rows.append(row)
    return rows


def mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and sample std of the numbers among values (std None for fewer than two)."""
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    if not numbers:
        return None, None
    return statistics.fmean(numbers), (statistics.stdev(numbers) if len(numbers) > 1 else None)


def _periods(periods: Any) -> str:
    if isinstance(periods, list):
        return "[" + ", ".join(f"{p:g}" if isinstance(p, (int, float)) else str(p) for p in periods) + "]"
    return str(periods)


def plus_minus(mean: float | None, std: float | None, digits: int = 4) -> str:
    """'mean ± std' ('-' without a mean, no '± ' without a std)."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _status(row: dict[str, Any]) -> str:
    total = row["finished"] + row["failed"] + row["unfinished"]
    parts = [f"{row['finished']}/{total} finished"]
    parts += [f"{row[k]} {k}" for k in ("failed", "unfinished") if row[k]]
    return ", ".join(parts)


def format_markdown(rows: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> str:
    group_keys = [k for k in varied_keys(jobs) if k != SEED_KEY]
    metric = ",".join(dict.fromkeys(r["metric"] for r in rows if r["metric"])) or "metric"
    header = [*group_keys, "seeds", "jobs", f"val {metric}", f"test {metric}", "baseline", "periods", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row[k] for k in group_keys] + [
            row["seeds"], _status(row), plus_minus(row["val_metric_mean"], row["val_metric_std"]),
            plus_minus(row["test_metric_mean"], row["test_metric_std"]),
            "-" if row["baseline"] is None else f"{row['baseline']:.4f}", row["periods"] or "-",
            plus_minus(row["wall_s_mean"], row["wall_s_std"], 1)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    problems = [j for j in jobs if j["status"] != "finished"]
    if problems:
        lines += ["", "Jobs that did not finish:"]
        lines += [f"- {j['name']}: {j['status']}: {j['error']}" for j in problems]
    return "\n".join(lines)


def format_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
