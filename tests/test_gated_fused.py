"""The fused event-gate core (hrnn/ops/csrc/gated_kernels.cpp) against `gated_leaky_rnn_reference`.

Values and every gradient (x, W_x and b, whose projection the kernels form per step; W_h, h0, G_x,
g_b, G_h, and shared or per-sample waves), soft, hard and truncated gates, with thresholds as a float or a
per-(b, t, m) tensor, with and without the bias, for 1, 2, 3 and 5 inputs, under every
CPU capability this machine executes (test_fused's autouse fixture). Float64 agrees to 1e-12;
float32 to 2e-5 relative: the kernels' tanh is a rational approximation (3.4e-7 relative), their
products sum in another order than the BLAS, and both errors pass through T steps of the
recurrence and its backward (measured: at most 1.2e-6 on these cases). No timings here: see
scripts/bench_gates.py.
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY, read_metrics, run_cli
from test_fused import assert_close_rel, cpu_capability  # noqa: F401  (autouse: every capability)

from hrnn import ops
from hrnn.ops import cpu, gated_leaky_rnn, gated_leaky_rnn_reference, last_candidate_blocks

pytestmark = pytest.mark.skipif(not ops.fused_available(), reason=str(ops.fused_unavailable_reason()))

F32, F64 = torch.float32, torch.float64
TOL = {F32: 2e-5, F64: 1e-12}
NAMES = ("x", "w_x", "bias", "w_h", "h0", "gate_x", "gate_bias", "gate_h")


def make(batch, steps, inputs, hidden, n_modules, dtype, waves, seed=0, bias=True):
    """Inputs of the op; waves: None, "shared" (T, M) or "per_sample" (B, T, M) in [0, 1]; bias: b or None."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=gen, dtype=dtype) * scale  # noqa: E731
    args = {"x": r(batch, steps, inputs), "w_x": r(hidden, inputs, scale=0.7), "bias": r(hidden, scale=0.1),
            "w_h": r(hidden, hidden, scale=1.5 / hidden ** 0.5), "h0": r(batch, hidden, scale=0.5),
            "gate_x": r(n_modules, inputs), "gate_bias": r(n_modules, scale=0.5),
            "gate_h": r(n_modules, hidden, scale=2 / hidden ** 0.5)}
    shape = {None: None, "shared": (steps, n_modules), "per_sample": (batch, steps, n_modules)}[waves]
    args["waves"] = None if shape is None else torch.rand(*shape, generator=gen, dtype=dtype)
    args["thresholds"] = torch.rand(batch, steps, n_modules, generator=gen, dtype=dtype)
    if not bias:
        args["bias"] = None
    return args


def call(fn, args, mode, thresholds, last_only=False, gated=True, support=0.0):
    """(states or the last state, activations) of `fn` (the op or its reference) on `args`."""
    a = args
    gate = (a["gate_x"], a["gate_bias"], a["gate_h"]) if gated else (None, None, None)
    inputs = (a["x"], a["w_x"], a["bias"], a["w_h"], a["h0"], a["waves"], *gate, mode, thresholds)
    extra = {"support": support} if support else {}
    if fn is gated_leaky_rnn_reference:
        states, acts = fn(*inputs, **extra)
        return (states[:, -1] if last_only else states), acts
    return fn(*inputs, last_only, **extra)


def values_and_grads(fn, args, mode, thresholds, last_only=False, gated=True, support=0.0):
    """States, activations and the gradient of every tensor input, for a loss that reads both
    outputs (the model's update penalty reads the activations)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()
              if v is not None and k != "thresholds" and (gated or not k.startswith("gate"))}
    full = {**args, **leaves}
    states, acts = call(fn, full, mode, thresholds, last_only, gated, support)
    gen = torch.Generator().manual_seed(7)
    loss = (states * torch.randn(states.shape, generator=gen, dtype=states.dtype)).sum() + 0.3 * acts.square().sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return states.detach(), acts.detach(), dict(zip(leaves, grads))


def assert_matches(got, want, tol, exact_activations=False):
    """States, activations and every gradient of values_and_grads within tol of the reference's."""
    if exact_activations:
        assert torch.equal(got[1], want[1])
    for g, w in ((got[0], want[0]), (got[1], want[1])):
        assert_close_rel(g, w, tol)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert_close_rel(got[2][name], want[2][name], tol)


