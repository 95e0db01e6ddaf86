"""Both fused cores skip the zero blocks of W_h, and evaluate a last-state readout without (B, T, H) writes.

Zero blocks (module i does not read module j: learned connectivity's hard gates in evaluation, the
slow-to-fast mask) are found by the bindings in the W_h they are given; the forward's products then
run only over the nonzero blocks. Checked here, under every CPU capability (test_fused's autouse
fixture), in float32 and float64, for several block masks: values (and, where a gradient runs, every
gradient) against the reference loops; that a zero block really is skipped (an infinite state of a
module nobody reads would otherwise turn every product into NaN); and that the no-grad last_only
path (the state kept in place, nothing of size (B, T, H) written) gives exactly the last state of
the full path, with closed modules holding their state bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from test_fused import cpu_capability  # noqa: F401  (autouse: every capability)
from test_fused import assert_close_rel
from test_gated_fused import TOL, call, make, values_and_grads

from hrnn import ops
from hrnn.models.recurrent import expand_blocks, slow_to_fast_modules
from hrnn.ops import gated_leaky_rnn, gated_leaky_rnn_reference, last_candidate_blocks, leaky_rnn, leaky_rnn_reference

pytestmark = pytest.mark.skipif(not ops.fused_available(), reason=str(ops.fused_unavailable_reason()))

F32, F64 = torch.float32, torch.float64


def block_mask(kind: str, n_modules: int) -> torch.Tensor:
    """(M, M) 0/1: which module reads which (row i reads column j)."""
    if kind == "none_zero":
        return torch.ones(n_modules, n_modules)
    if kind == "some_zero":
        mask = (torch.rand(n_modules, n_modules, generator=torch.Generator().manual_seed(3)) < 0.5).float()
        mask.fill_diagonal_(1)
        mask[0, -1] = 0
        return mask
    if kind == "row_zero":  # module 1 reads nothing: its candidate is tanh(u) alone
        mask = torch.ones(n_modules, n_modules)
        mask[1] = 0
        return mask
    if kind == "all_zero":
        return torch.zeros(n_modules, n_modules)
    if kind == "clockwork":  # Koutnik et al.'s slow-to-fast blocks, modules fast to slow
        return slow_to_fast_modules([float(m) for m in range(n_modules)])
    raise ValueError(kind)


MASKS = ("none_zero", "some_zero", "row_zero", "all_zero", "clockwork")
SIZES = [(5, 9, 3, 32, 4), (7, 6, 2, 128, 8)]  # B, T, I, H, M: modules of 8 and 16 units


def clock_inputs(batch, steps, inputs, hidden, n_modules, dtype, mask, hard):
    gen = torch.Generator().manual_seed(hidden + n_modules)
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=gen, dtype=dtype) * scale  # noqa: E731
    w_h = r(hidden, hidden, scale=1.5 / hidden ** 0.5) * expand_blocks(block_mask(mask, n_modules), hidden).to(dtype)
    if hard:  # periods 2^m
        waves = (torch.arange(steps)[:, None] % (2 ** torch.arange(n_modules))[None] == 0).to(dtype)
    else:
        waves = torch.rand(steps, n_modules, generator=gen, dtype=dtype)
    return r(batch, steps, inputs), r(hidden, inputs, scale=0.7), r(hidden, scale=0.1), w_h, waves, r(batch, hidden)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("size", range(len(SIZES)))
@pytest.mark.parametrize("hard", [False, True])
def test_clock_core_no_grad_with_zero_blocks_matches_the_reference(dtype, mask, size, hard):
    x, w_x, bias, w_h, waves, h0 = clock_inputs(*SIZES[size], dtype, mask, hard)
    want = leaky_rnn_reference(x, w_x, bias, w_h, waves, h0)
    with torch.no_grad():
        states = leaky_rnn(x, w_x, bias, w_h, waves, h0)
        last = leaky_rnn(x, w_x, bias, w_h, waves, h0, last_only=True)
    tol = TOL[dtype] / 2
    assert_close_rel(states, want, tol)
    assert last.shape == h0.shape
    assert torch.equal(last, states[:, -1])  # the in-cache last_only path: the same operations


@pytest.mark.parametrize("mask", ["some_zero", "clockwork"])
def test_clock_core_training_with_zero_blocks_matches_every_gradient(mask):
    """The forward skips zero blocks with a gradient too (its candidates are kept for the dense backward)."""
    args = clock_inputs(4, 7, 2, 32, 4, F64, mask, hard=False)
    leaves = [a.clone().requires_grad_() for a in args]
    weights = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = leaky_rnn(*leaves)
    got_grads = torch.autograd.grad((got * weights).sum(), leaves)
    want = leaky_rnn_reference(*leaves)
    want_grads = torch.autograd.grad((want * weights).sum(), leaves)
    assert_close_rel(got.detach(), want.detach(), 1e-12)
    for g, w in zip(got_grads, want_grads):
        assert_close_rel(g, w, 1e-12)


def unread_module_inputs(dtype, n_modules=4, hidden=32, dense=False):
    """A block mask where no module but module 0 itself reads module 0, and module 0 never updates:
    the Clockwork mask (10 of 16 blocks), or with dense=True every other block too (13 of 16)."""
    mask = torch.ones(n_modules, n_modules) if dense else block_mask("clockwork", n_modules)
    mask[1:, 0] = 0
    x, w_x, bias, w_h, waves, h0 = clock_inputs(3, 6, 2, hidden, n_modules, dtype, "none_zero", hard=True)
    w_h = w_h * expand_blocks(mask, hidden).to(dtype)
    waves[:, 0] = 0
    return x, w_x, bias, w_h, waves, h0, hidden // n_modules


@pytest.mark.parametrize("dtype", [F32, F64])
def test_clock_core_really_skips_zero_blocks(dtype, cpu_capability):  # noqa: F811
    """Module 0 holds an infinite state nobody else reads: a dense product would give 0 * inf = NaN in
    every module; skipping the zero blocks keeps the other modules exactly as with a finite state."""
    if cpu_capability == "default":
        pytest.skip("the portable capability's products are the BLAS's, dense (docs/performance.md)")
    x, w_x, bias, w_h, waves, h0, units = unread_module_inputs(dtype)
    poisoned = h0.clone()
    poisoned[:, :units] = float("inf")
    with torch.no_grad():
        for last_only in (False, True):
            got = leaky_rnn(x, w_x, bias, w_h, waves, poisoned, last_only=last_only)
            want = leaky_rnn(x, w_x, bias, w_h, waves, h0, last_only=last_only)
            assert torch.isinf(got[..., :units]).all()  # held bit for bit
            assert torch.equal(got[..., units:], want[..., units:])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_clock_core_runs_dense_above_five_eighths_of_the_blocks(dtype, cpu_capability):  # noqa: F811
    """With 13 of 16 blocks nonzero the masked loops cost more than they save (docs/performance.md),
    so the clock core runs its dense products: the unread infinite state reaches every module."""
    x, w_x, bias, w_h, waves, h0, units = unread_module_inputs(dtype, dense=True)
    poisoned = h0.clone()
    poisoned[:, :units] = float("inf")
    with torch.no_grad():
        got = leaky_rnn(x, w_x, bias, w_h, waves, poisoned)
    assert torch.isnan(got[:, 1:, units:]).any()


def gated_args(size, dtype, mask, waves):
    batch, steps, inputs, hidden, n_modules = SIZES[size]
    args = make(batch, steps, inputs, hidden, n_modules, dtype, waves, seed=size)
    args["w_h"] = args["w_h"] * expand_blocks(block_mask(mask, n_modules), hidden).to(dtype)
    return args


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("size", range(len(SIZES)))
@pytest.mark.parametrize("mode", ["soft", "hard", "hard_scalar"])
def test_event_core_no_grad_with_zero_blocks_matches_the_reference(dtype, mask, size, mode):
    """hard_scalar: one threshold, compared with the logit in the kernel (no sigmoid under no_grad)."""
    args = gated_args(size, dtype, mask, "shared")
    thr = 0.5 if mode == "hard_scalar" else args["thresholds"]
    mode = mode.removesuffix("_scalar")
    want_states, want_acts = call(gated_leaky_rnn_reference, args, mode, thr)
    with torch.no_grad():
        states, acts = call(gated_leaky_rnn, args, mode, thr)
        last, last_acts = call(gated_leaky_rnn, args, mode, thr, last_only=True)
    if mode == "hard":
        assert torch.equal(acts, want_acts) and 0 < (acts != 0).float().mean() < 1
        assert last_candidate_blocks() == int((acts != 0).sum())  # closed modules skipped
    assert_close_rel(states, want_states, TOL[dtype])
    assert_close_rel(acts, want_acts, TOL[dtype])
    assert torch.equal(last, states[:, -1]) and torch.equal(last_acts, acts)


@pytest.mark.parametrize("mask", ["row_zero", "clockwork"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_event_core_training_with_zero_blocks_matches_every_gradient(mask, mode):
    args = gated_args(0, F64, mask, "per_sample")
    got = values_and_grads(gated_leaky_rnn, args, mode, args["thresholds"], last_only=True)
    want = values_and_grads(gated_leaky_rnn_reference, args, mode, args["thresholds"], last_only=True)
    for g, w in ((got[0], want[0]), (got[1], want[1]), *((got[2][k], want[2][k]) for k in want[2])):
        assert_close_rel(g, w, TOL[F64])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_event_core_really_skips_zero_blocks(dtype):
    """As for the clock core, with per-sample waves and no gate (the gate's G_h is dense: it would
    read the infinite state)."""
    x, w_x, bias, w_h, waves, h0, units = unread_module_inputs(dtype)
    waves = waves.expand(x.shape[0], *waves.shape).contiguous()
    poisoned = h0.clone()
    poisoned[:, :units] = float("inf")
    with torch.no_grad():
        for last_only in (False, True):
            got = gated_leaky_rnn(x, w_x, bias, w_h, poisoned, waves, None, None, None, "soft", 0.5, last_only)[0]
            want = gated_leaky_rnn(x, w_x, bias, w_h, h0, waves, None, None, None, "soft", 0.5, last_only)[0]
            assert torch.isinf(got[..., :units]).all()
            assert torch.equal(got[..., units:], want[..., units:])


@pytest.mark.parametrize("threshold", ["tensor", 0.5])
def test_event_core_last_only_holds_closed_modules_bit_for_bit(threshold):
    """No-grad last_only under hard gates: a module never opened keeps h0 exactly; one opened last at
    step s keeps the full path's state of step s exactly."""
    args = make(6, 12, 3, 32, 4, F64, None, seed=9)
    thr = args["thresholds"].clone()
    thr[0, :, 2] = 2.0  # sample 0, module 2: never open
    thr[1, :, 1] = -1.0  # sample 1, module 1: open up to step 4, closed after
    thr[1, 5:, 1] = 2.0
    if threshold != "tensor":  # the scalar threshold's path (no sigmoid); only the tensor forces
        args["gate_bias"] = args["gate_bias"] - 50.0  # every gate shut: all modules hold h0
        thr = threshold
    with torch.no_grad():
        states, acts = call(gated_leaky_rnn, args, "hard", thr)
        last, _ = call(gated_leaky_rnn, args, "hard", thr, last_only=True)
    assert torch.equal(last, states[:, -1])
    if threshold == "tensor":
        assert not acts[0, :, 2].any() and acts[1, :5, 1].all() and not acts[1, 5:, 1].any()
        assert torch.equal(last[0, 16:24], args["h0"][0, 16:24])
        assert torch.equal(last[1, 8:16], states[1, 4, 8:16])
    else:
        assert not acts.any() and torch.equal(last, args["h0"])


@pytest.mark.parametrize("threshold", [-0.5, 0.0, 1.0, 1.5])
def test_event_core_scalar_thresholds_outside_the_open_interval(threshold):
    """The no-grad kernel compares logits with logit(threshold): below 0 every gate opens, at or above 1
    every gate stays shut, as sigmoid(logit) > threshold says."""
    args = make(4, 6, 2, 16, 4, F64, None, seed=11)
    with torch.no_grad():
        _, acts = call(gated_leaky_rnn, args, "hard", threshold)
    _, want = call(gated_leaky_rnn_reference, args, "hard", threshold)
    assert torch.equal(acts, want) and bool(acts.all()) == (threshold <= 0) and bool(acts.any()) == (threshold < 1)
