"""The fused recurrent core against the reference loop (issue 7).

The compiled kernels must agree with `leaky_scan_reference` in values and in every gradient
(u, w_h, waves, h0) to 1e-5 relative in float32, and pass gradcheck in float64 (the kernels
themselves run in double for that, not a fallback). No timing assertions here: see
scripts/bench.py.
"""
import logging
import os

import pytest
import torch

from hrnn import fused
from hrnn.core import is_hard, leaky_scan, leaky_scan_reference

needs_ext = pytest.mark.skipif(not fused.available(), reason=str(fused.unavailable_reason()))


@pytest.mark.skipif(not os.environ.get("HRNN_REQUIRE_FUSED"), reason="set HRNN_REQUIRE_FUSED=1 to require it")
def test_extension_is_built_when_required():
    """CI sets HRNN_REQUIRE_FUSED=1 so a broken build fails loudly instead of skipping."""
    assert fused.available(), fused.unavailable_reason()


def make_inputs(batch, steps, hidden, n_modules, hard, masked, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, steps, hidden, generator=gen, dtype=dtype) * 0.7
    w_h = torch.randn(hidden, hidden, generator=gen, dtype=dtype) * 1.2 / hidden ** 0.5
    if masked:  # block upper-triangular, like Clockwork RNN connectivity
        size = hidden // n_modules
        blocks = torch.triu(torch.ones(n_modules, n_modules, dtype=dtype))
        w_h = w_h * blocks.repeat_interleave(size, 0).repeat_interleave(size, 1)
    if hard:  # periods 2^i
        periods = 2 ** torch.arange(n_modules)
        waves = (torch.arange(steps)[:, None] % periods[None, :] == 0).to(dtype)
    else:
        waves = torch.rand(steps, n_modules, generator=gen, dtype=dtype)
    h0 = torch.randn(batch, hidden, generator=gen, dtype=dtype) * 0.3
    return u, w_h, waves, h0


def rel_err(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_close_rel(got, want, tol=1e-5):
    """Norm-relative error below tol, and no element off by more than tol * max|want|."""
    assert got.shape == want.shape
    assert rel_err(got, want) < tol, rel_err(got, want)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def run_with_grads(fn, inputs, grad_out, wrt):
    xs = [x.detach().clone().requires_grad_(i in wrt) for i, x in enumerate(inputs)]
    out = fn(*xs)
    grads = torch.autograd.grad(out, [xs[i] for i in wrt], grad_out)
    return out.detach(), grads


CASES = [
    # batch, steps, hidden, modules, hard, masked
    (6, 40, 32, 4, False, False),
    (6, 40, 32, 4, True, True),
    (5, 30, 128, 8, True, True),
    (5, 30, 128, 8, False, True),
    (7, 25, 24, 3, True, False),   # modules of 8 units: tiles narrower than a vector
    (3, 20, 12, 1, False, False),  # one module; H not a multiple of 8
    (4, 15, 7, 7, True, False),    # one unit per module: scalar tiles
    (1, 30, 64, 16, True, True),   # batch of one; 16 modules of 4 units
]


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}M{}{}{}".format(
    *c[:4], "hard" if c[4] else "soft", "-masked" if c[5] else ""))
