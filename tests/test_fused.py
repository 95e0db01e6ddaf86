"""The fused recurrent core against the reference loop, under every CPU capability.

The compiled kernels must agree with `leaky_scan_reference` in values and in every gradient
(u, w_h, waves, h0) to 1e-5 relative in float32, and `leaky_rnn` (projection fused in) with
`leaky_rnn_reference` in x, W_x and b too, and pass gradcheck in float64 (the kernels
themselves run in double for that, not a fallback). Every test here runs once per CPU
capability this machine executes (default, avx2, avx512: tests/test_cpu_dispatch.py checks
that none was left out). No timing assertions here: see scripts/bench/bench.py.
"""
import logging

import pytest
import torch

from hrnn import ops
from hrnn.ops import cpu, dispatch, leaky_rnn, leaky_rnn_reference, leaky_scan, leaky_scan_reference
from hrnn.ops.cpu import is_hard

needs_ext = pytest.mark.skipif(not ops.fused_available(), reason=str(ops.fused_unavailable_reason()))


@pytest.fixture(autouse=True, params=ops.cpu_capabilities() or ["no extension"])
def cpu_capability(request):
    """Run the test under one CPU capability's kernels, then restore the one in use."""
    if not ops.fused_available():
        yield None
        return
    before = ops.cpu_capability()
    ops.set_cpu_capability(request.param)
    yield request.param
    ops.set_cpu_capability(before)


@pytest.fixture
def without_kernels(monkeypatch):
    """The C++ kernels count as missing (the reference loop runs), the fallback's line not yet said."""
    monkeypatch.setattr(dispatch, "said", set())
    with ops.kernels_hidden("cpu", "test: extension hidden"):
        yield


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
    assert cpu.supports(u, w_h, waves, h0) is None  # the double kernels, not the fallback
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


def test_fallback_is_identical_and_says_so_once(without_kernels, caplog):
    inputs = make_inputs(3, 12, 16, 2, hard=False, masked=False)
    grad_out = torch.randn(3, 12, 16)
    with caplog.at_level(logging.WARNING, logger="hrnn.ops.dispatch"):
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
    assert cpu.supports(*inputs) is not None
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
    # Not bit for bit: w_h is masked (zero blocks), and the no-grad path skips idle modules, so its
    # product blocks have other shapes than the training path's, and short blocks split their sums
    # (kernels.cpp fwd_block); tests/test_block_sparse.py checks last_only against the full no-grad path exactly.
    assert_close_rel(out, leaky_scan(u, w_h, waves, h0).detach()[:, -1], 1e-6)


def test_last_only_fallback_is_identical(without_kernels):
    """The pure PyTorch loop gives the same final state and gradients with last_only."""
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
def test_fused_and_fallback_last_only_agree(request, fused_path):
    """Both paths (kernels and loop) give the same last state as the reference."""
    if not fused_path:
        request.getfixturevalue("without_kernels")
    elif not ops.fused_available():
        pytest.skip(str(ops.fused_unavailable_reason()))
    inputs = make_inputs(4, 16, 32, 4, hard=True, masked=True)
    assert_close_rel(leaky_scan(*inputs, last_only=True), leaky_scan_reference(*inputs)[:, -1])


# ------------------------------------------------------------------ leaky_rnn: projection fused in
def make_rnn_inputs(batch, steps, hidden, n_modules, hard, masked, n_inputs, bias,
                    dtype=torch.float32, seed=0):
    """(x, w_x, bias or None, w_h, waves, h0) for `leaky_rnn`."""
    _, w_h, waves, h0 = make_inputs(batch, steps, hidden, n_modules, hard, masked, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(batch, steps, n_inputs, generator=gen, dtype=dtype)
    w_x = torch.randn(hidden, n_inputs, generator=gen, dtype=dtype) * 0.8 / n_inputs ** 0.5
    b = torch.randn(hidden, generator=gen, dtype=dtype) * 0.2 if bias else None
    return x, w_x, b, w_h, waves, h0


def rnn_grads(fn, inputs, grad_out, wrt):
    """run_with_grads that leaves a None bias alone."""
    xs = [None if x is None else x.detach().clone().requires_grad_(i in wrt) for i, x in enumerate(inputs)]
    out = fn(*xs)
    grads = torch.autograd.grad(out, [xs[i] for i in wrt], grad_out)
    return out.detach(), grads


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}M{}{}{}".format(
    *c[:4], "hard" if c[4] else "soft", "-masked" if c[5] else ""))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