# (B, T, I, H, M, bias): module widths 8, 8, 3 (scalar tiles), 16 (the default model's: on
# AVX-512 one float vector, run in grouped-k blocks, with the gate's 8 logits in k-pairs); 5 inputs
# (the backward's dW_x blocks of 4 input rows and a remainder), 1 and 2; and 24 (hidden 192, 8 modules).
SHAPES = [(5, 13, 5, 32, 4, True), (4, 9, 1, 24, 3, False), (3, 7, 2, 12, 4, True), (9, 7, 2, 128, 8, True),
          (4, 6, 1, 192, 8, True)]  # modules of 24 units (experiment=smnist): tiles of 2 and 1 vectors on AVX2


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("mode,thresholds", [("soft", 0.5), ("hard", 0.5), ("hard", "tensor"), ("truncated", 0.5),
                                             ("truncated", "tensor")])
@pytest.mark.parametrize("waves", [None, "shared", "per_sample"])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_values_and_every_gradient_match_the_reference(dtype, mode, thresholds, waves, shape):
    *sizes, bias = SHAPES[shape]
    args = make(*sizes, dtype, waves, seed=shape, bias=bias)
    thr = args["thresholds"] if thresholds == "tensor" else thresholds
    got = values_and_grads(gated_leaky_rnn, args, mode, thr)
    # The fused core ran: every candidate, except a truncated gate's shut ones when no waves need a gradient.
    dense = args["x"].shape[0] * args["x"].shape[1] * args["gate_x"].shape[0]
    assert last_candidate_blocks() == (int((got[1] != 0).sum()) if mode == "truncated" and waves is None else dense)
    want = values_and_grads(gated_leaky_rnn_reference, args, mode, thr)
    if mode != "soft":
        assert 0 < (got[1] != 0).float().mean() < 1
    assert ("waves" in got[2]) == (waves is not None)
    assert_matches(got, want, TOL[dtype], exact_activations=mode == "hard")  # hard: the same gates open
    if mode == "truncated":  # the same entries shut, and shut entries are exact zeros
        assert torch.equal(got[1] == 0, want[1] == 0)


@pytest.mark.parametrize("mode", ["soft", "hard", "truncated"])
def test_last_only_values_and_gradients(mode):
    args = make(5, 11, 3, 32, 4, F64, "per_sample", seed=3)
    got = values_and_grads(gated_leaky_rnn, args, mode, args["thresholds"], last_only=True)
    want = values_and_grads(gated_leaky_rnn_reference, args, mode, args["thresholds"], last_only=True)
    assert got[0].shape == (5, 32)
    assert_matches(got, want, TOL[F64], exact_activations=mode == "hard")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_waves_without_a_gate_match_the_reference(dtype):
    """Per-sample waves alone (the gate tensors None): a = w."""
    args = make(5, 13, 3, 32, 4, dtype, "per_sample", seed=4)
    args["waves"] = (args["waves"] > 0.6).to(dtype) * args["waves"]  # exact zeros too
    got = values_and_grads(gated_leaky_rnn, args, "soft", 0.5, gated=False)
    want = values_and_grads(gated_leaky_rnn_reference, args, "soft", 0.5, gated=False)
    assert_matches(got, want, TOL[dtype], exact_activations=True)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("inputs,bias", [(3, True), (1, False)])
def test_closed_modules_hold_the_state_bit_for_bit_and_open_ones_take_the_candidate(grad, inputs, bias):
    args = make(6, 15, inputs, 32, 4, F64, "shared", seed=5, bias=bias)
    args["waves"] = (args["waves"] > 0.3).to(F64)  # 0/1 clock ticks times a hard gate: a in {0, 1}
    with torch.set_grad_enabled(grad):
        if grad:
            args["w_h"].requires_grad_()
        states, acts = call(gated_leaky_rnn, args, "hard", args["thresholds"])
    states, acts = states.detach(), acts.detach()
    previous = torch.cat([args["h0"].unsqueeze(1), states[:, :-1]], dim=1)
    u = torch.nn.functional.linear(args["x"], args["w_x"], args["bias"])
    candidate = torch.tanh(u + previous @ args["w_h"].detach().t())
    a = acts.repeat_interleave(8, dim=2)
    assert 0.2 < acts.mean() < 0.8
    assert torch.equal(states[a == 0], previous[a == 0])  # hold, bit for bit
    torch.testing.assert_close(states[a == 1], candidate[a == 1], rtol=0, atol=1e-14)
    # At a = 1 the state is the kernel's own candidate exactly (torch.lerp's formula).
    hs, cs, _, _ = cpu.extension().gated_forward(*kernel_inputs(args), False, 0.0, True, True, False)
    assert torch.equal(hs[a == 1], cs[a == 1])


