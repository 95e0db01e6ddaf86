"""Cost of trained runs at the activity they learned: a training step and an evaluation forward of each run's
best checkpoint, on the same training batches, in one process.

    python scripts/bench/bench_checkpoints.py RUN_DIR [RUN_DIR ...] [--capabilities avx512,avx2,default]

A gate's cost follows how often it opens, which a benchmark with forced fractions (bench_gates.py) sets by
hand; this one reads it from trained models as hrnn-train left them (their own sizes, batch and gates). The
first run directory gives the batches: `--batches` training batches of its batch size, the same for every
run (give runs of one task). A training step is forward, the task's loss plus the model's penalty, and
backward (no optimizer step); the evaluation is the forward under torch.no_grad in eval mode. Each row:
the median of the steps after the first two, by process CPU time on one thread (so a shared machine's
neighbours are left out), each over the first run's; 'open' is the share of (sample, step, module) updates
open in training, 'computed' the share whose candidate the fused core computed (open, or within a
truncated gate's support). A clock frozen by `optim.clock_lr=0` is frozen here as in training. Each CPU
capability this machine runs gets its own table, over its own first row (`--capabilities` to choose).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

from hrnn import ops  # noqa: E402
from hrnn.cli.eval import load_run  # noqa: E402
from hrnn.cli.wrapper import user_errors  # noqa: E402
from hrnn.ops import last_candidate_blocks  # noqa: E402
from hrnn.train.optim import build_optimizer  # noqa: E402


def load(run_dir: Path):
    """(config, task, model) of a run's best checkpoint, its clock frozen if training froze it."""
    cfg, task, model, _ = load_run(run_dir, "best", {})
    build_optimizer(cfg.optim, model)  # freezes a clock trained with optim.clock_lr=0, as training did
    model.set_progress(1.0)
    return cfg, task, model


def measure(cfg, task, model, batches: list) -> dict:
    """{train_s, eval_s, open, computed, batch} of one loaded run on the batches."""
    train_s, eval_s, opened, computed = [], [], [], []
    for x, y in batches:
        model.train()
        model.zero_grad(set_to_none=True)
        tick = time.process_time()
        (task.loss(model(x), y) + model.penalty()).backward()
        train_s.append(time.process_time() - tick)
        opened.append(model.statistics().get("open_fraction"))
        if opened[-1] is not None:
            computed.append(last_candidate_blocks() / (x.shape[0] * x.shape[1] * model.backbone.n_modules))
        model.eval()
        with torch.no_grad():
            tick = time.process_time()
            model(x)
            eval_s.append(time.process_time() - tick)
    skip = 2 if len(batches) > 2 else 0  # warm-up
    share = lambda values: statistics.mean(values) if values and None not in values else None  # noqa: E731
    return {"train_s": statistics.median(train_s[skip:]), "eval_s": statistics.median(eval_s[skip:]),
            "open": share(opened), "computed": share(computed), "batch": cfg.trainer.batch_size}


def show(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by hrnn-train")
    parser.add_argument("--batches", type=int, default=10, help="training batches timed per run (first two: warm-up)")
    parser.add_argument("--capabilities", default=None,
                        help="comma-separated CPU capabilities to time (default: every one this CPU runs, best first)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    capabilities = args.capabilities.split(",") if args.capabilities else list(reversed(ops.cpu_capabilities()))
    runs = [(run_dir, *load(run_dir)) for run_dir in args.runs]  # each read once, timed under every capability
    cfg, task, _ = runs[0][1:]
    torch.manual_seed(0)
    batches = [task.train_batch(cfg.trainer.batch_size) for _ in range(args.batches)]
    for capability in capabilities or [None]:  # None: no extension, the PyTorch loop
        if capability is not None:
            ops.set_cpu_capability(capability)
        print(f"\ncapability {capability or 'none (pytorch loop)'}")
        print(f"{'run (sweep/job)':40s} {'batch':>5s} {'open':>6s} {'computed':>8s} {'train s':>8s} {'/ first':>7s} "
              f"{'eval s':>7s} {'/ first':>7s}")
        first = None
        for run_dir, *loaded in runs:
            row = measure(*loaded, batches)
            first = first or row
            name = f"{run_dir.resolve().parent.name}/{run_dir.resolve().name.partition('_')[0]}"
            print(f"{name[-40:]:40s} {row['batch']:5d} {show(row['open']):>6s} {show(row['computed']):>8s} "
                  f"{row['train_s']:8.4f} {row['train_s'] / first['train_s']:7.3f} {row['eval_s']:7.4f} "
                  f"{row['eval_s'] / first['eval_s']:7.3f}")


if __name__ == "__main__":
    main()