def test_leaky_rnn_matches_reference_float32(case, bias, last_only):
    """Projection inside the loop: states and the gradients of x, W_x, b, W_h, waves, h0 equal
    F.linear + the reference loop to 1e-5; with the waves' grad off, hard waves skip."""
    batch, steps, hidden, n_modules, hard, masked = case
    n_inputs = 1 if hidden % 2 else 3
    inputs = make_rnn_inputs(batch, steps, hidden, n_modules, hard, masked, n_inputs, bias)
    shape = (batch, hidden) if last_only else (batch, steps, hidden)
    grad_out = torch.randn(*shape, generator=torch.Generator().manual_seed(7))

    def reference(*a):
        states = leaky_rnn_reference(*a)
        return states[:, -1] if last_only else states

    params = [0, 1, 5] + ([2] if bias else [])
    for wrt in ([*params, 3, 4], [*params, 3]):  # waves with and without grad
        want, want_grads = rnn_grads(reference, inputs, grad_out, wrt)
        for skip in (None, False):
            got, got_grads = rnn_grads(
                lambda *a: leaky_rnn(*a, skip_inactive=skip, last_only=last_only), inputs, grad_out, wrt)
            assert got.shape == shape
            assert_close_rel(got, want)
            for g, w in zip(got_grads, want_grads):
                assert_close_rel(g, w)


@needs_ext
@pytest.mark.parametrize("hard", [False, True])
def test_leaky_rnn_gradcheck_float64(hard, one_thread):
    x, w_x, b, w_h, waves, h0 = make_rnn_inputs(3, 7, 8, 2, hard, hard, 2, True, dtype=torch.float64)
    assert cpu.supports(x, w_x, b, w_h, waves, h0) is None  # the double kernels, not the fallback
    args = [t.clone().requires_grad_() for t in (x, w_x, b, w_h, waves, h0)]
    assert torch.autograd.gradcheck(lambda *a: leaky_rnn(*a), args)
    assert torch.autograd.gradcheck(lambda *a: leaky_rnn(*a, last_only=True), args)
    # waves without grad: hard waves take the skipping forward and backward
    args = [t.clone().requires_grad_() for t in (x, w_x, b, w_h, h0)]
    assert torch.autograd.gradcheck(
        lambda x_, wx_, b_, wh_, h_: leaky_rnn(x_, wx_, b_, wh_, waves, h_, skip_inactive=hard), args)
    assert torch.autograd.gradcheck(
        lambda x_, wx_, b_, wh_, h_: leaky_rnn(x_, wx_, b_, wh_, waves, h_, last_only=True), args)


@needs_ext
def test_leaky_rnn_hard_waves_hold_state_exactly():
    """a = 0 keeps the state bit-for-bit on the skipping path too (nothing computed there)."""
    x, w_x, b, w_h, waves, h0 = make_rnn_inputs(3, 16, 32, 4, True, True, 2, True)
    for skip in (True, False):
        states = leaky_rnn(x, w_x, b, w_h, waves, h0, skip_inactive=skip)
        prev = torch.cat([h0[:, None], states[:, :-1]], dim=1)
        held = ~waves.repeat_interleave(8, dim=1).bool()[None].expand_as(states)
        assert held.any() and (~held).any()
        assert torch.equal(states[held], prev[held])


@needs_ext
def test_leaky_rnn_inference_threads_and_layout():
    """No-grad forward records nothing and equals the training forward; 1 and 2 threads give
    bit-identical states; a non-contiguous x gives the same result."""
    inputs = make_rnn_inputs(9, 20, 32, 4, False, False, 3, True)
    req = [t.clone().requires_grad_() for t in inputs]
    with torch.no_grad():
        out = leaky_rnn(*req)
    assert out.grad_fn is None
    assert torch.equal(out, leaky_rnn(*req).detach())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = leaky_rnn(*inputs)
        torch.set_num_threads(2)
        two = leaky_rnn(*inputs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    x = inputs[0]
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_nc.is_contiguous()
    assert torch.equal(leaky_rnn(x_nc, *inputs[1:]), one)


def test_leaky_rnn_fallback_is_the_definition(without_kernels, caplog):
    """Without the kernels: F.linear then the PyTorch loop, identical to the reference, said once."""
    inputs = make_rnn_inputs(3, 12, 16, 2, False, False, 2, True)
    grad_out = torch.randn(3, 12, 16)
    wrt = [0, 1, 2, 3, 4, 5]
    with caplog.at_level(logging.WARNING, logger="hrnn.ops.dispatch"):
        got, got_grads = rnn_grads(leaky_rnn, inputs, grad_out, wrt)
        leaky_rnn(*inputs)
    want, want_grads = rnn_grads(leaky_rnn_reference, inputs, grad_out, wrt)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    assert len([r for r in caplog.records if "pure PyTorch" in r.getMessage()]) == 1


def test_leaky_rnn_rejects_mismatched_projection():
    x, w_x, b, w_h, waves, h0 = make_rnn_inputs(2, 5, 8, 2, False, False, 3, True)
    with pytest.raises(ValueError, match=r"w_x \(8, 2\)"):
        leaky_rnn(x, w_x[:, :2], b, w_h, waves, h0)
    with pytest.raises(ValueError, match=r"bias \(7,\)"):
        leaky_rnn(x, w_x, b[:7], w_h, waves, h0)
    with pytest.raises(ValueError, match="waves has shape"):
        leaky_rnn(x, w_x, b, w_h, waves[:4], h0)
