"""End-to-end check of `trainer.device=cuda` on a machine with a GPU (none of the tests needs one).

    python scripts/cuda_check.py --out DIR [--steps 100]

Runs hrnn-train (as `python -m hrnn.run`, each in its own directory under DIR/runs) and checks:
  1. every model trains a few steps on CUDA from the CLI and says so in metrics.json;
  2. stop at step k + resume on CUDA reproduces the uninterrupted run (metrics and history);
  3. a CUDA checkpoint resumes on the CPU (checkpoints are device-free);
  4. leaky_rnn on CUDA (the PyTorch loop: the kernels are CPU-only) equals the float64
     reference computed on the CPU, values and every gradient;
  5. timings, for the record: train_step_s of the default experiment on CUDA and CPU, and one
     training step at B=100, T=784, H=128 for hrnn-dct, cwrnn and torch.nn.LSTM (cuDNN) on CUDA.
Prints one line per check, writes DIR/cuda_check.json, exits 1 if a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"  # --device cpu: a dry run of this script on a machine without a GPU
SMALL = ["trainer.progress=false", "trainer.log_every=10", "trainer.eval_batch_size=500",
         "task.n_val=500", "task.n_test=500"]


def cli(args: list[str], run_dir: Path, timeout: int = 600) -> dict:
    """hrnn-train ARGS in run_dir; returns metrics.json (raises with the output on failure)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not any(a.startswith("resume=") for a in args):
        args = [*args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "hrnn.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"hrnn-train {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def check_models(runs: Path, steps: int) -> dict:
    out = {}
    for name, args in {
        "hrnn-dct": ["basis=dct"], "hrnn-binary": ["basis=binary"], "hrnn-l1": ["regularizer=l1"],
        "hrnn-period": ["basis=period"], "cwrnn": ["model=cwrnn"], "lstm": ["model=lstm"],
        "gru": ["model=gru"], "rnn": ["model=rnn"], "timescales": ["task=timescales", "basis=binary"],
        "copy": ["task=copy"],
    }.items():
        m = cli([f"trainer.device={DEVICE}", f"trainer.steps={steps}", f"trainer.eval_every={steps}", *SMALL, *args],
                runs / name)
        ok = m["device"].startswith(DEVICE) and m["status"] == "finished" and m["test_metric"] == m["test_metric"]
        out[name] = {"ok": ok, "device": m["device"], "test_metric": m["test_metric"], "train_step_s": m["train_step_s"]}
    data = ROOT / "data"
    if (data / "mnist.pkl.gz").exists() or (data / "train-images-idx3-ubyte").exists():
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
    same = {k: part[k] == full[k] for k in keys}
    cpu = cli([f"resume={runs / 'part_cpu'}", f"trainer.steps={steps}", "trainer.device=cpu"], runs / "part_cpu")
    return {
        f"{DEVICE}_resume_equals_uninterrupted": {"ok": all(same.values()), "keys": same,
                                             "val": [full["val_metric"], part["val_metric"]]},
        f"{DEVICE}_checkpoint_resumes_on_cpu": {"ok": cpu["status"] == "finished" and cpu["device"] == "cpu",
                                                "val_cpu": cpu["val_metric"], f"val_{DEVICE}": full["val_metric"]},
    }


def check_numerics() -> dict:
    import torch

    from hrnn.core import leaky_rnn, leaky_rnn_reference

    gen = torch.Generator().manual_seed(0)
    batch, steps, hidden, modules, inputs = 8, 50, 64, 4, 3
    x = torch.randn(batch, steps, inputs, generator=gen, dtype=torch.float64)
    w_x = torch.randn(hidden, inputs, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.1
    w_h = torch.randn(hidden, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5
    waves = torch.rand(steps, modules, generator=gen, dtype=torch.float64)
    h0 = torch.randn(batch, hidden, generator=gen, dtype=torch.float64) * 0.3
    g = torch.randn(batch, steps, hidden, generator=gen, dtype=torch.float64)
    out = {}
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        cpu = [t.clone().requires_grad_() for t in (x, w_x, b, w_h, waves, h0)]
        ref = leaky_rnn_reference(*cpu)
        ref_grads = torch.autograd.grad(ref, cpu, g)
        dev = [t.to(DEVICE, dtype).requires_grad_() for t in (x, w_x, b, w_h, waves, h0)]
        got = leaky_rnn(*dev)
        grads = torch.autograd.grad(got, dev, g.to(DEVICE, dtype))
        errs = [((a.double().cpu() - r).norm() / r.norm()).item() for a, r in zip((got, *grads), (ref, *ref_grads))]
        out[f"leaky_rnn_{DEVICE}_{str(dtype)[6:]}"] = {"ok": max(errs) < tol, "max_rel_err": max(errs), "tol": tol}
    return out


def time_step(model_name: str, basis: str | None, device: str, steps: int = 784, repeat: int = 7) -> float:
    import torch

    from bench import BATCH, CLASSES, INPUTS, build  # scripts/ is on sys.path (main)

    model = build(model_name, basis, steps).to(device)
    x = torch.randn(BATCH, steps, INPUTS, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(repeat + 2):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=Path, default=None, help="where the runs go (default: OUT/runs)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per CLI run")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; this script checks trainer.device=cuda", file=sys.stderr)
        return 2
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # hrnn from this checkout; bench's model builder
    runs = args.runs or args.out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    report = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (dry run on the CPU)",
              "torch": torch.__version__}
    print(f"{report['gpu']}, torch {report['torch']}", flush=True)
    checks: dict = {}
    for name, fn in (("models", lambda: check_models(runs, args.steps)), ("resume", lambda: check_resume(runs, args.steps)),
                     ("numerics", check_numerics)):
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
    timings = {}
    try:
        default = {}
        for device in sorted({DEVICE, "cpu"}):
            m = cli([f"trainer.device={device}", "trainer.steps=300", "trainer.eval_every=300", *SMALL],
                    runs / f"default_{device}")
            default[device] = m["train_step_s"]
        timings["default_experiment_train_step_s"] = default
        timings[f"step_T784_{DEVICE}_s"] = {name: time_step(model, basis, DEVICE) for name, model, basis in
                                       (("hrnn-dct", "hrnn", "dct"), ("cwrnn", "cwrnn", None), ("lstm", "lstm", None))}
    except Exception as err:  # noqa: BLE001
        timings["error"] = str(err)[-2000:]
    print(f"timings: {json.dumps(timings)}")
    report.update(checks=checks, timings=timings)
    (args.out / "cuda_check.json").write_text(json.dumps(report, indent=1))
    failed = [k for k, v in checks.items() if not v["ok"]]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