def kernel_inputs(args):
    """`args` in gated_forward's order (x, w_x, bias, gate_x, gate_bias, w_h, gate_h, waves, h0, thresholds)."""
    return [None if args[k] is None else args[k].detach() for k in
            ("x", "w_x", "bias", "gate_x", "gate_bias", "w_h", "gate_h", "waves", "h0", "thresholds")]


def test_no_grad_computes_only_open_blocks_and_training_computes_all():
    args = make(7, 20, 3, 32, 4, F32, "shared", seed=6)
    args["waves"] = (args["waves"] > 0.5).to(F32)
    batch, steps, modules = 7, 20, 4
    with torch.no_grad():
        _, acts = call(gated_leaky_rnn, args, "hard", args["thresholds"])
    open_blocks = int((acts != 0).sum())
    assert 0 < open_blocks < batch * steps * modules // 2
    assert last_candidate_blocks() == open_blocks
    args["w_h"].requires_grad_()
    _, acts_grad = call(gated_leaky_rnn, args, "hard", args["thresholds"])
    assert torch.equal(acts_grad, acts)
    assert last_candidate_blocks() == batch * steps * modules  # the straight-through gradient reads them all
    # Without a gate and with waves that need no gradient, training skips too.
    states, _ = call(gated_leaky_rnn, args, "soft", 0.5, gated=False)
    assert states.requires_grad and last_candidate_blocks() == int((args["waves"] != 0).sum()) * batch


@pytest.mark.parametrize("waves,inputs,bias", [("shared", 1, False), ("per_sample", 3, True)])
def test_gradcheck_soft_every_input_float64(waves, inputs, bias):
    args = make(3, 5, inputs, 8, 2, F64, waves, seed=8, bias=bias)
    names = [n for n in (*NAMES, "waves") if args[n] is not None]

    def f(*tensors):
        a = {**args, **dict(zip(names, tensors))}
        states, acts = gated_leaky_rnn(a["x"], a["w_x"], a["bias"], a["w_h"], a["h0"], a["waves"], a["gate_x"],
                                       a["gate_bias"], a["gate_h"], "soft", 0.5)
        return states, acts

    inputs = tuple(args[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)
    assert last_candidate_blocks() == 3 * 5 * 2


def test_gradcheck_truncated_every_input_float64():
    """The truncated gate's exact gradient (0 where shut) against finite differences: no input sits within
    eps of a threshold, so the cut never moves under a perturbation."""
    args = make(3, 6, 2, 8, 2, F64, None, seed=9)
    names = list(NAMES)

    def f(*tensors):
        a = {**args, **dict(zip(names, tensors))}
        return gated_leaky_rnn(a["x"], a["w_x"], a["bias"], a["w_h"], a["h0"], None, a["gate_x"], a["gate_bias"],
                               a["gate_h"], "truncated", 0.45)

    inputs = tuple(args[n].clone().requires_grad_() for n in names)
    acts = f(*inputs)[1]
    assert 0 < (acts == 0).float().mean() < 1  # both open and shut entries
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)
    assert last_candidate_blocks() == int((acts != 0).sum())  # only the open ones


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("thresholds", [0.6, "tensor"])
@pytest.mark.parametrize("waves", [None, "shared", "per_sample"])
@pytest.mark.parametrize("shape", [0, 3])
def test_truncated_support_matches_the_reference(dtype, thresholds, waves, shape):
    """With a support, values are the truncated gate's and every gradient the reference's: the shut
    entries within the support pass their gate the open gradient. The forward computes the candidates
    of the open entries and of the shut ones within the support, and no others (waves without a
    gradient; with one, every candidate)."""
    *sizes, bias = SHAPES[shape]
    args = make(*sizes, dtype, waves, seed=20 + shape, bias=bias)
    thr = args["thresholds"] if thresholds == "tensor" else thresholds
    support = 0.25
    got = values_and_grads(gated_leaky_rnn, args, "truncated", thr, support=support)
    want = values_and_grads(gated_leaky_rnn_reference, args, "truncated", thr, support=support)
    assert_matches(got, want, TOL[dtype])
    assert torch.equal(got[1] == 0, want[1] == 0)
    g = gate_values(args, want[0])
    cut = torch.as_tensor(thr, dtype=dtype).expand_as(g)
    within = (g <= cut) & (g > cut - support)
    assert within.any() and (g <= cut - support).any() and (g > cut).any()  # every kind of entry occurs
    if waves is None:
        assert last_candidate_blocks() == int(((got[1] != 0) | within).sum())
    exact = values_and_grads(gated_leaky_rnn, args, "truncated", thr)
    assert not torch.allclose(got[2]["gate_bias"], exact[2]["gate_bias"])  # the support changes the gate's gradient
    assert torch.equal(got[1] == 0, exact[1] == 0)  # and nothing of the values
    assert_close_rel(got[0], exact[0], TOL[dtype])
    assert_close_rel(got[1], exact[1], TOL[dtype])


