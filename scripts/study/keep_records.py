#!/usr/bin/env python3
"""Copy the small records of finished study runs into the repository, so that results.py can rebuild
docs/results.md's tables and figures on any later checkout.

    python scripts/study/keep_records.py outputs/study/ablation_smnist outputs/study/ablation_pmnist --into docs/runs

A run directory holds checkpoints and TensorBoard events (megabytes, and outputs/ is never committed);
its record is what results.py reads: metrics.json (the final metrics and the evaluation history) and
.hydra/{config,overrides,hydra}.yaml (what ran), and the sweep's multirun.yaml. A failed run keeps its
error.txt, so the tables still list it. Runs still going are left out (their record would change);
copying again replaces a record.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from hrnn.sweep.summary import read_jobs  # noqa: E402

RECORD = ("metrics.json", "error.txt", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml")


def runs(sweep: Path) -> list[dict]:
    """read_jobs' record of every run under a sweep, nested sweeps (the parents of run directories) included."""
    return [job for parent in sorted({p.parent.parent.parent for p in sweep.rglob(".hydra/overrides.yaml")})
            for job in read_jobs(parent)]


def keep(sweeps: list[Path], into: Path) -> tuple[int, int]:
    """Copy each done run's record to into/<sweep name>/<path under the sweep>; (kept, left out)."""
    kept = left = 0
    for sweep in sweeps:
        for multirun in sweep.rglob("multirun.yaml"):  # what the sweep runs: results.py lists its jobs not yet done
            dest = into / sweep.name / multirun.relative_to(sweep)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(multirun, dest)
        for job in runs(sweep):
            if job["status"] not in ("finished", "failed"):  # still going: its record would change
                left += 1
                continue
            run = Path(job["dir"])
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
