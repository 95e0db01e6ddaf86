"""Compile scripts/bench/time_kernels.cpp for each capability with setup.py's own flags, and run it.

    python scripts/bench/time_kernels.py                # every capability this CPU runs, T = 200 and 784
    python scripts/bench/time_kernels.py --capabilities avx2 --steps 784 -- -DHRNN_DW_TILES=2

The clock core's kernels alone, one thread, one batch slice (docs/performance.md). Arguments
after `--` go to the compiler: a blocking macro tries another shape without touching the sources.
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_flags() -> tuple[dict[str, list[str]], list[str]]:
    """setup.py's X86_CAPABILITIES and KERNEL_FLAGS, read without running setup.py."""
    values = {}
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("X86_CAPABILITIES", "KERNEL_FLAGS"):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values["X86_CAPABILITIES"], [f for f in values["KERNEL_FLAGS"] if f not in ("-fPIC", "-fvisibility=hidden")]


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capabilities", help="comma-separated (default: every one this CPU runs)")
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 784], help="sequence lengths T")
    parser.add_argument("--rows", type=int, default=50, help="batch rows of the slice (B = 100 on 2 threads: 50)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    capabilities, flags = build_flags()
    if args.capabilities:
        wanted = args.capabilities.split(",")
        unknown = [c for c in wanted if c not in capabilities]
        if unknown:
            sys.exit(f"capability {unknown[0]!r} has no register kernels; allowed: {', '.join(capabilities)}")
    else:
        sys.path.insert(0, str(ROOT))  # hrnn from this checkout
        from hrnn import ops

        wanted = [c for c in ops.cpu_capabilities() if c in capabilities]
    with tempfile.TemporaryDirectory() as tmp:
        for cap in wanted:
            binary = Path(tmp) / f"time_kernels_{cap}"
            subprocess.run(["g++", *flags, *capabilities[cap], f"-DHRNN_CPU_CAPABILITY={cap}", *extra,
                            str(Path(__file__).with_suffix(".cpp")), "-o", str(binary)], check=True)
            for steps in args.steps:
                subprocess.run([str(binary), str(args.rows), str(steps), str(args.repeat)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
