"""Time of the fused event-gate core (hrnn.ops.gated_leaky_rnn) against the fraction of updates.

    python scripts/bench/bench_gates.py      # T = 200 and 784 (a few minutes on 2 cores)
    python scripts/bench/bench_gates.py --quick  # tiny run: checks the script works, numbers meaningless
    python scripts/bench/bench_gates.py --blocks --steps 784 --threads 1 --capabilities avx512,avx2
                                             # forward time against the fraction of nonzero W_h blocks
    python scripts/bench/bench_gates.py --truncated --steps 784 --threads 1 --capabilities avx2,default
                                             # the truncated gate's training step against its open fraction
    python scripts/bench/bench_gates.py --clock --steps 784 --threads 1
                                             # the same under a frozen binary clock, against the default's soft step

Batch 100, hidden 128, 8 modules, 2 inputs, float32, 2 threads, the capability the extension
picks (HRNN_CPU_CAPABILITY to force one). Hard gates with the open fraction forced to f: a
thresholds tensor of -1 where a (b, t, m) is open and 2 where it is closed (g is in (0, 1)), on a
seeded random pattern. Each row gives the median and the min of the timed calls after a warm-up
(process CPU time with --threads 1, else wall time):

- "no-grad": forward under torch.no_grad, which skips closed modules' candidates: expect ~f;
- "hard, one threshold": the model's own evaluation, one threshold compared with the logits (no
  sigmoid), with the gate bias at +-100 so that every gate is open or every one shut;
- "train": forward + backward of the last state's sum (as a model's head reads it; the reference
  loop computes all states and is given the same loss), where the forward computes every candidate (the
  straight-through gradient reads them) and the backward skips closed blocks: expect ~(1 + 2f)/3.

With --truncated: the truncated gate (model.gate=truncated: g where g > threshold, exactly 0
elsewhere, with its true gradient) with the open fraction forced to f as above (a threshold of -1
opens, 2 shuts), training step (forward + backward, the states of every step read by the loss, as a
per-step head does, and the last state only, as adding and sequential MNIST do) and no-grad
evaluation, over the soft gate's dense step of the same inputs, under each capability named. A
truncated gate's gradient is nonzero exactly where it is open, so the fraction inside the
gradient's support is the open fraction; the training step should cost about f of the dense one
plus what stays dense (the gate's M logits, dG_h and the pass-through of dL/dh at shut modules).
Rows with w > 0 also force a fraction w shut within the support (model.gate_support, a
pseudo-derivative below the threshold): their candidates are computed and their dL/da read, so the
step should cost about f + w of the dense one's candidate work, forward and the gate's backward.

With --clock: the truncated gate under a frozen binary clock (periods 1, 2, 4, ..., 128, exact 0/1 waves:
`regularizer=none optim.clock_lr=0`), so that a (b, t, m) off its module's ticks is shut whatever its gate
says, against the default model's soft step (soft gate times a learned clock: the waves' gradient reads
every candidate). The gates are forced open on a fraction q of the ticks, so the open fraction is q times
the clock's 0.249; training step (last state) and no-grad evaluation, over the soft step with the
learned clock (softmax waves, never exactly 0: dense) and beside the soft step under the frozen clock
(whose exact zeros the core skips too), under each capability named.

With --blocks: the no-grad forward of both cores (the clock core hrnn.ops.leaky_rnn with soft
waves, the event-gate core with every gate open) against the fraction of nonzero blocks of W_h
(BLOCK_FRACTIONS; a seeded random set of that many blocks, as learned connectivity's hard gates
leave W_h in evaluation), last state only, under each capability named.

Also the soft gate (dense), the reference loop (hrnn.ops.gated_leaky_rnn_reference) and the
clock model's fused core (hrnn.ops.leaky_rnn, dense waves) as a yardstick. The machine may be
shared: compare ratios within one run, not numbers across runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py beside this file
import torch  # noqa: E402
from common import timed  # noqa: E402

from hrnn import ops  # noqa: E402
from hrnn.models.clock import BasisClock  # noqa: E402
from hrnn.ops import gated_leaky_rnn, gated_leaky_rnn_reference, last_candidate_blocks, leaky_rnn  # noqa: E402

BATCH, HIDDEN, MODULES, INPUTS = 100, 128, 8, 2
FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.0)
# (open fraction f, fraction shut within the support w): w > 0 runs with the widest support (1).
TRUNCATED_ROWS = ((1.0, 0.0), (0.5, 0.0), (0.25, 0.0), (0.1, 0.0), (0.05, 0.0), (0.05, 0.05), (0.05, 0.15),
                  (0.02, 0.0), (0.0, 0.0), (0.0, 0.1))
BLOCK_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125)


def inputs(batch: int, steps: int, grad: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).requires_grad_(grad)  # noqa: E731
    return {"x": torch.randn(batch, steps, INPUTS, generator=gen), "w_x": r(HIDDEN, INPUTS),
            "bias": r(HIDDEN, scale=0.1), "w_h": r(HIDDEN, HIDDEN, scale=HIDDEN ** -0.5),
            "h0": torch.zeros(batch, HIDDEN), "gate_x": r(MODULES, INPUTS), "gate_bias": r(MODULES),
            "gate_h": r(MODULES, HIDDEN, scale=HIDDEN ** -0.5)}


def forced_thresholds(batch: int, steps: int, f: float, within: float = 0.0) -> torch.Tensor:
    """-1 (always open) on a seeded random fraction f of (b, t, m), 1 on a further fraction `within` (shut,
    since g < 1, but within a support of 1, since g > 0), 2 (shut, outside any support) elsewhere."""
    gen = torch.Generator().manual_seed(1)
    draw = torch.rand(batch, steps, MODULES, generator=gen)
    return torch.where(draw < f, -1.0, torch.where(draw < f + within, 1.0, 2.0))


# With one thread, the process's CPU time: on a shared machine it leaves out the time the process
# waited for a core (wall time there measured the neighbours too). With more, wall time.
clock = time.perf_counter


def time_source() -> str:
    return "process CPU" if clock is time.process_time else "wall"


def per_capability(steps_list: list[int], capabilities: list[str], header: str, run):
    """(capability, run(steps)) for each T and each capability named, under its "T = ..." line and `header`."""
    for steps in steps_list:
        print(f"\nT = {steps}")
        print(header)
        for capability in capabilities:
            ops.set_cpu_capability(capability)
            yield capability, run(steps)


def times_of(fn, warmup: int, repeat: int) -> tuple[float, float]:
    """(median, min) seconds of fn by `clock`; on a shared machine the min is the less disturbed one."""
    times = timed(fn, warmup, repeat, clock=clock)
    return statistics.median(times), min(times)


def gated_call(a: dict, mode: str, thresholds, op=gated_leaky_rnn):
    """The last state (B, H) and the activations: the models' readout (adding, sequential MNIST)."""
    args = (a["x"], a["w_x"], a["bias"], a["w_h"], a["h0"], None, a["gate_x"], a["gate_bias"], a["gate_h"], mode,
            thresholds)
    if op is gated_leaky_rnn_reference:
        states, acts = op(*args)
        return states[:, -1], acts
    return op(*args, last_only=True)