@pytest.mark.parametrize("skip", [None, False])
def test_matches_reference_float32(case, skip):
    batch, steps, hidden, n_modules, hard, masked = case
    inputs = make_inputs(batch, steps, hidden, n_modules, hard, masked)
    grad_out = torch.randn(batch, steps, hidden, generator=torch.Generator().manual_seed(1))
    want, want_grads = run_with_grads(leaky_scan_reference, inputs, grad_out, [0, 1, 2, 3])
    got, got_grads = run_with_grads(lambda *x: leaky_scan(*x, skip_inactive=skip), inputs,
                                    grad_out, [0, 1, 2, 3])
    assert_close_rel(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_close_rel(g, w)


@needs_ext
@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=str)
def test_hard_skip_path_matches_reference(case):
    """Waves without grad: the skipping kernels run; loss read from the last state only."""
    batch, steps, hidden, n_modules, hard, masked = case
    inputs = make_inputs(batch, steps, hidden, n_modules, hard, masked)
    assert is_hard(inputs[2])
    grad_out = torch.zeros(batch, steps, hidden)
    grad_out[:, -1] = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(2))
    want, want_grads = run_with_grads(leaky_scan_reference, inputs, grad_out, [0, 1, 3])
    for skip in (None, True, False):
        got, got_grads = run_with_grads(lambda *x: leaky_scan(*x, skip_inactive=skip), inputs,
                                        grad_out, [0, 1, 3])
        assert_close_rel(got, want)
        for g, w in zip(got_grads, want_grads):
            assert_close_rel(g, w)


@needs_ext
def test_hard_waves_hold_and_replace_exactly():
    """a = 0 keeps the state bit-for-bit; a = 1 writes the candidate itself."""
    u, w_h, waves, h0 = make_inputs(3, 12, 32, 4, hard=True, masked=True)
    for skip in (True, False):
        states = leaky_scan(u, w_h, waves, h0, skip_inactive=skip)
        prev = torch.cat([h0[:, None], states[:, :-1]], dim=1)
        a = waves.repeat_interleave(8, dim=1).bool()
        held = ~a[None].expand_as(states)
        assert torch.equal(states[held], prev[held])
        candidates = torch.tanh(u + prev @ w_h.t())
        torch.testing.assert_close(states[~held], candidates[~held], rtol=1e-6, atol=1e-6)


