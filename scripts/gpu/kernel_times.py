"""The recurrence alone on CUDA, forward and forward + backward, for each kernel variant: the
per-change measurements behind hrnn/ops/gpu.py's launch defaults (TUNING) and docs/gpu.md.

    python scripts/gpu/kernel_times.py                 # B = 100 and 1000, T = 784, every variant
    python scripts/gpu/kernel_times.py --profile --batch 100 --warmup 1   # for ncu: each kernel 2-4 times

A variant is a precision and the TUNING settings it changes: `gluon` (the Gluon kernels of
hrnn/ops/gpu_gluon.py, or the Triton ones), `chains` (bf16x3's three products in one accumulation
chain, 1, or three independent ones summed, 3) and `unit_gates` (the gated kernels' layout: every
unit computes its module's gate on the tensor cores, or the module layout with the gate's small
products in fp32 FMAs). Each time is the median of --repeat calls between CUDA events,
after warm-up calls (Triton compiles each variant on its first call).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from hrnn import ops
from hrnn.ops import gpu

HIDDEN, MODULES, INPUTS = 128, 8, 1
# (label, precision, TUNING changes); the first of each family is the launch default.
CLOCK_VARIANTS = [
    ("bf16x3, Gluon, 3 chains", "bf16x3", {"gluon": None, "chains": 3}),
    ("bf16x3, Gluon, 1 chain", "bf16x3", {"gluon": None, "chains": 1}),
    ("bf16x3, Triton, 3 chains", "bf16x3", {"gluon": False, "chains": 3}),
    ("bf16x3, Triton, 1 chain", "bf16x3", {"gluon": False, "chains": 1}),
    ("tf32x3", "tf32x3", {}),
    ("bf16", "bf16", {}),
]
GATED_VARIANTS = [
    ("bf16x3, Gluon, unit gates", "bf16x3", {"gluon": None, "unit_gates": True, "chains": 3}),
    ("bf16x3, Triton, unit gates, 3 chains", "bf16x3", {"gluon": False, "unit_gates": True, "chains": 3}),
    ("bf16x3, Triton, unit gates, 1 chain", "bf16x3", {"gluon": False, "unit_gates": True, "chains": 1}),
    ("bf16x3, module gates, 3 chains", "bf16x3", {"unit_gates": False, "chains": 3}),
    ("tf32x3, module gates", "tf32x3", {"unit_gates": False}),
    ("bf16, unit gates", "bf16", {"unit_gates": True}),
]


def inputs(batch: int, steps: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *shape: (torch.randn(*shape, device="cuda", generator=gen) * 0.1).requires_grad_()  # noqa: E731
    return dict(x=torch.randn(batch, steps, INPUTS, device="cuda", generator=gen), w_x=r(HIDDEN, INPUTS), b=r(HIDDEN),
                w_h=r(HIDDEN, HIDDEN), h0=torch.zeros(batch, HIDDEN, device="cuda"),
                waves=torch.rand(steps, MODULES, device="cuda", generator=gen).requires_grad_(),
                gate_x=r(MODULES, INPUTS), gate_b=r(MODULES), gate_h=r(MODULES, HIDDEN))


def clock_call(t: dict):
    return lambda: ops.leaky_rnn(t["x"], t["w_x"], t["b"], t["w_h"], t["waves"], t["h0"], last_only=True)


def gated_call(t: dict):
    return lambda: ops.gated_leaky_rnn(t["x"], t["w_x"], t["b"], t["w_h"], t["h0"], t["waves"], t["gate_x"], t["gate_b"],
                                       t["gate_h"], "soft", 0.5, last_only=True)[0]


def median_ms(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_variant(call, precision: str, tuning: dict, warmup: int, repeat: int) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of one variant."""
    before_precision, before_tuning = ops.matmul_precision(), dict(gpu.TUNING)
    ops.set_matmul_precision(precision)
    gpu.TUNING.update(tuning)
    try:
        forward = median_ms(call, warmup, repeat)
        both = median_ms(lambda: call().sum().backward(), warmup, repeat)
    finally:
        ops.set_matmul_precision(before_precision)
        gpu.TUNING.clear()
        gpu.TUNING.update(before_tuning)
    return forward, both


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps", type=int, default=784)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="the default variants only, one call each after warm-up")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device here; this script times the Triton kernels", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(0)} | torch {torch.__version__} | hidden {HIDDEN}, {MODULES} modules, T={args.steps}; "
          f"ms, median of {args.repeat} calls; backward = (forward + backward) - forward", flush=True)
    families = [("clock", clock_call, CLOCK_VARIANTS), ("gated", gated_call, GATED_VARIANTS)]
    for batch in args.batch:
        t = inputs(batch, args.steps)
        for family, make_call, variants in families:
            for label, precision, tuning in (variants[:1] if args.profile else variants):
                try:
                    fwd, both = time_variant(make_call(t), precision, tuning, args.warmup, 1 if args.profile else args.repeat)
                except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: record it, go on
                    print(f"  B={batch:<5} {family:<6} {label:<38} failed: {str(err).splitlines()[0][:160]}", flush=True)
                    continue
                print(f"  B={batch:<5} {family:<6} {label:<38} forward {fwd:7.3f}  backward {both - fwd:7.3f}  "
                      f"both {both:7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
