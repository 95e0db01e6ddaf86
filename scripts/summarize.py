#!/usr/bin/env python3
"""Summarise a sweep: `python scripts/summarize.py outputs/multirun/<date> [--csv]`.

One row per combination of the overrides that varied (seeds pooled: mean ± std), with the
learned periods and wall time; failed and unfinished jobs are listed under the table.
The logic is hrnn.summary (importable: read_jobs, summarize).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hrnn.summary import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
