#!/usr/bin/env python3
"""Copy the small records of finished study runs into the repository, so that results.py can rebuild
docs/results.md's tables and figures on any later checkout.

    python scripts/study/keep_records.py outputs/study/ablation_smnist outputs/study/ablation_pmnist --into docs/runs

A run directory holds checkpoints and TensorBoard events (megabytes, and outputs/ is never committed);
its record is what results.py reads: metrics.json (the final metrics and the evaluation history) and
.hydra/{config,overrides,hydra}.yaml (what ran), and the sweep's multirun.yaml. A failed run keeps its
error.txt, so the tables still list it. Runs still going are left out (their record would change); copying again replaces a record.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

RECORD = ("metrics.json", "error.txt", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml")


def is_done(run: Path) -> bool:
    """Finished (metrics.json says so) or failed (error.txt): a record that will not change."""
    if (run / "error.txt").exists():
        return True
    try:
        return json.loads((run / "metrics.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def run_dirs(sweep: Path) -> list[Path]:
    """Every run directory under a sweep (one with .hydra/overrides.yaml), nested sweeps included."""
    return sorted(p.parent.parent for p in sweep.rglob(".hydra/overrides.yaml"))


def keep(sweeps: list[Path], into: Path) -> tuple[int, int]:
    """Copy each done run's record to into/<sweep name>/<path under the sweep>; (kept, left out)."""
    kept = left = 0
    for sweep in sweeps:
        for multirun in sweep.rglob("multirun.yaml"):  # what the sweep runs: results.py lists its jobs not yet done
            dest = into / sweep.name / multirun.relative_to(sweep)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(multirun, dest)
        for run in run_dirs(sweep):
            if not is_done(run):
                left += 1
                continue
            dest = into / sweep.name / run.relative_to(sweep)
            if dest.exists():
                shutil.rmtree(dest)
            for name in RECORD:
                if (run / name).exists():
                    (dest / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(run / name, dest / name)
            kept += 1
    return kept, left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories (hydra.sweep.dir of a study table)")
    parser.add_argument("--into", type=Path, required=True, help="where the records go, e.g. docs/runs")
    args = parser.parse_args(argv)
    for sweep in args.sweeps:
        if not sweep.is_dir():
            print(f"keep_records: {sweep} is not a directory (give a sweep directory, e.g. outputs/study/ablation_smnist)",
                  file=sys.stderr)
            return 2
    kept, left = keep(args.sweeps, args.into)
    print(f"kept {kept} run records in {args.into}" + (f"; left out {left} runs still going" if left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