def run(batch: int, steps: int, warmup: int, repeat: int, loop_repeat: int) -> list[tuple]:
    """(name, mode, f or None, (median, min) seconds, measured open fraction or None) for one T."""
    rows = []
    for train in (False, True):
        a = inputs(batch, steps, train)
        mode = "train" if train else "no-grad"

        def cell(call, n=repeat):
            def step():
                with torch.set_grad_enabled(train):
                    out = call()
                    states = out[0] if isinstance(out, tuple) else out
                    if train:
                        states.sum().backward()  # the last state's sum (as a head reading it)
            return times_of(step, warmup, n)

        for f in FRACTIONS:
            thr = forced_thresholds(batch, steps, f)
            seconds = cell(lambda: gated_call(a, "hard", thr))
            with torch.no_grad():
                measured = float((gated_call(a, "hard", thr)[1] != 0).float().mean())
            rows.append((f"hard f={f:g}", mode, f, seconds, measured))
        for opened, bias in (("all open", 100.0), ("all shut", -100.0)):  # the model's evaluation: one threshold
            b = {**a, "gate_bias": torch.full((MODULES,), bias)}
            rows.append((f"hard, one threshold, {opened}", mode, None, cell(lambda: gated_call(b, "hard", 0.5)),
                         None))
        rows.append(("soft (dense)", mode, None, cell(lambda: gated_call(a, "soft", 0.5)), None))
        thr = forced_thresholds(batch, steps, 1.0)
        rows.append(("reference loop, hard f=1", mode, None,
                     cell(lambda: gated_call(a, "hard", thr, gated_leaky_rnn_reference), loop_repeat), None))
        waves = torch.ones(steps, MODULES)
        rows.append(("clock core leaky_rnn (dense)", mode, None,
                     cell(lambda: leaky_rnn(a["x"], a["w_x"], a["bias"], a["w_h"], waves, a["h0"], False, True)),
                     None))
    return rows