@pytest.mark.parametrize("waves", ["shared", "per_sample"])
def test_truncated_support_computes_no_candidate_off_the_clocks_ticks(waves):
    """Under a frozen clock with exact zeros (a binary one, no gradient for the waves), a shut entry within
    the support but off its module's tick needs no candidate: the wave multiplies its pseudo-derivative too.
    The candidates computed are the open entries and those within the support on a tick; values and every
    gradient stay the reference's."""
    args = make(4, 12, 2, 8, 2, F64, waves, seed=31)
    ticks = (torch.arange(12)[:, None] % torch.tensor([1, 3]) == 0).to(F64)  # module 0 every step, module 1 every 3rd
    kept = torch.rand(4, 1, 1, generator=torch.Generator().manual_seed(5)) > 0.3  # samples whose clock runs
    args["waves"] = ticks if waves == "shared" else ticks.expand(4, 12, 2) * kept
    thr, support = 0.55, 0.3
    leaves = [n for n in NAMES if n not in ("x", "h0")]

    def run(fn):
        params = {n: args[n].clone().requires_grad_() for n in leaves}
        a = {**args, **params}
        states, acts = call(fn, a, "truncated", thr, support=support)
        loss = (states * torch.linspace(-1, 1, states.shape[-1], dtype=F64)).sum() + 0.3 * acts.square().sum()
        return states.detach(), acts.detach(), dict(zip(leaves, torch.autograd.grad(loss, list(params.values()))))

    got, want = run(gated_leaky_rnn), run(gated_leaky_rnn_reference)
    computed = last_candidate_blocks()
    assert_matches(got, want, TOL[F64])
    g = gate_values(args, want[0])
    wave = args["waves"].expand_as(g)
    within = (g <= thr) & (g > thr - support)
    assert (within & (wave == 0)).any() and (within & (wave != 0)).any()  # both kinds occur
    assert computed == int(((want[1] != 0) | (within & (wave != 0))).sum())


def gate_values(args, states):
    """g_t = sigmoid(x_t G_x^T + g_b + h_{t-1} G_h^T) along the run whose states these are."""
    previous = torch.cat([args["h0"][:, None], states[:, :-1]], dim=1)
    return torch.sigmoid(args["x"] @ args["gate_x"].T + args["gate_bias"] + previous @ args["gate_h"].T)


def test_training_under_a_truncated_gate_computes_only_the_open_candidates():
    """With a gradient, a shut (sample, step, module) costs no candidate, forward or backward, and a shut
    module passes dL/dh_t through unchanged: W_h's rows of a module shut at every step get no gradient."""
    args = make(6, 12, 3, 32, 4, F64, None, seed=10)
    args["gate_bias"] = torch.tensor([-40.0, 0.0, 0.0, 0.0], dtype=F64)  # module 0: g ~ 4e-18, always shut
    got = values_and_grads(gated_leaky_rnn, args, "truncated", 0.3)
    acts = got[1]
    assert last_candidate_blocks() == int((acts != 0).sum()) < acts.numel()
    assert torch.equal(acts[..., 0], torch.zeros_like(acts[..., 0]))
    assert torch.equal(got[2]["w_h"][:8], torch.zeros(8, 32, dtype=F64))  # module 0's candidate never formed
    want = values_and_grads(gated_leaky_rnn_reference, args, "truncated", 0.3)
    assert_matches(got, want, TOL[F64])


