"""CUDA training-step time and peak GPU memory: hrnn's Triton path against cuDNN.

    python scripts/bench/bench_cuda.py          # T = 200, 784, 2000 x batch 100, 1000, every config
    python scripts/bench/bench_cuda.py --check  # first: each precision's gradients against float64
    python scripts/bench/bench_cuda.py --sweep  # first: the kernels' batch tile and warps, measured
    python scripts/bench/bench_cuda.py --quick  # smoke test: T = 30, batch 100; numbers meaningless

The models are common.py's (the configs bench.py times: the real model classes, hidden 128,
8 modules, 1 input, a 10-way head on the last state, cross-entropy, Adam), run in this one
process on the GPU. A training step is zero_grad + forward + backward + Adam step, timed between
two torch.cuda.synchronize(); the first steps are warm-up (Triton compiles its kernels for each
T and precision then). Peak memory is torch.cuda.max_memory_allocated over the steps minus what
was allocated before them (model, data and optimizer state excluded).

hrnn rows run in the default precision, trainer.matmul_precision from conf/trainer/default.yaml,
and `hrnn-dct[p]` and `hrnn-clock_event[p]` rows in each other precision p. hrnn-clock_event is
hrnn-train's default model (the DCT clock times soft event gates: the gated kernels);
hrnn-dct and hrnn-binary are the clock alone (model.activation=clock). `hrnn-dct-loop` is the CUDA fallback (the
kernels hidden, as if Triton were missing). cwrnn-dense equals cwrnn on CUDA: the kernels are
dense (skipping inactive modules is CPU-only). torch.nn.LSTM/GRU/RNN run cuDNN with torch's
defaults, printed in the header (cuDNN may use TF32 for fp32 RNNs).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file
import torch  # noqa: E402
from common import CONFIGS, HIDDEN, INPUTS, MODULES, ROOT, VARIANTS, model_and_batch, summary  # noqa: E402
from common import timed as timed_on  # noqa: E402
from common import training_step  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from hrnn import ops  # noqa: E402
from hrnn.ops import gpu  # noqa: E402

NAMES = ["hrnn-dct", "hrnn-binary", "hrnn-clock_event", "hrnn-event", "cwrnn", "cwrnn-dense", "lstm", "gru", "rnn",
         "hrnn-dct-loop"]
DEFAULT_PRECISION = OmegaConf.load(Path(ROOT) / "conf" / "trainer" / "default.yaml").matmul_precision
DEVICE = "cuda"  # --device cpu: a dry run of the script's logic (C++ kernels, not Triton)
# The speed-up bars over cuDNN's LSTM at T = 784, by config and batch: the clock alone (hrnn-dct)
# and the default model (hrnn-clock_event).
BARS = {"hrnn-dct": {100: 2.0, 1000: 4.0}, "hrnn-clock_event": {100: 1.5, 1000: 5.0}}
GATE_LAYOUTS = {"unit": True, "module": False}  # hrnn.ops.gpu.TUNING["unit_gates"] of --gate-layouts rows


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls of fn after `warmup` untimed ones, each between two syncs."""
    return timed_on(fn, warmup, repeat, sync=sync)


def pytorch_loop():
    """The CUDA fallback on purpose: the kernels hidden, as when Triton is missing."""
    return ops.kernels_hidden("cuda", "hidden by bench_cuda.py for the loop baseline")


@contextlib.contextmanager
def precision(name: str):
    """The recurrent products in precision `name` within the block."""
    before = ops.matmul_precision()
    ops.set_matmul_precision(name)
    try:
        yield
    finally:
        ops.set_matmul_precision(before)


@contextlib.contextmanager
def gate_layout(name: str | None):
    """The gated kernels in gate layout `name` (GATE_LAYOUTS) within the block; None: the launch's choice."""
    gpu.TUNING["unit_gates"] = None if name is None else GATE_LAYOUTS[name]
    try:
        yield
    finally:
        gpu.TUNING["unit_gates"] = None


def time_config(name: str, batch: int, steps: int, warmup: int = 2, repeat: int = 7,
                matmul_precision: str = DEFAULT_PRECISION, layout: str | None = None) -> dict:
    """Median step time (s) and peak step memory (MB) of one bench.py config on DEVICE."""
    model, x, y = model_and_batch(name, batch, steps, DEVICE)
    step = training_step(model, x, y)
    loop = pytorch_loop() if name.endswith("-loop") else contextlib.nullcontext()
    with loop, precision(matmul_precision), gate_layout(layout):
        sync()
        base = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = timed(step, warmup, repeat)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if DEVICE == "cuda" else float("nan")
    del model, step, x, y
    return {"config": name, "batch": batch, "steps": steps, "precision": matmul_precision, **summary(times),
            "peak_mb": peak}