def block_mask(fraction: float) -> torch.Tensor:
    """(H, H) 0/1 mask of W_h keeping round(fraction M^2) blocks (module pairs), a seeded random set."""
    gen = torch.Generator().manual_seed(2)
    keep = torch.zeros(MODULES * MODULES)
    keep[torch.randperm(MODULES * MODULES, generator=gen)[:round(fraction * MODULES * MODULES)]] = 1
    units = HIDDEN // MODULES
    return keep.view(MODULES, MODULES).repeat_interleave(units, 0).repeat_interleave(units, 1)


def run_blocks(batch: int, steps: int, warmup: int, repeat: int) -> list[tuple]:
    """(core, fraction of nonzero blocks, (median, min) seconds) of the no-grad last-state forward."""
    a = inputs(batch, steps, False)
    waves = torch.rand(steps, MODULES, generator=torch.Generator().manual_seed(3))  # soft: no module skipped
    open_all = forced_thresholds(batch, steps, 1.0)
    rows = []
    for fraction in BLOCK_FRACTIONS:
        b = {**a, "w_h": a["w_h"] * block_mask(fraction)}
        calls = {"clock core": lambda: leaky_rnn(b["x"], b["w_x"], b["bias"], b["w_h"], waves, b["h0"], False, True),
                 "event core, all open": lambda: gated_call(b, "hard", open_all)}
        with torch.no_grad():
            for core, call in calls.items():
                rows.append((core, fraction, times_of(call, warmup, repeat)))
    return rows


def print_blocks(batch: int, steps_list: list[int], capabilities: list[str], threads: int, warmup: int,
                 repeat: int) -> None:
    print(f"hrnn fused cores, no-grad forward (last state) against the fraction of nonzero W_h blocks: batch {batch}, "
          f"hidden {HIDDEN}, {MODULES} modules, {INPUTS} inputs, float32, {threads} threads")
    header = f"{'capability':10s} {'core':22s} {'blocks':>6s} {'median ms':>10s} {'min ms':>8s} {'/ dense (min)':>13s}"
    for capability, rows in per_capability(steps_list, capabilities, header,
                                           lambda steps: run_blocks(batch, steps, warmup, repeat)):
        dense = {core: s for core, fraction, s in rows if fraction == 1.0}
        for core, fraction, (median, least) in rows:
            print(f"{capability:10s} {core:22s} {fraction:6.3f} {median * 1e3:10.2f} {least * 1e3:8.2f} "
                  f"{least / dense[core][1]:13.3f}")


