"""The validation loss of a trained clocked run as one module's clock changes, everything else held.

    python scripts/study/clock_surface.py <run dir> [--module M] [--points 25] [--samples 1000]

For a run of model=hrnn with a basis clock (binary or cosine, softmax regularizer), from its best
checkpoint, on the first `samples` validation sequences, two readings of module M (default: every
module in turn):

  * along one coefficient: the module's dominant logit c[k*, M] moved across +-6 softmax temperatures
    of where it is (component k*'s weight from near 0 to near 1), the loss and dL/dc at each point;
  * over periods: the loss when the module's wave is each single basis component alone (its logits
    one-hot, at the margin the clock starts with): the period this module would take if it could
    jump there.

A flat curve says the task's loss cannot see this module's schedule, so no optimiser moves it; a
minimum at another period with no slope toward it from here says the clock is stuck behind a
barrier. Read the two together with the gradient the coefficients get in training (train/grad_norm
and scripts/study/diagnose_adding.py).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # diagnose_adding.py beside this file

from diagnose_adding import validation_sample  # noqa: E402

from hrnn.cli import eval as evaluate  # noqa: E402
from hrnn.cli.wrapper import user_errors  # noqa: E402
from hrnn.errors import UserError  # noqa: E402

SPAN = 6.0  # softmax temperatures either side of the coefficient's value


def loss_of(model, task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return task.loss(model(x), y)


def along_coefficient(model, task, x, y, module: int, points: int) -> tuple[int, list[tuple[float, float, float]]]:
    """(k*, [(offset from the trained value, loss, dL/dc)]) along the module's dominant logit."""
    clock = model.backbone.clock
    coefficients = clock.coefficients
    k = int(clock.spectrum()[module].argmax())
    trained = float(coefficients[k, module].detach())
    rows = []
    for offset in torch.linspace(-SPAN, SPAN, points).tolist():
        with torch.no_grad():
            coefficients[k, module] = trained + offset * clock.temperature
        model.zero_grad()
        loss = loss_of(model, task, x, y)
        loss.backward()
        rows.append((offset, float(loss.detach()), float(coefficients.grad[k, module])))
    with torch.no_grad():
        coefficients[k, module] = trained
    return k, rows


def over_periods(model, task, x, y, module: int) -> list[tuple[float, float]]:
    """[(component period, loss with the module's wave that component alone)] for every component."""
    clock = model.backbone.clock
    coefficients = clock.coefficients
    trained = coefficients[:, module].detach().clone()
    size = clock.size
    margin = math.log(0.99 / 0.01 * (size - 1)) * clock.temperature  # weight 0.99 on one component
    rows = []
    with torch.no_grad():
        for k in range(size):
            coefficients[:, module] = 0.0
            coefficients[k, module] = margin
            rows.append((float(clock.component_periods[k]), float(loss_of(model, task, x, y))))
        coefficients[:, module] = trained
    return rows


def report(run_dir: Path, modules: list[int] | None, points: int, samples: int) -> None:
    cfg, task, model, state = evaluate.load_run(run_dir, "best", {})
    clock = getattr(model.backbone, "clock", None)
    if cfg.model.name != "hrnn" or clock is None or not hasattr(clock, "coefficients") or clock.regularizer != "softmax":
        clock_name = f" activation={cfg.model.activation} basis={cfg.basis.name}" if cfg.model.name == "hrnn" else ""
        raise UserError(f"{run_dir}: model={cfg.model.name}{clock_name}; this script reads hrnn runs with a basis clock "
                        "under the softmax regularizer")
    model = model.double().eval()
    x, y = validation_sample(task, samples)
    with torch.no_grad():
        base = float(loss_of(model, task, x, y))
    print(f"## {run_dir.name}\n\ntask={cfg.task.name} T={task.spec.seq_len} activation={cfg.model.activation} "
          f"basis={cfg.basis.name} step {state['step']}; val loss on {len(x)} sequences {base:.5f}; periods "
          + " ".join(f"{p:.3g}" for p in clock.periods()))
    for module in modules if modules is not None else range(clock.n_modules):
        k, rows = along_coefficient(model, task, x, y, module, points)
        losses = [loss for _, loss, _ in rows]
        print(f"\nmodule {module} (period {float(clock.component_periods[k]):.3g}): along c[{k}, {module}], offset in "
              f"softmax temperatures; loss range {max(losses) - min(losses):.2e}")
        print("| offset | loss | dL/dc |\n|---|---|---|")
        for offset, loss, grad in rows:
            print(f"| {offset:+.1f} | {loss:.5f} | {grad:+.2e} |")
        periods = over_periods(model, task, x, y, module)
        best = min(periods, key=lambda row: row[1])
        print(f"\nmodule {module} as one component: best period {best[0]:.3g} (loss {best[1]:.5f}); "
              f"loss range {max(p[1] for p in periods) - min(p[1] for p in periods):.2e}")
        print("| period | loss |\n|---|---|")
        for period, loss in periods:
            print(f"| {period:.3g} | {loss:.5f} |")
    print()


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--module", type=int, action="append", help="a module to read (repeatable; default: all)")
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for run_dir in args.runs:
        report(run_dir, args.module, args.points, args.samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