def time_graphed(name: str, batch: int, steps: int, repeat: int = 7) -> dict:
    """The same training step captured whole in one CUDA graph (PyTorch's "whole network capture":
    Adam(capturable=True), grads allocated inside the capture) and replayed: the step without the
    per-op launch overhead. Not what hrnn-train runs today; it measures what capture would give."""
    model, x, y = model_and_batch(name, batch, steps, DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)

    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles the kernels, settles the allocator
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    times = timed(graph.replay, 2, repeat)
    return {"config": name, "batch": batch, "steps": steps, "median": summary(times)["median"], "graphed": True}


def time_ops(batch: int, steps: int, repeat: int = 7) -> dict:
    """The recurrence alone, forward + backward of a last-state sum (no head, loss or Adam):
    hrnn's clock kernels, its gated kernels and cuDNN's LSTM, so kernel time and the framework's
    per-step overhead can be told apart."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    r = lambda *shape: torch.randn(*shape, device=DEVICE, generator=gen).mul_(0.1).requires_grad_()  # noqa: E731
    x = torch.randn(batch, steps, INPUTS, device=DEVICE, generator=gen)
    w_x, b, w_h, h0 = r(HIDDEN, INPUTS), r(HIDDEN), r(HIDDEN, HIDDEN), torch.zeros(batch, HIDDEN, device=DEVICE)
    waves = torch.rand(steps, MODULES, device=DEVICE, generator=gen).requires_grad_()
    gate_x, gate_b, gate_h = r(MODULES, INPUTS), r(MODULES), r(MODULES, HIDDEN)
    lstm = torch.nn.LSTM(INPUTS, HIDDEN, batch_first=True).to(DEVICE)
    calls = {
        "hrnn clock kernels": lambda: ops.leaky_rnn(x, w_x, b, w_h, waves, h0, last_only=True).sum().backward(),
        "hrnn gated kernels": lambda: ops.gated_leaky_rnn(x, w_x, b, w_h, h0, waves, gate_x, gate_b, gate_h, "soft",
                                                          0.5, last_only=True)[0].sum().backward(),
        "cuDNN LSTM": lambda: lstm(x)[0][:, -1].sum().backward(),
    }
    return {name: summary(timed(call, 2, repeat))["median"] for name, call in calls.items()}


def check_precisions(name: str = "hrnn-dct", batch: int = 100, steps: int = 784) -> dict:
    """A config's loss gradients (every parameter, clock and gates included) and logits in each
    precision against the same model in float64 through the PyTorch loop: max relative error (norm)."""
    model, x, y = model_and_batch(name, batch, steps, DEVICE)
    ref_model = copy.deepcopy(model).double()
    with pytorch_loop():
        ref_out = ref_model(x.double())
        torch.nn.functional.cross_entropy(ref_out, y).backward()
    refs = {n: p.grad for n, p in ref_model.named_parameters()}
    out = {}
    for name in ops.MATMUL_PRECISIONS:
        model.zero_grad(set_to_none=True)
        with precision(name):
            logits = model(x)
            torch.nn.functional.cross_entropy(logits, y).backward()
        errs = {n: ((p.grad.double() - refs[n]).norm() / refs[n].norm()).item() for n, p in model.named_parameters()}
        worst = max(errs, key=errs.get)
        out[name] = {"grad_max_rel_err": errs[worst], "worst_param": worst,
                     "logits_rel_err": ((logits.double() - ref_out).norm() / ref_out.norm()).item(), "grads": errs}
    return out


def sweep(configs: list[str], batches: list[int], steps: int, warmup: int, repeat: int) -> list[dict]:
    """Each config's step time for each batch tile and warp count (hrnn.ops.gpu.TUNING)."""
    rows = []
    for config, batch in [(c, b) for c in configs for b in batches]:
        for block_b in (16, 32):  # 64 rows spill registers at every warp count (docs/gpu.md)
            for warps in (4, 8):  # 16 warps was slower at both batches (docs/gpu.md)
                gpu.TUNING.update(block_b=block_b, num_warps=warps)
                try:
                    r = time_config(config, batch, steps, warmup, repeat)
                except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                    r = {"batch": batch, "median": float("nan"), "error": str(err).splitlines()[0][:200]}
                finally:
                    gpu.TUNING.update(block_b=None, num_warps=None)
                r.update(config=config, block_b=block_b, num_warps=warps)
                rows.append(r)
                print(f"  sweep {config:<16} B={batch} T={steps} block_b={block_b:<3} warps={warps:<3} "
                      f"{r['median'] * 1e3:9.3f} ms {r.get('error', '')}", flush=True)
    return rows


