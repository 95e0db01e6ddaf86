"""Why a clocked model does or does not solve the adding problem: evidence from one trained run.

    python scripts/study/diagnose_adding.py <run dir> [<run dir> ...] [--checkpoint best|last] [--samples N]

For each run (an `hrnn-train task=adding model=hrnn ...` directory) it rebuilds the model from
the checkpoint, draws N validation sequences and prints:

  * how the periods moved: the clock's periods at every evaluation of metrics.json's history;
  * what each module holds at the last step: R^2 of a least-squares readout (16 units + 1) of
    the first marked value, of the second and of their sum (the target) from that module's
    final state alone; 0 means the module holds nothing of it;
  * when modules update: the mean activation a_m(t) at the two marked steps against all steps
    (a clock's wave is the same at both; an event gate can open on the marker);
  * gradient flow through time (clock models only): || dL/dh_t || per module at t = T-1,
    3T/4, T/2, T/4 and 0, from a float64 loop over the definition, and the gradient norms of
    the clock's coefficients and of W_h. A gradient that is gone by the second marker's
    earliest position (T/2) means the loss cannot see the first marked value.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hrnn.cli import eval as evaluate
from hrnn.cli.wrapper import user_errors


def load_run(run_dir: Path, checkpoint: str):
    cfg, task, model, state = evaluate.load_run(run_dir, checkpoint, {})
    if cfg.task.name != "adding" or cfg.model.name != "hrnn":
        raise SystemExit(f"{run_dir}: task={cfg.task.name} model={cfg.model.name}; this script reads adding runs of model=hrnn")
    return cfg, task, model.double().eval(), state["step"]


def validation_sample(task, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n validation sequences and targets in float64 (class labels stay integers)."""
    xs, ys, count = [], [], 0
    for x, y in task.eval_batches("val", 500):
        xs.append(x)
        ys.append(y)
        count += len(x)
        if count >= n:
            break
    y = torch.cat(ys)[:n]
    return torch.cat(xs)[:n].double(), y if not y.is_floating_point() else y.double()


def marked_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first value, second value, (B, 2) marker positions) of adding inputs x (B, T, 2)."""
    positions = x[..., 1].nonzero()[:, 1].view(-1, 2)
    rows = torch.arange(len(x))
    return x[rows, positions[:, 0], 0], x[rows, positions[:, 1], 0], positions


def r_squared(features: torch.Tensor, target: torch.Tensor) -> float:
    """R^2 of the least-squares fit of target from features plus a constant."""
    design = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, target.unsqueeze(1)).solution
    residual = target - (design @ solution).squeeze(1)
    return float(1 - residual.var() / target.var())


def gradient_through_time(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(||dL/dh_t|| per step and module (T, M), ||dL/d clock coefficients||, ||dL/dW_h||) for a clock model.

    The loop is the definition h_t = lerp(h_{t-1}, tanh(W_x x_t + b + W_h h_{t-1}), a_t) with the
    model's own waves and W_h, so that every h_t is a leaf whose gradient can be read.
    """
    rnn = model.backbone
    model.zero_grad()
    steps, units = x.shape[1], rnn.hidden_size // rnn.n_modules
    waves = rnn.clock.waves(steps).to(x.dtype).repeat_interleave(units, dim=1)
    w_h = rnn.recurrent_weight()
    u = rnn.input(x)
    h = x.new_zeros(len(x), rnn.hidden_size)
    states = []
    for t in range(steps):
        h = torch.lerp(h, torch.tanh(u[:, t] + h @ w_h.t()), waves[t])
        h.retain_grad()
        states.append(h)
    loss = torch.nn.functional.mse_loss(model.head(h), y)
    loss.backward()
    norms = torch.stack([s.grad.view(len(x), rnn.n_modules, units).norm(dim=2).mean(0) for s in states])
    clock_grad = torch.sqrt(sum(p.grad.square().sum() for p in rnn.clock.parameters() if p.grad is not None))
    return norms, float(clock_grad), float(rnn.recurrent.grad.norm())


def diagnose(run_dir: Path, checkpoint: str, samples: int) -> None:
    cfg, task, model, step = load_run(run_dir, checkpoint)
    rnn = model.backbone
    steps, n_modules = task.spec.seq_len, rnn.n_modules
    print(f"## {run_dir.name}\n\nactivation={cfg.model.activation} basis={cfg.basis.name} T={steps} "
          f"checkpoint={checkpoint} (step {step})")
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    history = metrics.get("history", [])
    if history and "periods" in history[0]:
        print("\nperiods at each evaluation:")
        for entry in history:
            print(f"  step {entry['step']:>5}  val mse {entry.get('val_mse', float('nan')):.4f}  "
                  + " ".join(f"{p:.3g}" for p in entry["periods"]))

    x, y = validation_sample(task, samples)
    first, second, positions = marked_values(x)
    with torch.no_grad():
        states = rnn(x)  # (B, T, H)
        activations = rnn.activations.expand(len(x), steps, n_modules) if rnn.activations.dim() == 2 else rnn.activations
        mse = float(torch.nn.functional.mse_loss(model.head(states[:, -1]), y))
    final = states[:, -1].view(len(x), n_modules, -1)
    rows = torch.arange(len(x))
    print(f"\nval MSE on these {len(x)} sequences: {mse:.4f} (baseline {1 / 6:.4f})")
    print("\n| module | R^2 first value | R^2 second value | R^2 sum | a at 1st marker | a at 2nd marker | a mean |")
    print("|---|---|---|---|---|---|---|")
    for m in range(n_modules):
        at_first = activations[rows, positions[:, 0], m].mean()
        at_second = activations[rows, positions[:, 1], m].mean()
        print(f"| {m} | {r_squared(final[:, m], first):.3f} | {r_squared(final[:, m], second):.3f} | "
              f"{r_squared(final[:, m], first + second):.3f} | {at_first:.3f} | {at_second:.3f} | "
              f"{activations[..., m].mean():.3f} |")
    print(f"| all | {r_squared(states[:, -1], first):.3f} | {r_squared(states[:, -1], second):.3f} | "
          f"{r_squared(states[:, -1], first + second):.3f} | | | |")

    if rnn.clock is not None and rnn.event is None:
        norms, clock_grad, w_grad = gradient_through_time(model, x, y)
        marks = [steps - 1, 3 * steps // 4, steps // 2, steps // 4, 0]
        print(f"\nmean ||dL/dh_t|| per module (float64 loop, {len(x)} sequences); "
              f"||dL/d clock coefficients|| {clock_grad:.3g}, ||dL/dW_h|| {w_grad:.3g}")
        print("\n| module | " + " | ".join(f"t = {t}" for t in marks) + " | ratio t=0 / t=T-1 |")
        print("|---|" + "---|" * (len(marks) + 1))
        for m in range(n_modules):
            ratio = norms[0, m] / norms[-1, m] if norms[-1, m] > 0 else float("nan")
            print(f"| {m} | " + " | ".join(f"{norms[t, m]:.2e}" for t in marks) + f" | {ratio:.1e} |")
    print()


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for run_dir in args.runs:
        diagnose(run_dir, args.checkpoint, args.samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
