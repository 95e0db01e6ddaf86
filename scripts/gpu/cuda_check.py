"""End-to-end check of `trainer.device=cuda` on a machine with a GPU (none of the tests needs one).

    python scripts/gpu/cuda_check.py --out DIR [--steps 100]

Runs hrnn-train (as `python -m hrnn.cli.train`, each in its own directory under DIR/runs) and checks:
  1. every model trains a few steps on CUDA from the CLI and says so in metrics.json;
  2. stop at step k + resume on CUDA reproduces the uninterrupted run (metrics and history);
  3. a CUDA checkpoint resumes on the CPU (checkpoints are device-free);
  4. the clocked models' runs say they use the Triton kernels (one log line, hrnn/ops/dispatch.py);
  5. leaky_rnn and leaky_scan on CUDA (the Triton kernels; and the PyTorch loop with the kernels
     hidden) equal the float64 reference computed on the CPU, values and every gradient, all
     states and last only, soft and hard masked waves: float64 and ieee to 1e-10 / 1e-5; tf32,
     tf32x3 and bf16 to loose bounds that catch wiring, not precision (scripts/bench/bench_cuda.py
     --check measures that at T = 784);
  6. timings, for the record, taken first and printed as each is measured (so a time cap on the
     script cannot lose them): train_step_s of the default experiment on CUDA and on 2 CPU threads
     of the same machine, and one training step at B=100, T=784, H=128 for hrnn-dct,
     cwrnn and torch.nn.LSTM (cuDNN) on CUDA (scripts/bench/bench_cuda.py's timing).
Prints one line per check, writes DIR/cuda_check.json, exits 1 if a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda"  # --device cpu: a dry run of this script on a machine without a GPU
SMALL = ["trainer.progress=false", "trainer.log_every=10", "trainer.eval_batch_size=500",
         "task.n_val=500", "task.n_test=500"]


def cli(args: list[str], run_dir: Path, timeout: int = 600) -> dict:
    """hrnn-train ARGS in run_dir; returns metrics.json (raises with the output on failure)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not any(a.startswith("resume=") for a in args):
        args = [*args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "hrnn.cli.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"hrnn-train {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def check_models(runs: Path, steps: int, only: list[str] | None = None) -> dict:
    out = {}
    for name, args in {
        "hrnn-dct": ["basis=dct", "model.activation=clock"], "hrnn-binary": ["basis=binary"], "hrnn-l1": ["regularizer=l1"],
        "hrnn-period": ["basis=period"], "cwrnn": ["model=cwrnn"], "lstm": ["model=lstm"],
        "gru": ["model=gru"], "rnn": ["model=rnn"], "timescales": ["task=timescales", "basis=binary"],
        "copy": ["task=copy"],
        "clock_event": [], "event-hard": ["model.activation=event", "model.gate=hard"],
        "connectivity": ["model.connectivity=learned"],
    }.items():
        if only and name not in only:
            continue
        m = cli([f"trainer.device={DEVICE}", f"trainer.steps={steps}", f"trainer.eval_every={steps}", *SMALL, *args],
                runs / name)
        ok = m["device"].startswith(DEVICE) and m["status"] == "finished" and m["test_metric"] == m["test_metric"]
        out[name] = {"ok": ok, "device": m["device"], "test_metric": m["test_metric"], "train_step_s": m["train_step_s"]}
        if DEVICE == "cuda" and name in ("hrnn-dct", "cwrnn", "clock_event"):
            logs = "".join(p.read_text() for p in (runs / name).glob("*.log"))
            line = "CUDA tensors run the gated Triton kernels" if name == "clock_event" else "CUDA tensors run the Triton kernels"
            out[f"{name}_says_triton"] = {"ok": line in logs,
                                          "path_lines": [ln for ln in logs.splitlines() if "CUDA tensors run" in ln]}
    data = ROOT / "data"
    if (not only or "smnist" in only) and (data / "mnist.npz").exists() or (data / "train-images-idx3-ubyte").exists():
        m = cli([f"trainer.device={DEVICE}", "task=smnist", "trainer.steps=20", "trainer.eval_every=20",
                 "trainer.progress=false", f"data_dir={data}"], runs / "smnist")
        out["smnist"] = {"ok": m["device"].startswith(DEVICE) and m["status"] == "finished",
                         "test_metric": m["test_metric"], "train_step_s": m["train_step_s"]}
    return out


def check_resume(runs: Path, steps: int) -> dict:
    """Stop half-way and resume on the device; resume a copy of the half-way run on the CPU."""
    # Stop on an evaluation step: a run that ends elsewhere adds a final evaluation to its history.
    every = max(1, steps // 4)
    steps = 4 * every
    common = [f"trainer.device={DEVICE}", "task=copy", "task.seq_len=20", f"trainer.eval_every={every}", *SMALL]
    full = cli([*common, f"trainer.steps={steps}"], runs / "full")
    cli([*common, f"trainer.steps={2 * every}"], runs / "part")
    shutil.copytree(runs / "part", runs / "part_cpu")
    part = cli([f"resume={runs / 'part'}", f"trainer.steps={steps}"], runs / "part")
    keys = ("val_metric", "test_metric", "best_step", "steps", "val", "test", "history", "periods")
    def untimed(key, value):  # the history's wall_s differs between any two runs
        return [{k: v for k, v in e.items() if k != "wall_s"} for e in value] if key == "history" else value

    same = {k: untimed(k, part[k]) == untimed(k, full[k]) for k in keys}
    cpu = cli([f"resume={runs / 'part_cpu'}", f"trainer.steps={steps}", "trainer.device=cpu"], runs / "part_cpu")
    return {
        f"{DEVICE}_resume_equals_uninterrupted": {"ok": all(same.values()), "keys": same,
                                             "val": [full["val_metric"], part["val_metric"]]},
        f"{DEVICE}_checkpoint_resumes_on_cpu": {"ok": cpu["status"] == "finished" and cpu["device"] == "cpu",
                                                "val_cpu": cpu["val_metric"], f"val_{DEVICE}": full["val_metric"]},
    }


PRECISION_RUNS = [("float64", "float64", "ieee", 1e-10), ("ieee", "float32", "ieee", 1e-5),
                  ("tf32", "float32", "tf32", 3e-2), ("tf32x3", "float32", "tf32x3", 1e-4),
                  ("bf16x3", "float32", "bf16x3", 1e-3), ("bf16", "float32", "bf16", 1e-1)]  # (label, dtype, precision, tolerance)


def max_error(op, tensors, grad, dtype) -> float:
    """Largest norm-relative error of op's output and every input gradient on DEVICE in `dtype`,
    against op on the CPU in float64 with reference=True."""
    import torch

    cpu = [t.clone().requires_grad_() for t in tensors]
    ref = op(cpu, reference=True)
    ref_grads = torch.autograd.grad(ref, cpu, grad)
    dev = [t.to(DEVICE, dtype).requires_grad_() for t in tensors]
    got = op(dev, reference=False)
    grads = torch.autograd.grad(got, dev, grad.to(DEVICE, dtype))
    return max(((a.double().cpu() - r).norm() / r.norm()).item() for a, r in zip((got, *grads), (ref, *ref_grads)))


def numeric_inputs():
    """float64 CPU tensors for the numerics checks: 20 rows (two programs of 16), T = 50, H = 64,
    4 modules, 3 inputs; soft and hard waves, a slow-to-fast mask, gradients of all and last states."""
    import torch

    gen = torch.Generator().manual_seed(0)
    batch, steps, hidden, modules, inputs = 20, 50, 64, 4, 3
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=gen, dtype=torch.float64) * scale  # noqa: E731
    t = {"x": r(batch, steps, inputs), "w_x": r(hidden, inputs, scale=0.5), "b": r(hidden, scale=0.1),
         "w_h": r(hidden, hidden) / hidden ** 0.5,
         "soft": torch.rand(steps, modules, generator=gen, dtype=torch.float64),
         "hard": (torch.arange(steps)[:, None] % (2 ** torch.arange(modules))[None] == 0).double()}
    size = hidden // modules
    t["mask"] = torch.triu(torch.ones(modules, modules, dtype=torch.float64)).repeat_interleave(
        size, 0).repeat_interleave(size, 1)
    t.update(h0=r(batch, hidden, scale=0.3), g_all=r(batch, steps, hidden), g_last=r(batch, hidden), gen=gen)
    return t


def check_clock_numerics(t: dict) -> dict:
    """leaky_rnn / leaky_scan on DEVICE against the float64 CPU reference, in each precision and
    through the PyTorch loop (the kernels hidden)."""
    import torch

    from bench_cuda import precision, pytorch_loop
    from hrnn import ops
    from hrnn.ops import gpu

    def rnn(last_only):
        def op(args, reference):
            if reference:
                states = ops.leaky_rnn_reference(*args)
                return states[:, -1] if last_only else states
            return ops.leaky_rnn(*args, last_only=last_only)
        return op

    def scan(args, reference):  # leaky_scan: the projection outside the op, all states
        u = torch.nn.functional.linear(*args[:3])
        return (ops.leaky_scan_reference if reference else ops.leaky_scan)(u, *args[3:])

    reason = gpu.supports(*(t[k].to(DEVICE, torch.float32) for k in ("x", "w_h")))
    out = {f"triton_path_on_{DEVICE}": {"ok": DEVICE != "cuda" or reason is None, "reason": reason}}
    masked = t["w_h"] * t["mask"]
    cases = {"soft_all": (t["soft"], t["w_h"], rnn(False), t["g_all"]), "soft_last": (t["soft"], t["w_h"], rnn(True), t["g_last"]),
             "hard_masked_all": (t["hard"], masked, rnn(False), t["g_all"]),
             "hard_masked_last": (t["hard"], masked, rnn(True), t["g_last"]),
             "scan_soft_all": (t["soft"], t["w_h"], scan, t["g_all"])}
    for label, dtype, prec, tol in PRECISION_RUNS:
        with precision(prec):
            errs = {case: max_error(op, (t["x"], t["w_x"], t["b"], wh, waves, t["h0"]), grad, getattr(torch, dtype))
                    for case, (waves, wh, op, grad) in cases.items()}
        out[f"leaky_rnn_{DEVICE}_{label}"] = {"ok": max(errs.values()) < tol, "max_rel_err": max(errs.values()),
                                             "tol": tol, "errs": errs}
    with pytorch_loop():
        err = max_error(rnn(False), (t["x"], t["w_x"], t["b"], t["w_h"], t["soft"], t["h0"]), t["g_all"], torch.float32)
    out[f"leaky_rnn_{DEVICE}_pytorch_loop"] = {"ok": err < 1e-5, "max_rel_err": err, "tol": 1e-5}
    return out


def check_gated_numerics(t: dict) -> dict:
    """The event-gated op (the default model's) on DEVICE against the float64 CPU reference:
    states and activations, every gradient, in each precision."""
    import torch

    from bench_cuda import precision
    from hrnn import ops

    batch, steps, inputs = t["x"].shape
    hidden, modules = t["w_h"].shape[0], t["soft"].shape[1]
    r = lambda *shape, scale: torch.randn(*shape, generator=t["gen"], dtype=torch.float64) * scale  # noqa: E731
    gate = (r(modules, inputs, scale=0.5), r(modules, scale=0.5), r(modules, hidden, scale=2) / hidden ** 0.5)
    thresholds = torch.rand(batch, steps, modules, generator=t["gen"], dtype=torch.float64)
    g_both = torch.randn(batch * steps * (hidden + modules), generator=t["gen"], dtype=torch.float64)

    def gated(mode, last_only=False):
        def op(args, reference):
            thr = thresholds.to(args[0].device, args[0].dtype) if mode == "hard" else 0.5
            fn = ops.gated_leaky_rnn_reference if reference else ops.gated_leaky_rnn
            states, acts = fn(*args, mode, thr, last_only=last_only)
            return torch.cat([states.flatten(), acts.flatten()])
        return op

    tensors = (t["x"], t["w_x"], t["b"], t["w_h"], t["h0"], t["soft"], *gate)
    g_last_both = torch.randn(batch * hidden + batch * steps * modules, generator=t["gen"], dtype=torch.float64)
    out = {}
    for label, dtype, prec, tol in PRECISION_RUNS:
        dtype = getattr(torch, dtype)
        with precision(prec):
            errs = {"soft_all": max_error(gated("soft"), tensors, g_both, dtype),
                    "soft_last": max_error(gated("soft", True), tensors, g_last_both, dtype)}
            if dtype == torch.float64:  # hard gates in float64 only: no threshold ties between precisions
                errs["hard_all"] = max_error(gated("hard"), tensors, g_both, dtype)
        out[f"gated_rnn_{DEVICE}_{label}"] = {"ok": max(errs.values()) < tol, "max_rel_err": max(errs.values()),
                                             "tol": tol, "errs": errs}
    return out


def check_numerics() -> dict:
    inputs = numeric_inputs()
    return {**check_clock_numerics(inputs), **check_gated_numerics(inputs)}


def run_checks(runs: Path, args) -> dict:
    """The models, resume and numerics checks, one line each; a check that raises is one failure."""
    checks: dict = {}
    only = [m for m in args.models.split(",") if m]
    for name, fn in (("models", lambda: check_models(runs, args.steps, only)),
                     ("resume", lambda: check_resume(runs, args.steps)), ("numerics", check_numerics)):
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - report and go on to the next check
            result = {name: {"ok": False, "error": str(err)[-3000:]}}
        for key, value in result.items():
            checks[key] = value
            print(f"{'ok  ' if value['ok'] else 'FAIL'} {key}: {json.dumps({k: v for k, v in value.items() if k != 'ok'})}",
                  flush=True)
        print(f"     ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    return checks


def timings(runs: Path) -> dict:
    """For the record: the default experiment's train_step_s on DEVICE and on 2 CPU threads, and one
    training step at B=100, T=784 for hrnn-dct, cwrnn and LSTM on DEVICE (bench_cuda's timing)."""
    out = {}
    try:
        import bench_cuda
        from hrnn import ops

        bench_cuda.DEVICE = DEVICE
        default = {}
        # The CPU side is the C++ kernels on 2 threads; where they are not built (a bare GPU
        # machine), compare with the 2-core figure in docs/gpu.md instead of the PyTorch loop.
        targets = [(DEVICE, DEVICE, "null")] + ([("cpu_2_threads", "cpu", "2")] if ops.fused_available() else [])
        for name, device, threads in targets:
            m = cli([f"trainer.device={device}", f"trainer.num_threads={threads}", "trainer.steps=300",
                     "trainer.eval_every=300", *SMALL], runs / f"default_{name}")
            default[name] = m["train_step_s"]
            print(f"timing: the default experiment's train_step_s on {name}: {m['train_step_s']:.5f}", flush=True)
        if not ops.fused_available():
            default["cpu_2_threads"] = f"not timed: {ops.fused_unavailable_reason()}"
        out["default_experiment_train_step_s"] = default
        step = out[f"step_T784_{DEVICE}_s"] = {}
        for name in ("hrnn-dct", "cwrnn", "lstm"):  # each printed as it is measured: a cut run keeps it
            step[name] = bench_cuda.time_config(name, 100, 784)["median"]
            print(f"timing: a {name} training step at B=100, T=784 on {DEVICE}: {step[name]:.5f} s", flush=True)
    except Exception as err:  # noqa: BLE001
        out["error"] = str(err)[-2000:]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=Path, default=None, help="where the runs go (default: OUT/runs)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per CLI run")
    parser.add_argument("--models", default="", help="comma-separated model checks to run (default: all)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; this script checks trainer.device=cuda", file=sys.stderr)
        return 2
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts" / "bench")]  # hrnn from this checkout; the benchmarks
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.runs or args.out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    report = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (dry run on the CPU)",
              "torch": torch.__version__}
    print(f"{report['gpu']}, torch {report['torch']}", flush=True)
    report["timings"] = timings(runs)  # first: the figures docs/gpu.md quotes, in the log before any cap
    print(f"timings: {json.dumps(report['timings'])}", flush=True)
    (args.out / "cuda_check.json").write_text(json.dumps(report, indent=1))  # kept if the checks are cut
    checks = report["checks"] = run_checks(runs, args)
    (args.out / "cuda_check.json").write_text(json.dumps(report, indent=1))
    failed = [k for k, v in checks.items() if not v["ok"]]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
