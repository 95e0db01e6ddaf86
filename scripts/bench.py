"""Training-step time and peak memory of hrnn's recurrent core against torch.nn RNNs.

    python scripts/bench.py            # T = 200, 784, 2000 (several minutes on 2 cores)
    python scripts/bench.py --quick    # tiny run: checks the script works, numbers meaningless
    python scripts/bench.py --device cuda [...]   # the GPU benchmark (scripts/bench_cuda.py)

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
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BATCH, HIDDEN, MODULES, INPUTS, CLASSES = 100, 128, 8, 1, 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (description, model, basis, env, force dense[, config overrides])
CONFIGS = {
    "hrnn-dct": ("learned clock, DCT basis (soft waves, learned)", "hrnn", "dct", {}, False),
    "hrnn-binary": ("learned clock, binary basis (softmax mix of 0/1 columns, learned)", "hrnn", "binary", {}, False),
    "cwrnn": ("Clockwork RNN, periods 2^i, hard waves: inactive modules skipped", "cwrnn", None, {}, False),
    "cwrnn-dense": ("the same Clockwork RNN run densely (skip_inactive=False)", "cwrnn", None, {}, True),
    "lstm": ("torch.nn.LSTM", "lstm", None, {}, False),
    "gru": ("torch.nn.GRU", "gru", None, {}, False),
    "rnn": ("torch.nn.RNN (tanh)", "rnn", None, {}, False),
    "hrnn-dct-loop": ("hrnn-dct through the pure PyTorch loop (the fallback)", "hrnn", "dct",
                      {"HRNN_DISABLE_FUSED": "1"}, False),
}
# The model's other options (docs/models.md), for the step time of each: `--only` names them.
VARIANTS = {
    "hrnn-clock_event": ("the default model: DCT clock times soft event gates", "hrnn", "dct", {}, False,
                         ["model.activation=clock_event"]),
    "hrnn-event": ("soft event gates, no clock", "hrnn", "dct", {}, False, ["model.activation=event"]),
    "hrnn-chunker": ("Chunker gates, soft (reference loop: no fused core)", "hrnn", "dct", {}, False,
                     ["model.activation=chunker"]),
    "hrnn-connectivity": ("learned clock with learned connectivity (soft block gates)", "hrnn", "dct", {}, False,
                          ["model.connectivity=learned"]),
    "hrnn-event-connectivity": ("soft event gates with learned connectivity", "hrnn", "dct", {}, False,
                                ["model.activation=event", "model.connectivity=learned"]),
}
DEFAULT_ONLY = ",".join(CONFIGS)
CONFIGS.update(VARIANTS)


def build(model_name: str, basis: str | None, steps: int, extra: list[str] = ()):
    """The model as hrnn-train builds it from conf/ (its defaults, e.g. the DCT clock's start),
    with this benchmark's sizes and a 10-way head on the last state."""
    import torch
    from hydra import compose, initialize_config_dir

    from hrnn.models import build_model
    from hrnn.tasks import TaskSpec

    overrides = [f"model={model_name}", f"model.hidden_size={HIDDEN}", f"model.n_modules={MODULES}",
                 f"task.seq_len={steps}", *([f"basis={basis}"] if basis else []),
                 *(["model.activation=clock"] if model_name == "hrnn" else []),  # the clock core unless extra says
                 *extra]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    torch.manual_seed(0)
    return build_model(cfg, TaskSpec(input_size=INPUTS, output_size=CLASSES, seq_len=steps, readout="last"))


def worker(spec: dict) -> dict:
    """Runs in the fresh subprocess: build, warm up, time; print one JSON line."""
    import torch

    torch.set_num_threads(spec["threads"])
    import hrnn.models.recurrent as recurrent
    from hrnn import fused
    from hrnn.core import leaky_rnn

    _, model_name, basis, _, dense, *extra = CONFIGS[spec["config"]]
    if dense:  # the op the model calls, forced dense
        recurrent.leaky_rnn = lambda *args, **kwargs: leaky_rnn(*args, **{**kwargs, "skip_inactive": False})
    # Count the fused op's calls by whether they skipped inactive tiles: the cwrnn row must have
    # skipped and the cwrnn-dense row must not have (tests/test_bench.py checks both).
    kernel_calls = {"skipping": 0, "dense": 0}
    fused_rnn = fused.leaky_rnn

    def counted_rnn(x, w_x, bias, w_h, waves, h0, skip_inactive, last_only=False):
        kernel_calls["skipping" if skip_inactive else "dense"] += 1
        return fused_rnn(x, w_x, bias, w_h, waves, h0, skip_inactive, last_only)

    fused.leaky_rnn = counted_rnn
    steps = spec["steps"]
    model = build(model_name, basis, steps, extra[0] if extra else [])
    x = torch.randn(BATCH, steps, INPUTS)
    y = torch.randint(0, CLASSES, (BATCH,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["repeat"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "config": spec["config"], "steps": steps, "median": statistics.median(times),
        "min": min(times), "max": max(times), "times": times,
        "peak_mb": max(0, rss_after - rss_before) / 1024,
        "fused": fused.available() and model_name in ("hrnn", "cwrnn"),
        "capability": spec.get("capability"), "capability_used": fused.cpu_capability(),
        "kernel_calls": kernel_calls,
    }


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
    env = dict(os.environ, **CONFIGS[spec["config"]][3])
    if spec.get("capability"):
        env["HRNN_CPU_CAPABILITY"] = spec["capability"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=spec.get("timeout", 1800))
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['config']} T={spec['steps']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 784, 2000], help="sequence lengths T")
    parser.add_argument("--only", default=DEFAULT_ONLY, help="comma-separated configs (default: all but the variants "
                        f"{', '.join(VARIANTS)}): " + ", ".join(CONFIGS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7, help="timed steps (median of these; >= 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--capabilities", help="comma-separated CPU capabilities for the fused configs "
                        "(default: every one this machine executes)")
    parser.add_argument("--quick", action="store_true", help="T=30, 1 warm-up, 2 timed steps: a smoke test")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["--device", "cuda"]:  # the GPU benchmark lives beside this one
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_cuda

        return bench_cuda.main(argv[2:])
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import platform

    import torch

    threads = args.threads or torch.get_num_threads()
    if args.quick:
        args.steps, args.warmup, args.repeat = [30], 1, 2
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")

    sys.path.insert(0, ROOT)
    from hrnn import fused

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"fused extension: {'available' if fused.available() else 'NOT available: ' + str(fused.unavailable_reason())}")
    print(f"batch {BATCH}, hidden {HIDDEN}, {MODULES} modules, {INPUTS} input, float32; "
          f"step = zero_grad + forward + backward + Adam; {args.warmup} warm-up, median of {args.repeat}")
    tunables = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    if tunables:
        print(f"allocator environment (inherited by every config): {tunables}")
    rate = flop_rate(threads)
    print(f"FLOP rate of ({BATCH}x{HIDDEN}) @ ({HIDDEN}x{HIDDEN}): {rate / 1e9:.1f} GFLOP/s")

    capabilities = fused.cpu_capabilities()[::-1] or [None]  # best first
    if args.capabilities:
        asked = [c for c in args.capabilities.split(",") if c]
        bad = [c for c in asked if c not in capabilities]
        if bad:
            parser.error(f"capabilities {bad} do not run here; this machine executes {capabilities}")
        capabilities = asked
    print(f"CPU capabilities of the fused kernels: {', '.join(map(str, capabilities))} (best first)")

    results = []
    for steps in args.steps:
        floor = 2 * BATCH * HIDDEN * (HIDDEN + 1) * steps * 3 / rate
        rows = {}  # row name -> result; fused configs are named config@capability
        for name in names:
            fused_config = CONFIGS[name][1] in ("hrnn", "cwrnn") and not CONFIGS[name][3]
            for capability in capabilities if fused_config else [None]:
                spec = {"config": name, "steps": steps, "warmup": args.warmup, "repeat": args.repeat,
                        "threads": threads, "capability": capability}
                res = run_config(spec)
                res["floor"] = floor
                rows[f"{name}@{capability}" if capability else name] = res
                results.append(res)
        print(f"\nT = {steps}   FLOP floor {floor:.4f} s")
        print(f"  {'config':<31} {'median s':>9} {'min s':>8} {'max s':>8} {'x floor':>8} {'peak MB':>8}  description")
        for row, r in rows.items():
            print(f"  {row:<31} {r['median']:9.4f} {r['min']:8.4f} {r['max']:8.4f} "
                  f"{r['median'] / floor:8.2f} {r['peak_mb']:8.1f}  {CONFIGS[r['config']][0]}")
        for capability in capabilities:
            print(f"  ratios (medians), {capability or 'no fused kernels'}: " + "; ".join(ratios(rows, capability, floor)))
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"flop_rate": rate, "threads": threads, "capabilities": capabilities, "results": results}, f, indent=1)
    return 0


def ratios(rows: dict, capability: str | None, floor: float) -> list[str]:
    """The targets' ratios for one capability's fused rows against the shared baselines."""
    def row(name):
        fused_row = f"{name}@{capability}" if capability else name
        return rows.get(fused_row, rows.get(name))

    out = []
    for label, num, den in [("hrnn-dct / floor", "hrnn-dct", None),
                            ("hrnn-binary / floor", "hrnn-binary", None),
                            ("LSTM / hrnn-dct", "lstm", "hrnn-dct"),
                            ("GRU / hrnn-dct", "gru", "hrnn-dct"),
                            ("RNN / hrnn-dct", "rnn", "hrnn-dct"),
                            ("cwrnn dense / hard", "cwrnn-dense", "cwrnn"),
                            ("loop / fused hrnn-dct", "hrnn-dct-loop", "hrnn-dct")]:
        if row(num) and (den is None or row(den)):
            value = row(num)["median"] / (floor if den is None else row(den)["median"])
            out.append(f"{label} {value:.2f}")
    if row("lstm") and row("hrnn-dct"):
        out.append(f"peak MB hrnn-dct / LSTM {row('hrnn-dct')['peak_mb'] / max(row('lstm')['peak_mb'], 1e-9):.2f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