NO_GATE = {"gate_x": None, "gate_bias": None, "gate_h": None}


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(gate_h=a["gate_h"][:, :-1].contiguous()), "gate_h has shape"),
    (lambda a: a.update(gate_x=a["gate_x"].double()), "gate_x is Double but x is Float"),
    (lambda a: a.update(w_x=a["w_x"][:, :2].contiguous()), "w_x has shape"),
    (lambda a: a.update(bias=a["bias"][:-1]), "bias has shape"),
    (lambda a: a.update(gate_bias=None), "gate_x, gate_bias and gate_h come together"),
    (lambda a: a.update(waves=torch.rand(3, 4)), "waves has shape"),
    (lambda a: a.update(h0=torch.zeros(2, 32)), "h0 has shape"),
    (lambda a: a.update(thresholds=torch.rand(5, 13)), "thresholds has shape"),
    (lambda a: a.update(x=a["x"].half(), **NO_GATE, thresholds=None), "float32 or float64 only"),
    (lambda a: a.update(**NO_GATE, waves=None, thresholds=None), "give waves, an event gate, or both"),
])
def test_bad_input_is_one_clear_line(change, message, cpu_capability):  # noqa: F811
    once(cpu_capability)
    args = make(5, 13, 3, 32, 4, F32, "shared")
    change(args)
    with pytest.raises(RuntimeError, match=message) as err:
        cpu.extension().gated_forward(*kernel_inputs(args), False, 0.0, False, False, False)
    assert "\n" not in str(err.value)


def once(capability):
    """Tests that do not depend on the kernels' capability run under the best one only."""
    if capability != ops.cpu_capabilities()[-1]:
        pytest.skip("independent of the CPU capability: runs once, under the best")


def test_unsupported_dtype_falls_back_to_the_reference(cpu_capability):  # noqa: F811
    once(cpu_capability)
    args = {k: (v.to(torch.bfloat16) if v is not None else v) for k, v in make(2, 4, 2, 8, 2, F32, None).items()}
    before = last_candidate_blocks()
    states, acts = call(gated_leaky_rnn, args, "soft", 0.5)
    want_states, want_acts = call(gated_leaky_rnn_reference, args, "soft", 0.5)
    assert torch.equal(states, want_states) and torch.equal(acts, want_acts)
    assert last_candidate_blocks() == before  # the kernels did not run


def test_training_run_is_the_same_with_and_without_the_fused_core(tmp_path, cpu_capability):  # noqa: F811
    """A short hard-gate run from the CLI: the fused core and HRNN_DISABLE_FUSED=1 (the reference loop)
    give the same validation and test losses up to float32 rounding."""
    once(cpu_capability)
    results = []
    for disable in (False, True):
        run_dir = tmp_path / f"run_{int(disable)}"
        env = {"HRNN_DISABLE_FUSED": "1"} if disable else {}
        if not disable:
            env = {k: v for k, v in os.environ.items() if k != "HRNN_DISABLE_FUSED"}
        run_cli([*TINY, "task=adding", "task.seq_len=12", "model.activation=event", "model.gate=hard",
                 "model.gate_bias=0", "model.gate_threshold=0.4", "trainer.steps=6", "trainer.eval_every=3",
                 "trainer.num_threads=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env)
        results.append(read_metrics(run_dir))
    fused_run, loop_run = results
    assert fused_run["cpu_kernels"] != loop_run["cpu_kernels"]  # the two paths really differed
    assert 0 < fused_run["test"]["update_fraction"] < 1
    for got, want in zip(fused_run["history"], loop_run["history"]):
        assert got["step"] == want["step"]
        assert got["val_update_fraction"] == want["val_update_fraction"]
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)
    assert fused_run["test"]["loss"] == pytest.approx(loop_run["test"]["loss"], rel=1e-4)


def test_soft_gate_is_the_sigmoid_of_its_logit_across_the_float_range():
    """The kernel's vector sigmoid (vexp, float) against torch.sigmoid, from -100 to 100: relative
    error below 1e-6 where the value is a normal float, and at most 3e-39 below that."""
    args = make(4, 3, 2, 128, 8, F32, None, seed=12)
    args["gate_x"].zero_()
    args["gate_h"].zero_()
    args["gate_bias"] = torch.tensor([-100.0, -87.0, -20.0, -0.7, 0.0, 3.0, 17.0, 100.0])
    with torch.no_grad():
        _, acts = call(gated_leaky_rnn, args, "soft", 0.5)
    want = torch.sigmoid(args["gate_bias"]).expand_as(acts)
    torch.testing.assert_close(acts, want, rtol=1e-6, atol=3e-39)
