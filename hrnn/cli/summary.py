"""hrnn-summary: the summary table of a sweep directory again, `hrnn-summary outputs/multirun/<date> [--csv]`.

One row per combination of the overrides that varied (seeds pooled: mean ± std), with the
learned periods and wall time; failed and unfinished jobs are listed under the table
(hrnn/sweep/summary.py, which also prints it at the end of every sweep).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hrnn.cli.wrapper import user_errors
from hrnn.errors import UserError
from hrnn.sweep.summary import format_csv, format_markdown, read_jobs, summarize


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hrnn-summary",
                                     description="Summarise an hrnn-train sweep directory (mean ± std over seeds).")
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/multirun/2024-01-01_12-00-00")
    parser.add_argument("--csv", action="store_true", help="CSV (mean and std in separate columns) instead of markdown")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise UserError(f"{args.sweep_dir} is not a directory; give a sweep directory such as outputs/multirun/<date>")
    jobs = read_jobs(args.sweep_dir)
    if not jobs:
        print(f"error: no job directories (with .hydra/overrides.yaml, metrics.json or error.txt) in {args.sweep_dir}",
              file=sys.stderr)
        return 1
    rows = summarize(jobs)
    print(format_csv(rows) if args.csv else format_markdown(rows, jobs), end="" if args.csv else "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
