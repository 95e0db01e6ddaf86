"""Training-step time and peak memory of hrnn's recurrent core against torch.nn RNNs.

    python scripts/bench/bench.py            # T = 200, 784, 2000 (several minutes on 2 cores)
    python scripts/bench/bench.py --quick    # tiny run: checks the script works, numbers meaningless
    python scripts/bench/bench.py --device cuda [...]   # the GPU benchmark (bench_cuda.py)

The fused configurations (hrnn-*, cwrnn*) run once under each CPU capability this machine
executes (HRNN_CPU_CAPABILITY: default, avx2, avx512; `--capabilities` picks some); the torch
baselines, the PyTorch loop and the FLOP floor do not depend on it and run once per T. Each
capability's ratios are printed, with the loop / fused speed-up at every T.

Every configuration runs in a fresh subprocess, one after another: batch 100, hidden 128,
8 modules, 1 input, float32, the real model classes (hrnn.models) with a 10-way linear head
reading the last state (like sequential MNIST), cross-entropy, Adam. A training step is
zero_grad + forward + backward + optimizer step; after warm-up steps the script reports the
median, min and max of the timed steps.

Peak memory is the growth of the subprocess's peak resident set (ru_maxrss) from just before
the first step (model and data already built) to the end: everything a step needs at its
worst moment (saved activations, gradients, allocator and buffer-pool memory), measured by the
kernel, not estimated by us. A fresh process per configuration keeps one model's high-water
mark from hiding another's.

The FLOP floor is measured in the same run: the FLOP/s of a (100 x 128) @ (128 x 128) product
(the loop's shape) repeated, and floor = 2 * B * H * (H + 1) * T * 3 / that rate: one forward
and two backward products per step at full small-GEMM speed, ignoring everything else.
The machine may be shared: compare ratios within one run, not numbers across runs.

After the T tables, the text table (configs text-*, run unless --only leaves them out): the
experiment=text presets, hrnn and its equal-parameter LSTM and GRU of 1 and 2 layers, at their own
sizes, batch and T, on random windows of the KJV's 74 symbols, each step starting from the state the
last one ended in (as task=text trains); its last column is the training throughput in characters
(batch x T) per second of the median step, and its floor is hrnn's recurrent products at that shape.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file
from common import (BATCH, CONFIGS, DEFAULT_ONLY, HIDDEN, INPUTS, MODULES, ROOT, TEXT_CONFIGS,  # noqa: E402
                    TEXT_VOCAB, VARIANTS, model_and_batch, summary, text_training_step, timed, training_step)

# The table's columns after the row name (before the description): (header, width, format).
COLUMNS = (("median s", 9, ".4f"), ("min s", 8, ".4f"), ("max s", 8, ".4f"), ("x floor", 8, ".2f"),
           ("peak MB", 8, ".1f"))
# The text table's: the same, and the training throughput, characters (batch x T) per second of the median step.
TEXT_COLUMNS = (*COLUMNS, ("chars/s", 9, ".0f"))
# The ratios printed per capability: (label, numerator row, denominator row or None for the floor).
RATIOS = [("hrnn-dct / floor", "hrnn-dct", None), ("hrnn-binary / floor", "hrnn-binary", None),
          ("LSTM / hrnn-dct", "lstm", "hrnn-dct"), ("GRU / hrnn-dct", "gru", "hrnn-dct"),
          ("RNN / hrnn-dct", "rnn", "hrnn-dct"), ("cwrnn dense / hard", "cwrnn-dense", "cwrnn"),
          ("loop / fused hrnn-dct", "hrnn-dct-loop", "hrnn-dct")]


def is_fused(name: str) -> bool:
    """A config that runs hrnn's C++ kernels (and so runs once per capability)."""
    return CONFIGS[name][1] in ("hrnn", "cwrnn") and not CONFIGS[name][3]


def count_kernel_calls(calls: dict) -> None:
    """Counts the C++ clock kernels' calls in `calls` by whether they skipped inactive tiles: the
    cwrnn row must have skipped and the cwrnn-dense row must not have (tests/test_bench.py)."""
    from hrnn.ops import cpu

    kernels = cpu.leaky_rnn

    def counted(x, w_x, bias, w_h, waves, h0, skip_inactive, last_only=False):
        calls["skipping" if skip_inactive else "dense"] += 1
        return kernels(x, w_x, bias, w_h, waves, h0, skip_inactive, last_only)

    cpu.leaky_rnn = counted