def run_truncated(batch: int, steps: int, warmup: int, repeat: int) -> dict:
    """{(mode, readout, (f, w) or "soft"): (median, min) seconds}, and per row (f, w) the measured open
    fraction and the fraction whose candidate a training step computed (open or within the support)."""
    a = inputs(batch, steps, True)
    thresholds = {row: forced_thresholds(batch, steps, *row) for row in TRUNCATED_ROWS}
    support = {row: 1.0 if row[1] else 0.0 for row in TRUNCATED_ROWS}
    times, opened, computed = {}, {}, {}
    for readout in ("last", "all"):
        def cell(mode, thresholds, train, support=0.0):
            def step():
                with torch.set_grad_enabled(train):
                    args = (a["x"], a["w_x"], a["bias"], a["w_h"], a["h0"], None, a["gate_x"], a["gate_bias"],
                            a["gate_h"], mode, thresholds)
                    states, acts = gated_leaky_rnn(*args, last_only=readout == "last", support=support)
                    if train:
                        states.sum().backward()
                return acts
            return times_of(step, warmup, repeat)

        for train in (True, False):
            key = "train" if train else "no-grad"
            times[key, readout, "soft"] = cell("soft", 0.5, train)
            for row, thr in thresholds.items():
                times[key, readout, row] = cell("truncated", thr, train, support[row])
                if train:
                    computed[row] = last_candidate_blocks() / (batch * steps * MODULES)
    with torch.no_grad():
        for row, thr in thresholds.items():
            opened[row] = float((gated_call(a, "truncated", thr)[1] != 0).float().mean())
    return {"times": times, "open": opened, "computed": computed}


CLOCK_TICK_SHARES = (1.0, 0.6, 0.4, 0.2)  # the share of the clock's ticks whose gate is forced open


def binary_clock_waves(steps: int) -> torch.Tensor:
    """(steps, MODULES) exact 0/1: module m ticks where t % 2^m == 0 (a frozen binary clock's start)."""
    t = torch.arange(steps).unsqueeze(1)
    return (t % (2 ** torch.arange(MODULES)).unsqueeze(0) == 0).float()


def default_clock_waves(steps: int) -> torch.Tensor:
    """(steps, MODULES) the default model's learned binary clock at its start (softmax over every period, 0.8 on
    1, 2, 4, ...): near 0 off its ticks but never 0, so every (b, t, m) is computed, and the waves need a gradient."""
    clock = BasisClock("binary", steps, MODULES, steps, "softmax", init="spread", init_weight=0.8, sharpness=1.0,
                       learn_phase=False, start_periods=None, temperature=1.0, entropy_weight=0.0)
    return clock.waves(steps).detach().requires_grad_(True)  # a leaf: each timed call backpropagates to it


def run_clock(batch: int, steps: int, warmup: int, repeat: int) -> dict:
    """{(mode, row): (median, min) seconds} for the rows "soft, learned clock", "soft, frozen clock" and each
    tick share q (the truncated gate under the frozen clock), last state; and per row the measured open fraction."""
    a = inputs(batch, steps, True)
    frozen = binary_clock_waves(steps)
    learned = default_clock_waves(steps)
    times, opened = {}, {}

    def cell(mode, waves, thresholds, train):
        def step():
            with torch.set_grad_enabled(train):
                states, acts = gated_leaky_rnn(a["x"], a["w_x"], a["bias"], a["w_h"], a["h0"], waves, a["gate_x"],
                                               a["gate_bias"], a["gate_h"], mode, thresholds, last_only=True)
                if train:
                    states.sum().backward()
            return acts
        return times_of(step, warmup, repeat)

    cases = {"soft, learned clock": ("soft", learned, 0.5), "soft, frozen clock": ("soft", frozen, 0.5),
             **{share: ("truncated", frozen, forced_thresholds(batch, steps, share)) for share in CLOCK_TICK_SHARES}}
    with torch.no_grad():
        for row, (mode, waves, thresholds) in cases.items():
            acts = gated_leaky_rnn(a["x"], a["w_x"], a["bias"], a["w_h"], a["h0"], waves, a["gate_x"], a["gate_bias"],
                                   a["gate_h"], mode, thresholds, last_only=True)[1]
            opened[row] = float((acts != 0).float().mean())
    for train in (True, False):
        for row, (mode, waves, thresholds) in cases.items():
            times["train" if train else "no-grad", row] = cell(mode, waves, thresholds, train)
    return {"times": times, "open": opened}