@pytest.fixture
def one_thread():
    """gradcheck makes hundreds of tiny calls: one thread keeps them off the (shared) pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@needs_ext
@pytest.mark.parametrize("hard", [False, True])
def test_gradcheck_float64_runs_the_kernels(hard, one_thread):
    u, w_h, waves, h0 = make_inputs(3, 6, 8, 2, hard=hard, masked=hard, dtype=torch.float64)
    assert fused.supports(u, w_h, waves, h0) is None  # the double kernels, not the fallback
    args = [x.clone().requires_grad_() for x in (u, w_h, waves, h0)]
    assert torch.autograd.gradcheck(lambda *x: leaky_scan(*x), args)


@needs_ext
def test_gradcheck_float64_skip_path(one_thread):
    """Hard waves that need no grad: the skipping forward and backward, in double."""
    u, w_h, waves, h0 = make_inputs(2, 9, 16, 4, hard=True, masked=True, dtype=torch.float64)
    args = [x.clone().requires_grad_() for x in (u, w_h, h0)]
    assert torch.autograd.gradcheck(
        lambda u_, w_, h_: leaky_scan(u_, w_, waves, h_, skip_inactive=True), args)


@needs_ext
def test_thread_counts_agree():
    inputs = make_inputs(9, 20, 32, 4, hard=False, masked=False)
    grad_out = torch.randn(9, 20, 32, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(leaky_scan, inputs, grad_out, [0, 1, 2, 3])
        torch.set_num_threads(2)
        two = run_with_grads(leaky_scan, inputs, grad_out, [0, 1, 2, 3])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0])  # rows are independent: forward is bit-identical
    for g1, g2 in zip(one[1], two[1]):
        assert_close_rel(g1, g2, tol=1e-6)


@needs_ext
def test_inference_forward_matches_and_records_nothing():
    u, w_h, waves, h0 = (x.requires_grad_() for x in make_inputs(4, 20, 32, 4, False, False))
    with torch.no_grad():
        out = leaky_scan(u, w_h, waves, h0)
    assert out.grad_fn is None
    assert torch.equal(out, leaky_scan(u, w_h, waves, h0).detach())
    plain = leaky_scan(*(x.detach() for x in (u, w_h, waves, h0)))
    assert plain.grad_fn is None and torch.equal(out, plain)


@needs_ext
def test_reused_buffers_never_alias_live_outputs():
    inputs = make_inputs(4, 20, 32, 4, hard=False, masked=False)
    first = leaky_scan(*inputs)
    kept = first.clone()
    del first
    second = leaky_scan(*inputs)  # may reuse the block `first` lived in
    third = leaky_scan(*(x * 0.5 for x in inputs))
    assert torch.equal(second, kept)
    assert not torch.equal(third, second)
    assert torch.equal(second, kept)


@needs_ext
def test_non_contiguous_inputs():
    u, w_h, waves, h0 = make_inputs(4, 10, 16, 2, hard=False, masked=False)
    u_nc = u.transpose(0, 1).contiguous().transpose(0, 1)
    assert not u_nc.is_contiguous()
    assert_close_rel(leaky_scan(u_nc, w_h.t().contiguous().t(), waves, h0),
                     leaky_scan_reference(u, w_h, waves, h0))


def test_fallback_is_identical_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(fused, "_C", None)
    monkeypatch.setattr(fused, "_REASON", "test: extension hidden")
    monkeypatch.setattr(fused, "_warned", False)
    inputs = make_inputs(3, 12, 16, 2, hard=False, masked=False)
    grad_out = torch.randn(3, 12, 16)
    with caplog.at_level(logging.WARNING, logger="hrnn.fused"):
        got, got_grads = run_with_grads(leaky_scan, inputs, grad_out, [0, 1, 2, 3])
        leaky_scan(*inputs)
        leaky_scan(*(x.to(torch.bfloat16) for x in inputs))  # another reason: still no new line
    want, want_grads = run_with_grads(leaky_scan_reference, inputs, grad_out, [0, 1, 2, 3])
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    assert len([r for r in caplog.records if "pure PyTorch" in r.getMessage()]) == 1


def test_unsupported_dtype_falls_back():
    inputs = [x.to(torch.bfloat16) for x in make_inputs(2, 5, 8, 2, hard=False, masked=False)]
    assert fused.supports(*inputs) is not None
    torch.testing.assert_close(leaky_scan(*inputs), leaky_scan_reference(*inputs))


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}M{}{}{}".format(
    *c[:4], "hard" if c[4] else "soft", "-masked" if c[5] else ""))
@pytest.mark.parametrize("skip", [None, False])
@pytest.mark.parametrize("waves_grad", [True, False])
def test_last_only_matches_reference(case, skip, waves_grad):
    """last_only=True: the final state (B, H) and every gradient equal the reference's
    `[:, -1]`; with the waves' grad off, hard waves take the skipping kernels."""
    batch, steps, hidden, n_modules, hard, masked = case
    inputs = make_inputs(batch, steps, hidden, n_modules, hard, masked)
    wrt = [0, 1, 2, 3] if waves_grad else [0, 1, 3]
    grad_last = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(4))
    want, want_grads = run_with_grads(lambda *x: leaky_scan_reference(*x)[:, -1], inputs,
                                      grad_last, wrt)
    got, got_grads = run_with_grads(
        lambda *x: leaky_scan(*x, skip_inactive=skip, last_only=True), inputs, grad_last, wrt)
    assert got.shape == (batch, hidden)
    assert_close_rel(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_close_rel(g, w)
    # The same op read at [:, -1] gives the same values and gradients as last_only.
    full, full_grads = run_with_grads(
        lambda *x: leaky_scan(*x, skip_inactive=skip)[:, -1], inputs, grad_last, wrt)
    assert torch.equal(got, full)
    for g, f in zip(got_grads, full_grads):
        assert_close_rel(g, f, tol=1e-6)


@needs_ext
@pytest.mark.parametrize("hard", [False, True])
def test_last_only_gradcheck_float64(hard, one_thread):
    u, w_h, waves, h0 = make_inputs(3, 7, 8, 2, hard=hard, masked=hard, dtype=torch.float64)
    args = [x.clone().requires_grad_() for x in (u, w_h, waves, h0)]
    assert torch.autograd.gradcheck(lambda *x: leaky_scan(*x, last_only=True), args)
    # waves without grad: hard waves take the skipping backward
    args = [x.clone().requires_grad_() for x in (u, w_h, h0)]
    assert torch.autograd.gradcheck(
        lambda u_, w_, h_: leaky_scan(u_, w_, waves, h_, last_only=True), args)


@needs_ext
def test_last_only_inference():
    u, w_h, waves, h0 = (x.requires_grad_() for x in make_inputs(4, 20, 32, 4, True, True))
    with torch.no_grad():
        out = leaky_scan(u, w_h, waves, h0, last_only=True)
    assert out.grad_fn is None and out.shape == (4, 32)
    assert torch.equal(out, leaky_scan(u, w_h, waves, h0).detach()[:, -1])


def test_last_only_fallback_is_identical(monkeypatch):
    """The pure PyTorch loop gives the same final state and gradients with last_only."""
    monkeypatch.setattr(fused, "_C", None)
    monkeypatch.setattr(fused, "_REASON", "test: extension hidden")
    monkeypatch.setattr(fused, "_warned", True)
    inputs = make_inputs(3, 12, 16, 2, hard=False, masked=False)
    grad_last = torch.randn(3, 16)
    got, got_grads = run_with_grads(lambda *x: leaky_scan(*x, last_only=True), inputs,
                                    grad_last, [0, 1, 2, 3])
    want, want_grads = run_with_grads(lambda *x: leaky_scan_reference(*x)[:, -1], inputs,
                                      grad_last, [0, 1, 2, 3])
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)


