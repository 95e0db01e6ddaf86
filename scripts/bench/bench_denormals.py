"""What subnormal floats cost a training step: each preset's first training steps from its initialisation,
with trainer.flush_denormal off and on, in one process.

    python scripts/bench/bench_denormals.py [--presets smnist_lstm,...] [--steps 3]

Gradients that vanish over a long sequence (a PyTorch-initialised LSTM over 784 pixels) fall below
float32's smallest normal, 1.2e-38, and x86 arithmetic on such subnormal numbers is many times slower.
hrnn-train flushes them to zero by default; this prints, per preset (its own model, task, batch and
seed, as hrnn-train sets it up), the median process CPU time of a training step (batch, forward, loss,
backward, clip, optimizer step) with subnormals kept and flushed, and their ratio. One thread. The steps
are the first ones from the same initialisation in both modes, where the LSTM's are slowest: what a run
loses later depends on what it learns (a wall-time budget's step count says it).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file
import torch  # noqa: E402
from common import compose_config  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hrnn.cli.wrapper import user_errors  # noqa: E402

# preset overrides -> what it is; the LSTM first at PyTorch's initialisation, as the rows marked † ran
PRESETS = {
    "experiment=smnist_lstm model.init=default": "sMNIST LSTM 128, PyTorch's initialisation (†)",
    "experiment=smnist_lstm": "sMNIST LSTM 128, chrono",
    "experiment=smnist_gru": "sMNIST GRU 128, PyTorch's initialisation",
    "experiment=smnist_lem": "sMNIST LEM 128",
    "experiment=smnist_cornn": "sMNIST coRNN 256",
    "experiment=smnist": "sMNIST hrnn preset: event gates, hidden 192",
    "experiment=smnist_truncated": "sMNIST hrnn truncated gates under the frozen clock",
    "experiment=pmnist": "pMNIST hrnn preset: the binary clock",
}


def step_seconds(overrides: list[str], flush: bool, steps: int) -> list[float]:
    """Process CPU time of each of the first `steps` training steps from the preset's initialisation."""
    from hrnn.train.loop import set_up, train_step

    cfg = compose_config([*overrides, "trainer.num_threads=1", f"trainer.flush_denormal={flush}",
                          "trainer.progress=false"])
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        run = set_up(cfg, Path(run_dir))
        times = []
        for _ in range(steps):
            run.step += 1
            start = time.process_time()
            train_step(run, tqdm(disable=True))
            times.append(time.process_time() - start)
        run.writer.close()
    return times


@user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help="comma-separated hrnn-train overrides, one preset each (default: the table's)")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed per preset and mode")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, one thread; median process CPU s of the first {args.steps} training steps")
    print("| preset | what | kept (s) | flushed (s) | kept / flushed |")
    print("|---|---|---|---|---|")
    for preset in args.presets.split(","):
        overrides = preset.split()
        kept = statistics.median(step_seconds(overrides, False, args.steps))
        flushed = statistics.median(step_seconds(overrides, True, args.steps))
        print(f"| `{preset}` | {PRESETS.get(preset, '')} | {kept:.3f} | {flushed:.3f} | {kept / flushed:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