def print_clock(batch: int, steps_list: list[int], capabilities: list[str], threads: int, warmup: int,
                repeat: int) -> None:
    print(f"hrnn event-gate core, truncated gate under a frozen binary clock (periods 1..{2 ** (MODULES - 1)}) against "
          f"the soft gate under a learned clock: batch {batch}, hidden {HIDDEN}, {MODULES} modules, {INPUTS} inputs, "
          f"float32, {threads} threads, {time_source()} time, min of {repeat} calls, last state")
    header = (f"{'capability':10s} {'gate':20s} {'ticks':>6s} {'open':>6s} {'train ms':>9s} {'/ soft':>7s} "
              f"{'eval ms':>8s} {'/ soft':>7s}")
    for capability, result in per_capability(steps_list, capabilities, header,
                                             lambda steps: run_clock(batch, steps, warmup, repeat)):
        t = result["times"]
        soft_train, soft_eval = t["train", "soft, learned clock"][1], t["no-grad", "soft, learned clock"][1]
        for row in ("soft, learned clock", "soft, frozen clock", *CLOCK_TICK_SHARES):
            soft = isinstance(row, str)
            name, ticks = (row, "-") if soft else ("truncated", f"{row:.2f}")
            open_share = f"{result['open'][row]:.3f}"
            train, evaluation = t["train", row][1], t["no-grad", row][1]
            print(f"{capability:10s} {name:20s} {ticks:>6s} {open_share:>6s} {train * 1e3:9.2f} "
                  f"{train / soft_train:7.3f} {evaluation * 1e3:8.2f} {evaluation / soft_eval:7.3f}")
    print("\n'/ soft': over the soft gate's step under the learned clock (the default model), same mode (train: "
          "forward + backward of the last state; eval: forward under torch.no_grad). 'ticks': the share of the "
          "clock's ticks whose gate is forced open; 'open': measured fraction of (b, t, m) with a != 0, whose "
          "candidates the forward computes (all of them under the learned clock's gradient).")


