#!/usr/bin/env python3
"""Tables of the results study: `python scripts/results.py outputs/study`.

Reads the metrics.json of every job that scripts/study.sh ran and prints markdown
(pasted into docs/results.md). The logic is hrnn.results.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hrnn.results import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