def worker(spec: dict) -> dict:
    """Runs in the fresh subprocess: build, warm up, time; returns the result for one JSON line."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["config"] in TEXT_CONFIGS:
        return text_worker(spec)
    import hrnn.models.recurrent as recurrent
    from hrnn import ops

    name, steps = spec["config"], spec["steps"]
    if CONFIGS[name][4]:  # the op the model calls, forced dense
        recurrent.leaky_rnn = lambda *args, **kwargs: ops.leaky_rnn(*args, **{**kwargs, "skip_inactive": False})
    kernel_calls = {"skipping": 0, "dense": 0}
    count_kernel_calls(kernel_calls)
    model, x, y = model_and_batch(name, BATCH, steps)
    step = training_step(model, x, y)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = timed(step, spec["warmup"], spec["repeat"])
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"config": name, "steps": steps, **summary(times), "times": times,
            "peak_mb": max(0, rss_after - rss_before) / 1024,
            "fused": ops.fused_available() and CONFIGS[name][1] in ("hrnn", "cwrnn"),
            "capability": spec.get("capability"), "capability_used": ops.cpu_capability(),
            "kernel_calls": kernel_calls}


def text_worker(spec: dict) -> dict:
    """A text row in its subprocess: the preset's step timed as the others are, and its characters per second."""
    step, batch, steps = text_training_step(spec["config"], spec.get("text_steps"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = timed(step, spec["warmup"], spec["repeat"])
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"config": spec["config"], "steps": steps, "batch": batch, **summary(times), "times": times,
              "peak_mb": max(0, rss_after - rss_before) / 1024}
    return {**result, "chars_per_s": batch * steps / result["median"]}


def flop_rate(threads: int, seconds: float = 1.0) -> float:
    """FLOP/s of the loop's product shape, (B x H) @ (H x H), best of several batches."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(BATCH, HIDDEN), torch.randn(HIDDEN, HIDDEN)
    out = torch.empty(BATCH, HIDDEN)
    n = 200
    best = float("inf")
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - t0) / n)
        if time.perf_counter() > end:
            break
    return 2 * BATCH * HIDDEN * HIDDEN / best


def run_config(spec: dict) -> dict:
    """One configuration in a fresh subprocess (`--worker`), under its capability."""
    env = dict(os.environ, **(CONFIGS[spec["config"]][3] if spec["config"] in CONFIGS else {}))
    if spec.get("capability"):
        env["HRNN_CPU_CAPABILITY"] = spec["capability"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=spec.get("timeout", 1800))
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['config']} T={spec['steps']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def config_names(value: str) -> list[str]:
    """--only: comma-separated configs, each one of CONFIGS or TEXT_CONFIGS."""
    names = [n for n in value.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS and n not in TEXT_CONFIGS]
    if unknown or not names:
        known = ", ".join([*CONFIGS, *TEXT_CONFIGS])
        raise argparse.ArgumentTypeError(f"unknown configs {unknown}; choose from {known}")
    return names


def at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(value: str) -> int:
        if not value.isdigit() or int(value) < low:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= {low}")
        return int(value)
    return parse


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=at_least(1), nargs="+", default=[200, 784, 2000], help="sequence lengths T")
    parser.add_argument("--only", type=config_names, default=config_names(DEFAULT_ONLY),
                        help=f"comma-separated configs (default: all but the variants {', '.join(VARIANTS)}): "
                        + ", ".join([*CONFIGS, *TEXT_CONFIGS]))
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--repeat", type=at_least(1), default=7, help="timed steps (median of these)")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--capabilities", help="comma-separated CPU capabilities for the fused configs "
                        "(default: every one this machine executes)")
    parser.add_argument("--quick", action="store_true", help="T=30, 1 warm-up, 2 timed steps: a smoke test")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def capabilities_to_run(parser: argparse.ArgumentParser, asked: str | None) -> list[str | None]:
    """The capabilities the fused configs run under, best first ([None] without the extension)."""
    from hrnn import ops

    here = ops.cpu_capabilities()[::-1] or [None]
    if not asked:
        return here
    names = [c for c in asked.split(",") if c]
    bad = [c for c in names if c not in here]
    if bad:
        parser.error(f"capabilities {bad} do not run here; this machine executes {here}")
    return names


def print_header(threads: int, args) -> float:
    """The machine, the extension, the sizes; returns the measured FLOP rate."""
    import torch

    from hrnn import ops

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    fused = "available" if ops.fused_available() else f"NOT available: {ops.fused_unavailable_reason()}"
    print(f"fused extension: {fused}")
    print(f"batch {BATCH}, hidden {HIDDEN}, {MODULES} modules, {INPUTS} input, float32; "
          f"step = zero_grad + forward + backward + Adam; {args.warmup} warm-up, median of {args.repeat}")
    tunables = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    if tunables:
        print(f"allocator environment (inherited by every config): {tunables}")
    rate = flop_rate(threads)
    print(f"FLOP rate of ({BATCH}x{HIDDEN}) @ ({HIDDEN}x{HIDDEN}): {rate / 1e9:.1f} GFLOP/s")
    return rate


def run_steps(steps: int, args, threads: int, capabilities: list, floor: float) -> dict:
    """Every config at one T; row name (config@capability for fused ones) -> result."""
    rows = {}
    for name in (n for n in args.only if n in CONFIGS):
        for capability in capabilities if is_fused(name) else [None]:
            spec = {"config": name, "steps": steps, "warmup": args.warmup, "repeat": args.repeat,
                    "threads": threads, "capability": capability}
            res = run_config(spec)
            res["floor"] = floor
            rows[f"{name}@{capability}" if capability else name] = res
    return rows


def run_text(args, threads: int, rate: float) -> list[dict]:
    """The text table: each selected text config's step (its preset's batch, T and sizes; T = 30 with --quick),
    against the floor of hrnn's recurrent products at that shape (as the T tables' floor at theirs)."""
    from common import compose_config

    rows = {}
    for name in (n for n in args.only if n in TEXT_CONFIGS):
        spec = {"config": name, "warmup": args.warmup, "repeat": args.repeat, "threads": threads,
                "text_steps": 30 if args.quick else None}
        rows[name] = run_config(spec)
    if not rows:
        return []
    first = next(iter(rows.values()))
    hidden = compose_config(["experiment=text"]).model.hidden_size
    floor = 2 * first["batch"] * hidden * (hidden + 1) * first["steps"] * 3 / rate
    for r in rows.values():
        r["floor"] = floor
    print(f"\ntext: batch {first['batch']}, T = {first['steps']}, {TEXT_VOCAB} symbols, the state carried   "
          f"FLOP floor {floor:.4f} s (hrnn's {hidden}-unit products)")
    print_rows(rows, floor, TEXT_COLUMNS, TEXT_CONFIGS)
    return list(rows.values())


def print_rows(rows: dict, floor: float, columns: tuple, descriptions: dict) -> None:
    """A table's header and a row per result: the timings, the ratio to the floor, the peak, [chars/s]."""
    print(f"  {'config':<31} " + " ".join(f"{name:>{width}}" for name, width, _ in columns) + "  description")
    for row, r in rows.items():
        values = (r["median"], r["min"], r["max"], r["median"] / floor, r["peak_mb"], r.get("chars_per_s"))
        cells = " ".join(f"{v:{width}{form}}" for v, (_, width, form) in zip(values, columns))
        print(f"  {row:<31} {cells}  {descriptions[r['config']][0]}")