def print_truncated(batch: int, steps_list: list[int], capabilities: list[str], threads: int, warmup: int,
                    repeat: int) -> None:
    print(f"hrnn event-gate core, truncated gate against its open fraction f: batch {batch}, hidden {HIDDEN}, "
          f"{MODULES} modules, {INPUTS} inputs, float32, {threads} threads, "
          f"{time_source()} time, min of {repeat} calls")
    header = (f"{'capability':10s} {'readout':7s} {'f':>5s} {'w':>5s} {'open':>6s} {'support':>7s} {'train ms':>9s} "
              f"{'/ soft':>7s} {'eval ms':>8s} {'/ soft':>7s}")
    for capability, result in per_capability(steps_list, capabilities, header,
                                             lambda steps: run_truncated(batch, steps, warmup, repeat)):
        t = result["times"]
        for readout in ("last", "all"):
            soft_train, soft_eval = t["train", readout, "soft"][1], t["no-grad", readout, "soft"][1]
            print(f"{capability:10s} {readout:7s} {'soft':>5s} {'-':>5s} {1.0:6.3f} {1.0:7.3f} "
                  f"{soft_train * 1e3:9.2f} {1.0:7.3f} {soft_eval * 1e3:8.2f} {1.0:7.3f}")
            for row in TRUNCATED_ROWS:
                train, evaluation = t["train", readout, row][1], t["no-grad", readout, row][1]
                print(f"{capability:10s} {readout:7s} {row[0]:5.2f} {row[1]:5.2f} {result['open'][row]:6.3f} "
                      f"{result['computed'][row]:7.3f} {train * 1e3:9.2f} {train / soft_train:7.3f} "
                      f"{evaluation * 1e3:8.2f} {evaluation / soft_eval:7.3f}")
    print("\n'/ soft': over the soft gate's dense step, same readout, same mode (train: forward + backward; eval: "
          "forward under torch.no_grad). f, w: the forced fractions open and shut within the support (w > 0 runs "
          "with model.gate_support's widest, 1). 'open': measured fraction of (b, t, m) with a != 0; 'support': "
          "measured fraction whose candidate the training step computed, where the gate's gradient may be "
          "nonzero (open, or shut within the support).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 784])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--blocks", action="store_true", help="time against the fraction of nonzero W_h blocks")
    parser.add_argument("--truncated", action="store_true", help="the truncated gate's steps against its open fraction")
    parser.add_argument("--clock", action="store_true",
                        help="the truncated gate under a frozen binary clock against the default model's soft step")
    parser.add_argument("--capabilities", default=None,
                        help="comma-separated CPU capabilities to time with --blocks (default: the one in use) "
                             "or --truncated (default: every one this CPU runs)")
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per cell")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.threads == 1 else time.perf_counter
    batch, steps_list = (8, [12]) if args.quick else (BATCH, args.steps)
    warmup, repeat, loop_repeat = (1, 2, 1) if args.quick else (2, args.repeat, 3)
    capabilities = args.capabilities.split(",") if args.capabilities else [ops.cpu_capability()]
    if args.blocks:
        print_blocks(batch, steps_list, capabilities, args.threads, warmup, repeat)
        return
    if args.clock:  # every capability this CPU runs unless told
        print_clock(batch, steps_list, args.capabilities.split(",") if args.capabilities else
                    list(reversed(ops.cpu_capabilities())), args.threads, warmup, repeat)
        return
    if args.truncated:  # every capability this CPU runs unless told
        print_truncated(batch, steps_list, args.capabilities.split(",") if args.capabilities else
                        list(reversed(ops.cpu_capabilities())), args.threads, warmup, repeat)
        return
    print(f"hrnn event-gate core: batch {batch}, hidden {HIDDEN}, {MODULES} modules, {INPUTS} inputs, float32, "
          f"{args.threads} threads, capability {ops.cpu_capability() or 'none (pytorch loop)'}, {time_source()} time")
    for steps in steps_list:
        print_curve(steps, run(batch, steps, warmup, repeat, loop_repeat))
    print("\n'/ f=1': time over the hard gate's time at f = 1 in the same mode (median over median, min over "
          "min). 'expect': that ratio if only the "
          "candidates' work counted: f for no-grad, (1 + 2f)/3 for train. 'open': the measured fraction.")
    if ops.fused_available():
        print(f"candidate blocks in the last fused forward: {last_candidate_blocks()}")


def print_curve(steps: int, rows: list[tuple]) -> None:
    """One T's rows of `run`, each time also over the same mode's time at f = 1."""
    dense = {mode: s for name, mode, f, s, _ in rows if f == 1.0}
    print(f"\nT = {steps}")
    print(f"{'configuration':30s} {'mode':8s} {'median ms':>10s} {'/ f=1':>7s} {'min ms':>8s} {'/ f=1':>7s} "
          f"{'f':>6s} {'expect':>7s} {'open':>6s}")
    for name, mode, f, (median, least), measured in rows:
        expect = "" if f is None else f"{f if mode == 'no-grad' else (1 + 2 * f) / 3:.3f}"
        print(f"{name:30s} {mode:8s} {median * 1e3:10.2f} {median / dense[mode][0]:7.3f} {least * 1e3:8.2f} "
              f"{least / dense[mode][1]:7.3f} {'' if f is None else f'{f:.2f}':>6s} {expect:>7s} "
              f"{'' if measured is None else f'{measured:.3f}':>6s}")


if __name__ == "__main__":
    main()