def header() -> dict:
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version() if DEVICE == "cuda" else None,
            "cublas_fp32_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_fp32_tf32": torch.backends.cudnn.allow_tf32,
            "default_matmul_precision": DEFAULT_PRECISION,
            "kernels": gpu.supports(torch.zeros(1, 1, HIDDEN, device=DEVICE), torch.zeros(HIDDEN, HIDDEN, device=DEVICE))
            or ("Gluon" if gpu._gluon(HIDDEN, DEFAULT_PRECISION, torch.float32) else "Triton")}
    print(" | ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    print(f"hidden {HIDDEN}, {MODULES} modules, {INPUTS} input, float32; step = zero_grad + forward + "
          "backward + Adam; median of the timed steps", flush=True)
    return info


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 784, 2000], help="sequence lengths T")
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000], help="batch sizes")
    parser.add_argument("--only", default=",".join(NAMES),
                        help="comma-separated configs: " + ", ".join(NAMES) + "; the model's options: " + ", ".join(VARIANTS))
    parser.add_argument("--precisions", default=",".join(p for p in ops.MATMUL_PRECISIONS if p != DEFAULT_PRECISION),
                        help="extra hrnn-dct rows in these precisions ('' for none)")
    parser.add_argument("--gate-layouts", action="store_true",
                        help="hrnn-clock_event rows in each precision with each gate layout forced: " + ", ".join(GATE_LAYOUTS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--check", action="store_true", help="first: gradients in each precision vs float64")
    parser.add_argument("--sweep", action="store_true", help="first: batch tile x warps at T=784")
    parser.add_argument("--ops", action="store_true", help="first: the recurrence alone vs cuDNN's LSTM at T=784")
    parser.add_argument("--graph", action="store_true", help="first: steps captured in one CUDA graph at T=784")
    parser.add_argument("--sweep-configs", default="hrnn-dct,hrnn-clock_event", help="the configs --sweep times")
    parser.add_argument("--no-bench", action="store_true", help="only --check / --sweep")
    parser.add_argument("--quick", action="store_true", help="T=30, batch 100, 1 warm-up, 2 timed steps")
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    return parser


def run_check(steps: int) -> dict:
    """--check: each precision's gradients against float64, for the clock model and the default one."""
    report = {}
    for config in ("hrnn-dct", "hrnn-clock_event"):
        report[config] = check_precisions(config, 100, steps)
        print(f"\ngradients vs float64 ({config}, B=100, T={steps}; bars: default ({DEFAULT_PRECISION}) < 1e-2, "
              "ieee < 1e-5):")
        for name, r in report[config].items():
            print(f"  {name:<7} grad max rel err {r['grad_max_rel_err']:.2e} ({r['worst_param']})  "
                  f"logits {r['logits_rel_err']:.2e}", flush=True)
    return report


def run_graph_and_ops(args, steps: int) -> tuple[list, list]:
    """--ops and --graph, for each batch: the recurrence alone, and steps captured in one CUDA graph."""
    graphs, op_times = [], []
    for batch in args.batch:
        if args.ops:
            with precision(DEFAULT_PRECISION):
                times = time_ops(batch, steps)
            op_times.append({"batch": batch, **times})
            print(f"\nthe recurrence alone, forward + backward, B={batch}, T={steps} ({DEFAULT_PRECISION}): " +
                  "; ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()), flush=True)
        for name in (("hrnn-dct", "hrnn-clock_event", "lstm") if args.graph else ()):
            try:
                with precision(DEFAULT_PRECISION):
                    r = time_graphed(name, batch, steps)
                print(f"  one CUDA graph per step: {name:<18} B={batch} {r['median'] * 1e3:.3f} ms", flush=True)
            except Exception as err:  # noqa: BLE001 - capture may fail for a model: record it, go on
                r = {"config": name, "batch": batch, "error": str(err).splitlines()[0][:200]}
                print(f"  one CUDA graph per step: {name:<18} B={batch} failed: {r['error']}", flush=True)
            graphs.append(r)
    return graphs, op_times


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; this script times the CUDA path", file=sys.stderr)
        return 2
    names = [n for n in args.only.split(",") if n]
    extra = [p for p in args.precisions.split(",") if p]
    bad = [n for n in names if n not in NAMES and n not in VARIANTS] + [p for p in extra if p not in ops.MATMUL_PRECISIONS]
    if bad:
        parser.error(f"unknown config or precision {bad[0]!r}; configs: {', '.join([*NAMES, *VARIANTS])}; "
                     f"precisions: {', '.join(ops.MATMUL_PRECISIONS)}")
    if args.quick:
        args.steps, args.batch, args.warmup, args.repeat = [30], [100], 1, 2
    probe_steps = 30 if args.quick else 784
    report = {"header": header()}

    def save():  # after each section and each bench row: a run cut by its time cap keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))

    if args.check:
        report["check"] = run_check(probe_steps)
        save()
    if args.graph or args.ops:
        report["graph"], report["ops"] = run_graph_and_ops(args, probe_steps)
        save()
    if args.sweep:
        print("\nkernel tiles (hrnn-dct training step):")
        report["sweep"] = sweep(args.sweep_configs.split(","), args.batch, probe_steps, args.warmup, args.repeat)
        save()
    if not args.no_bench:
        report["bench"] = []
        bench(names, extra, args, report["bench"], save)
    save()
    return 0


def print_rows(steps: int, batch: int, rows: dict) -> None:
    """One (T, batch)'s table, the speed-ups over cuDNN and, at T = 784, the bar line."""
    print(f"\nT = {steps}, batch {batch}")
    print(f"  {'config':<36} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'peak MB':>9}  description")
    for label, r in rows.items():
        print(f"  {label:<36} {r['median'] * 1e3:10.3f} {r['min'] * 1e3:9.3f} {r['max'] * 1e3:9.3f} "
              f"{r['peak_mb']:9.1f}  {CONFIGS[r['config']][0]}")
    ratios = [f"{a} / {b} {rows[a]['median'] / rows[b]['median']:.2f}"
              for a, b in [("lstm", "hrnn-dct"), ("gru", "hrnn-dct"), ("rnn", "hrnn-dct"),
                           ("lstm", "hrnn-clock_event"), ("lstm", "hrnn-event"),
                           ("lstm", "hrnn-binary"), ("lstm", "cwrnn"), ("hrnn-dct-loop", "hrnn-dct")]
              if a in rows and b in rows]
    print("  speed-ups (medians): " + "; ".join(ratios), flush=True)
    for config, bars in BARS.items():
        if "lstm" in rows and config in rows and steps == 784 and batch in bars:
            got = rows["lstm"]["median"] / rows[config]["median"]
            print(f"  bar: {config} {got:.2f}x faster than cuDNN LSTM at B={batch} "
                  f"(needs {bars[batch]:g}x): {'MET' if got >= bars[batch] else 'NOT MET'}")


def bench(names: list[str], extra: list[str], args, results: list, save=None) -> list[dict]:
    """Every config (and the extra precisions' rows) at each T and batch, appended to results as each
    is measured (and save() called: a cut run keeps what it measured)."""
    for steps in args.steps:
        for batch in args.batch:
            rows = {}
            runs = [(n, DEFAULT_PRECISION, None) for n in names]
            gated = ("hrnn-clock_event",) if not args.gate_layouts else ()  # else: in the layout rows below
            runs += [(f"{n}[{p}]", p, None) for n in ("hrnn-dct", *gated) if n in names for p in extra]
            if args.gate_layouts and "hrnn-clock_event" in names:
                runs += [(f"hrnn-clock_event[{p},{g} gates]", p, g) for p in [DEFAULT_PRECISION, *extra] for g in GATE_LAYOUTS]
            for label, p, layout in runs:
                try:
                    r = time_config(label.split("[")[0], batch, steps, args.warmup, args.repeat, p, layout)
                except Exception as err:  # noqa: BLE001 - e.g. out of registers or memory: record it, go on
                    print(f"  {label}: failed: {str(err).splitlines()[0][:200]}", flush=True)
                    continue
                r.update(label=label, gate_layout=layout)
                rows[label] = r
                results.append(r)
                if save:
                    save()
            print_rows(steps, batch, rows)
    return results


if __name__ == "__main__":
    sys.exit(main())