def print_table(steps: int, floor: float, rows: dict, capabilities: list) -> None:
    """One T's table (a row per config and capability, COLUMNS) and each capability's ratios."""
    print(f"\nT = {steps}   FLOP floor {floor:.4f} s")
    print_rows(rows, floor, COLUMNS, CONFIGS)
    for capability in capabilities:
        print(f"  ratios (medians), {capability or 'no fused kernels'}: " + "; ".join(ratios(rows, capability, floor)))


def ratios(rows: dict, capability: str | None, floor: float) -> list[str]:
    """The targets' ratios for one capability's fused rows against the shared baselines."""
    def row(name):
        return rows.get(f"{name}@{capability}" if capability else name, rows.get(name))

    out = []
    for label, num, den in RATIOS:
        if row(num) and (den is None or row(den)):
            value = row(num)["median"] / (floor if den is None else row(den)["median"])
            out.append(f"{label} {value:.2f}")
    if row("lstm") and row("hrnn-dct"):
        out.append(f"peak MB hrnn-dct / LSTM {row('hrnn-dct')['peak_mb'] / max(row('lstm')['peak_mb'], 1e-9):.2f}")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["--device", "cuda"]:  # the GPU benchmark lives beside this one
        import bench_cuda

        return bench_cuda.main(argv[2:])
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import torch

    threads = args.threads or torch.get_num_threads()
    if args.quick:
        args.steps, args.warmup, args.repeat = [30], 1, 2
    capabilities = capabilities_to_run(parser, args.capabilities)
    rate = print_header(threads, args)
    print(f"CPU capabilities of the fused kernels: {', '.join(map(str, capabilities))} (best first)")
    results = []
    for steps in args.steps if any(n in CONFIGS for n in args.only) else []:
        floor = 2 * BATCH * HIDDEN * (HIDDEN + 1) * steps * 3 / rate
        rows = run_steps(steps, args, threads, capabilities, floor)
        results.extend(rows.values())
        print_table(steps, floor, rows, capabilities)
    results.extend(run_text(args, threads, rate))
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"flop_rate": rate, "threads": threads, "capabilities": capabilities, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