@pytest.mark.parametrize("fused_path", [True, False])
def test_fused_and_fallback_last_only_agree(monkeypatch, fused_path):
    """Both paths (kernels and loop) give the same last state as the reference."""
    if not fused_path:
        monkeypatch.setattr(fused, "_C", None)
        monkeypatch.setattr(fused, "_REASON", "test: extension hidden")
        monkeypatch.setattr(fused, "_warned", True)
    elif not fused.available():
        pytest.skip(str(fused.unavailable_reason()))
    inputs = make_inputs(4, 16, 32, 4, hard=True, masked=True)
    assert_close_rel(leaky_scan(*inputs, last_only=True), leaky_scan_reference(*inputs)[:, -1])


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
def test_input_projection_matches_linear(bias):
    """The pooled projection is F.linear's addmm: identical values, same gradients."""
    from hrnn.core import input_projection

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 9, 3, generator=gen)
    weight = torch.randn(16, 3, generator=gen)
    b = torch.randn(16, generator=gen) if bias else None
    inputs = [x, weight] + ([b] if bias else [])
    grad_out = torch.randn(4, 9, 16, generator=gen)
    wrt = list(range(len(inputs)))
    got, got_grads = run_with_grads(lambda *a: input_projection(*a, *([None] if not bias else [])),
                                    inputs, grad_out, wrt)
    want, want_grads = run_with_grads(lambda *a: torch.nn.functional.linear(*a), inputs, grad_out, wrt)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_close_rel(g, w, tol=1e-6)
    first = input_projection(x, weight, b)
    kept = first.clone()
    second = input_projection(x * 2, weight, b)  # a live output's block is never handed out
    assert torch.equal(first, kept) and not torch.equal(second, first)


@needs_ext
def test_input_projection_gradcheck_float64(one_thread):
    from hrnn.core import input_projection

    gen = torch.Generator().manual_seed(6)
    args = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()
            for s in ((2, 5, 3), (4, 3), (4,))]
    assert torch.autograd.gradcheck(input_projection, args)


def test_input_projection_falls_back_to_linear():
    from hrnn.core import input_projection

    x, weight = torch.randn(2, 5, 3, dtype=torch.bfloat16), torch.randn(4, 3, dtype=torch.bfloat16)
    assert torch.equal(input_projection(x, weight, None), torch.nn.functional.linear(x, weight))
