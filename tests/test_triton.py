"""The Triton kernels (the CUDA path) against the reference loop, on the CPU.

Triton's interpreter (TRITON_INTERPRET=1, set below before the kernels are defined) runs the
kernels on CPU tensors, so these tests need no GPU: the kernels' entry points in
hrnn.ops.gpu are called directly (hrnn.ops sends only CUDA tensors there). Values and every
gradient must equal `leaky_scan_reference` / `leaky_rnn_reference` to 1e-5 relative in ieee
mode, for the case matrix of the CPU kernels (tests/test_fused.py) plus a batch that needs
two programs. Triton is a test dependency (setup.cfg extra `test`): without it this module
fails to import, loudly. The interpreter computes tf32 and tf32x3 dots exactly, so their
accuracy is checked on a GPU (scripts/gpu/gpu_check.sh), not here; bf16 and bf16x3 are emulated
by rounding.
"""
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernels are defined
from hrnn.ops import gpu, gpu_kernels  # noqa: E402

if not gpu.INTERPRET:  # defined earlier in this process without the interpreter
    importlib.reload(gpu_kernels)
    importlib.reload(gpu)


def _restore_env():
    if _before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _before


_restore_env()  # the other test modules' tests (and their subprocesses) run without it

from conftest import TINY, compose_config  # noqa: E402
from hrnn import ops  # noqa: E402
from hrnn.config.schema import validate  # noqa: E402
from hrnn.errors import UserError  # noqa: E402
from hrnn.ops import dispatch, leaky_rnn_reference, leaky_scan_reference  # noqa: E402
from hrnn.train.loop import train  # noqa: E402
from test_fused import CASES, assert_close_rel, make_inputs, make_rnn_inputs, rnn_grads, run_with_grads  # noqa: E402

assert gpu.INTERPRET, gpu.unavailable_reason()


@pytest.fixture(autouse=True, scope="module")
def interpreter_env():
    """Triton also reads TRITON_INTERPRET at launch (lazy imports): set for this module's tests."""
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_env()


# The CPU kernels' matrix, plus 18 rows: two programs of 16, the second mostly padding.
TRITON_CASES = [*CASES, (18, 12, 16, 2, False, True)]


def case_id(c):
    return "B{}T{}H{}M{}{}{}".format(*c[:4], "hard" if c[4] else "soft", "-masked" if c[5] else "")


def scan(last_only, precision="ieee"):
    return lambda *a: gpu.leaky_scan(*a, last_only, precision)


def rnn(last_only, precision="ieee"):
    return lambda *a: gpu.leaky_rnn(*a, last_only, precision)


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
def test_scan_matches_reference(case, last_only):
    """u, W_h, waves, h0: values and gradients to 1e-5 (the waves' gradient on: the kernel's
    per-program da; test_rnn_matches_reference runs with it off)."""
    batch, steps, hidden, n_modules, hard, masked = case
    inputs = make_inputs(batch, steps, hidden, n_modules, hard, masked)
    assert gpu.supports(inputs[0], inputs[1], *inputs[2:]) is None
    shape = (batch, hidden) if last_only else (batch, steps, hidden)
    grad_out = torch.randn(*shape, generator=torch.Generator().manual_seed(1))

    def reference(*a):
        states = leaky_scan_reference(*a)
        return states[:, -1] if last_only else states

    want, want_grads = run_with_grads(reference, inputs, grad_out, [0, 1, 2, 3])
    got, got_grads = run_with_grads(scan(last_only), inputs, grad_out, [0, 1, 2, 3])
    assert got.shape == shape
    assert_close_rel(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_close_rel(g, w)


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
def test_rnn_matches_reference(case, bias, last_only):
    """x, W_x, b, W_h, h0 through the time-major projection and the kernels, the waves without a
    gradient (no da pass). At most 12 steps: the loop is the scan's, tested above at full
    length; the interpreter is slow."""
    batch, steps, hidden, n_modules, hard, masked = case
    steps = min(steps, 12)
    n_inputs = 1 if hidden % 2 else 3
    inputs = make_rnn_inputs(batch, steps, hidden, n_modules, hard, masked, n_inputs, bias)
    shape = (batch, hidden) if last_only else (batch, steps, hidden)
    grad_out = torch.randn(*shape, generator=torch.Generator().manual_seed(7))

    def reference(*a):
        states = leaky_rnn_reference(*a)
        return states[:, -1] if last_only else states

    wrt = [0, 1, 3, 5] + ([2] if bias else [])
    want, want_grads = rnn_grads(reference, inputs, grad_out, wrt)
    got, got_grads = rnn_grads(rnn(last_only), inputs, grad_out, wrt)
    assert got.shape == shape
    assert_close_rel(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_close_rel(g, w)


@pytest.mark.parametrize("hard", [False, True])
def test_gradcheck_float64(hard):
    """The kernels in double (ieee dots) pass gradcheck, all states and last only. fast_mode
    (random projections of the Jacobian) keeps the interpreter's calls few."""
    x, w_x, b, w_h, waves, h0 = make_rnn_inputs(3, 5, 8, 2, hard, hard, 2, True, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, w_x, b, w_h, waves, h0)]
    assert gpu.supports(x, w_h, w_x, b, waves, h0) is None
    for last_only in (False, True):
        assert torch.autograd.gradcheck(rnn(last_only), args, fast_mode=True)


def test_hard_waves_hold_and_replace_exactly():
    """a = 0 keeps the state bit-for-bit, a = 1 writes the candidate itself (torch.lerp's rule)."""
    u, w_h, waves, h0 = make_inputs(3, 12, 32, 4, hard=True, masked=True)
    states = gpu.leaky_scan(u, w_h, waves, h0, False, "ieee")
    prev = torch.cat([h0[:, None], states[:, :-1]], dim=1)
    held = ~waves.repeat_interleave(8, dim=1).bool()[None].expand_as(states)
    assert held.any() and (~held).any()
    assert torch.equal(states[held], prev[held])
    candidates = torch.tanh(u + prev @ w_h.t())
    torch.testing.assert_close(states[~held], candidates[~held], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("last_only", [False, True])
def test_inference_records_nothing_and_matches(last_only):
    """No grad needed: the forward-only launch (no candidates) gives the training forward's values."""
    inputs = make_rnn_inputs(5, 10, 32, 4, False, False, 3, True)
    with torch.no_grad():
        out = gpu.leaky_rnn(*inputs, last_only, "ieee")
    req = [t.clone().requires_grad_() for t in inputs]
    trained = gpu.leaky_rnn(*req, last_only, "ieee")
    assert out.grad_fn is None and trained.grad_fn is not None
    assert torch.equal(out, trained.detach())
    ref = leaky_rnn_reference(*inputs)
    assert_close_rel(out, ref[:, -1] if last_only else ref)


def test_strided_inputs_and_gradients():
    """A u that is a transposed view, and an incoming gradient without unit stride over H."""
    u, w_h, waves, h0 = make_inputs(4, 10, 16, 2, hard=False, masked=False)
    u_tm = u.transpose(0, 1).contiguous().transpose(0, 1)
    grad = torch.randn(4, 10, 16).transpose(1, 2).contiguous().transpose(1, 2)
    assert not u_tm.is_contiguous() and grad.stride(2) != 1
    want, want_grads = run_with_grads(leaky_scan_reference, (u, w_h, waves, h0), grad, [0, 1, 2, 3])
    got, got_grads = run_with_grads(scan(False), (u_tm, w_h, waves, h0), grad, [0, 1, 2, 3])
    assert_close_rel(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_close_rel(g, w)


def bf16(t):
    return t.to(torch.bfloat16).to(t.dtype)


def bf16_reference(u, w_h, waves, h0):
    """The bf16 mode's definition: both product operands rounded to bf16, everything else fp32."""
    a = waves.repeat_interleave(u.shape[2] // waves.shape[1], dim=1)
    h, states = h0, []
    for t in range(u.shape[1]):
        h = torch.lerp(h, torch.tanh(u[:, t] + bf16(h) @ bf16(w_h).t()), a[t])
        states.append(h)
    return torch.stack(states, dim=1)


def test_bf16_rounds_the_product_operands_only():
    """bf16: the forward equals a loop that rounds h and W_h before each product and keeps the
    state in fp32; it differs from ieee by bf16 rounding, not more. Gradients stay close to the
    exact ones (the backward's dz @ W_h also takes bf16 operands)."""
    inputs = make_inputs(6, 30, 32, 4, hard=False, masked=False)
    grad_out = torch.randn(6, 30, 32, generator=torch.Generator().manual_seed(5))
    got, got_grads = run_with_grads(scan(False, "bf16"), inputs, grad_out, [0, 1, 2, 3])
    assert_close_rel(got, bf16_reference(*inputs))
    exact, exact_grads = run_with_grads(leaky_scan_reference, inputs, grad_out, [0, 1, 2, 3])
    err = ((got - exact).norm() / exact.norm()).item()
    assert 1e-5 < err < 2e-2, err
    for g, w in zip(got_grads, exact_grads):
        assert 1e-6 < ((g - w).norm() / w.norm()).item() < 5e-2


def bf16_split(t):
    """t = hi + lo to 16 bits: hi the nearest bf16, lo the nearest bf16 to the rest (bf16x3's operands)."""
    hi = bf16(t)
    return hi, bf16(t - hi)


def bf16x3_reference(u, w_h, waves, h0):
    """The bf16x3 mode's definition: each product as the three bf16 products of its split operands,
    h_hi W_lo + h_lo W_hi + h_hi W_hi (h_lo W_lo, about 2^-16 of the product, left out), in float64."""
    a = waves.repeat_interleave(u.shape[2] // waves.shape[1], dim=1).double()
    w_hi, w_lo = (t.double() for t in bf16_split(w_h))
    h, states = h0.double(), []
    for t in range(u.shape[1]):
        h_hi, h_lo = (x.double() for x in bf16_split(h.float()))
        product = h_hi @ w_lo.t() + h_lo @ w_hi.t() + h_hi @ w_hi.t()
        h = torch.lerp(h, torch.tanh(u[:, t].double() + product), a[t])
        states.append(h)
    return torch.stack(states, dim=1)


@pytest.mark.parametrize("chains", [1, 3])
def test_bf16x3_is_three_bf16_products_of_split_operands(chains, monkeypatch):
    """bf16x3, with its three products in one accumulation or three: the forward equals the loop of
    bf16x3_reference to float32 rounding (tanh and sums in fp32), and it is within 1e-5 of ieee where bf16 is 1e-3 away;
    gradients likewise (the backward's dz W_h is bf16x3 too)."""
    monkeypatch.setitem(gpu.TUNING, "chains", chains)
    inputs = make_inputs(6, 30, 32, 4, hard=False, masked=False)
    grad_out = torch.randn(6, 30, 32, generator=torch.Generator().manual_seed(5))
    got, got_grads = run_with_grads(scan(False, "bf16x3"), inputs, grad_out, [0, 1, 2, 3])
    assert_close_rel(got.double(), bf16x3_reference(*inputs), 1e-5)  # a product term left out: 1e-3
    exact, exact_grads = run_with_grads(leaky_scan_reference, inputs, grad_out, [0, 1, 2, 3])
    rounded, _ = run_with_grads(scan(False, "bf16"), inputs, grad_out, [0, 1, 2, 3])
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(got, exact) < 1e-5 < 1e-4 < rel(rounded, exact)
    for g, w in zip(got_grads, exact_grads):
        assert rel(g, w) < 1e-4


def test_supports_says_why_not():
    u, w_h, waves, h0 = make_inputs(2, 4, 16, 2, hard=False, masked=False)
    assert gpu.supports(u, w_h, waves, h0) is None
    assert "float32/float64" in gpu.supports(*(t.to(torch.bfloat16) for t in (u, w_h, waves, h0)))
    big = torch.zeros(129, 129)
    assert "hidden size 129 > 128 in torch.float32" in gpu.supports(torch.zeros(2, 4, 129), big)
    assert gpu.supports(torch.zeros(2, 4, 128), torch.zeros(128, 128)) is None
    assert "> 64 in torch.float64" in gpu.supports(*(torch.zeros(s, dtype=torch.float64) for s in ((2, 4, 65), (65, 65))))


def test_path_is_logged_once_per_reason(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "said", set())
    u, w_h, waves, h0 = make_inputs(2, 4, 16, 2, hard=False, masked=False)
    with caplog.at_level(logging.INFO, logger="hrnn.ops.dispatch"):
        assert dispatch.cuda_path("clock", gpu.supports(u, w_h, waves, h0))
        assert dispatch.cuda_path("clock", gpu.supports(u, w_h, waves, h0))
        half = [t.half() for t in (u, w_h, waves, h0)]
        assert not dispatch.cuda_path("clock", gpu.supports(*half))
        assert not dispatch.cuda_path("clock", gpu.supports(*half))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["hrnn: CUDA tensors run the Triton kernels",
                     "hrnn: CUDA tensors run the pure PyTorch loop (same results, slower): "
                     "the Triton kernels take float32/float64 only (got torch.float16)"]


@pytest.fixture
def precision_restored():
    """The matmul precision set before the test, set again after it."""
    before = ops.matmul_precision()
    yield
    ops.set_matmul_precision(before)


def test_matmul_precision_setting(precision_restored, tmp_path):
    """The runner applies trainer.matmul_precision to hrnn.ops; bad values fail in one line."""
    with pytest.raises(ValueError, match=r"'fp16' is not allowed; allowed: ieee, tf32, tf32x3, bf16x3, bf16$"):
        ops.set_matmul_precision("fp16")
    assert validate(compose_config([])).trainer.matmul_precision in ops.MATMUL_PRECISIONS
    with pytest.raises(UserError, match=r"^trainer.matmul_precision='fp16' is not allowed; allowed: ieee, tf32"):
        validate(compose_config(["trainer.matmul_precision=fp16"]))
    train(compose_config(["task=adding", "task.seq_len=8", "trainer.steps=1", "trainer.eval_every=1",
                          "trainer.matmul_precision=bf16", *TINY]), tmp_path)
    assert ops.matmul_precision() == "bf16"


@pytest.fixture
def cuda_looking(monkeypatch):
    """CPU tensors that say they are CUDA tensors: hrnn.ops's CUDA branch, run by the interpreter."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(dispatch, "said", set())


def test_core_sends_cuda_tensors_to_the_kernels_with_its_precision(cuda_looking, precision_restored, caplog):
    """hrnn.ops.leaky_scan / leaky_rnn on CUDA run the kernels in set_matmul_precision's mode
    (bf16 here: its rounding shows which path ran) and say so once."""
    ops.set_matmul_precision("bf16")
    u, w_h, waves, h0 = make_inputs(6, 20, 32, 4, hard=False, masked=False)
    with caplog.at_level(logging.INFO, logger="hrnn.ops.dispatch"):
        got = ops.leaky_scan(u, w_h, waves, h0)
        x, w_x, b, *_ = make_rnn_inputs(6, 20, 32, 4, False, False, 3, True)
        got_rnn = ops.leaky_rnn(x, w_x, b, w_h, waves, h0, last_only=True)
    assert_close_rel(got, bf16_reference(u, w_h, waves, h0))
    assert_close_rel(got_rnn, bf16_reference(torch.nn.functional.linear(x, w_x, b), w_h, waves, h0)[:, -1])
    assert [r.getMessage() for r in caplog.records] == ["hrnn: CUDA tensors run the Triton kernels"]


def test_core_falls_back_to_the_loop_on_cuda_and_says_why(cuda_looking, caplog):
    inputs = make_rnn_inputs(3, 12, 16, 2, False, False, 2, True)
    grad_out = torch.randn(3, 12, 16)
    with caplog.at_level(logging.INFO), ops.kernels_hidden("cuda", "test: kernels hidden"):
        got, got_grads = rnn_grads(ops.leaky_rnn, inputs, grad_out, [0, 1, 2, 3, 4, 5])
    want, want_grads = rnn_grads(leaky_rnn_reference, inputs, grad_out, [0, 1, 2, 3, 4, 5])
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    assert [r.getMessage() for r in caplog.records] == [
        "hrnn: CUDA tensors run the pure PyTorch loop (same results, slower): test: kernels hidden"]


# Compiles both kernels for an H100 (sm_90) in a fresh process without the interpreter: no GPU
# needed, Triton's own ptxas. Catches what the interpreter cannot: GPU-only code (the bf16
# operands), the dot lowering each precision gets, and shared memory at the largest hidden
# size `supports` admits (an H100 block gets at most 232448 bytes).
COMPILE = r"""
import json, os, re, subprocess, sys, tempfile, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hrnn.ops import gpu, gpu_kernels as K
gpu.TUNING["gluon"] = False  # the Triton kernels; tests/test_gluon.py compiles the Gluon ones

def compile_(kernel, ptrs, dtype, constexprs, warps):
    floats = ("thr_value", "support")
    sig = {n: ("*" + dtype if n in ptrs else "constexpr" if n in constexprs else "fp32" if n in floats else "i32")
           for n in kernel.arg_names}
    return triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

def spill_bytes(kernel):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    err = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True, check=True).stderr
    os.unlink(f.name)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", err))

out = {}
for precision, dtype in (("tf32", torch.float32), ("tf32x3", torch.float32), ("bf16x3", torch.float32),
                         ("bf16", torch.float32), ("ieee", torch.float64)):
    hidden = gpu.MAX_HIDDEN[dtype]
    _, opts = gpu.launch(hidden, 100)
    warps, common = opts.pop("num_warps"), dict(T=784, PRECISION=precision, INTERPRET=False, **opts)
    ty = "fp64" if dtype == torch.float64 else "fp32"
    fwd = compile_(K.leaky_forward_kernel, {"u", "w_h", "waves", "h0", "buf", "cands", "last"}, ty,
                   dict(WRITE_STATES=True, WRITE_CANDS=True, WRITE_LAST=True, **common), warps)
    bwd = compile_(K.leaky_backward_kernel, {"grad", "grad_last", "buf", "cands", "w_h", "waves", "dz", "dh0",
                   "da_part"}, ty, dict(GRAD_ALL=True, NEED_DA=True, **common), warps)
    _, gated = gpu.gated_launch(hidden, 8, 100, 784, torch.zeros(784, 8), None, 0.5, 0, precision, dtype)
    gated["INTERPRET"], warps, _ = False, gated.pop("num_warps"), gated.pop("GLUON")
    gfwd = compile_(K.gated_forward_kernel, {"u", "gu", "w_h", "gate_h", "waves", "thr", "h0", "buf", "cands", "gates",
                    "acts", "last"}, ty, dict(WRITE_STATES=True, WRITE_CANDS=True, WRITE_LAST=False, **gated), warps)
    gbwd = compile_(K.gated_backward_kernel, {"grad", "grad_last", "grad_act", "buf", "cands", "gates", "w_h", "gate_h",
                    "waves", "thr", "dz", "dzg", "dzl", "dwave", "dh0"}, ty,
                    dict(GRAD_ALL=True, HAS_GRAD=True, HAS_GRAD_ACT=True, NEED_DWAVE=True, SUPPORT=True, **gated), warps)
    kernels = {"clock_forward": fwd, "clock_backward": bwd, "gated_forward": gfwd, "gated_backward": gbwd}
    out[precision] = {"shared": {k: v.metadata.shared for k, v in kernels.items()},
                      "spill_bytes": {k: spill_bytes(v) for k, v in kernels.items()},
                      "mma": [line.split()[0] for line in fwd.asm["ptx"].splitlines() if "mma.sync" in line][:1]}
# The gated kernels of the default precision (argv[1]) at other lengths: T is a compile-time constant.
for steps in (200, 2000):
    _, gated = gpu.gated_launch(128, 8, 100, steps, torch.zeros(steps, 8), None, 0.5, 0, sys.argv[1], torch.float32)
    gated["INTERPRET"], warps, _ = False, gated.pop("num_warps"), gated.pop("GLUON")
    gfwd = compile_(K.gated_forward_kernel, {"u", "gu", "w_h", "gate_h", "waves", "thr", "h0", "buf", "cands", "gates",
                    "acts", "last"}, "fp32", dict(WRITE_STATES=True, WRITE_CANDS=True, WRITE_LAST=False, **gated), warps)
    gbwd = compile_(K.gated_backward_kernel, {"grad", "grad_last", "grad_act", "buf", "cands", "gates", "w_h", "gate_h",
                    "waves", "thr", "dz", "dzg", "dzl", "dwave", "dh0"}, "fp32",
                    dict(GRAD_ALL=True, HAS_GRAD=True, HAS_GRAD_ACT=True, NEED_DWAVE=True, SUPPORT=True, **gated), warps)
    kernels = {"gated_forward": gfwd, "gated_backward": gbwd}
    out[f"{sys.argv[1]} at T={steps}"] = {"shared": {k: v.metadata.shared for k, v in kernels.items()},
                                          "spill_bytes": {k: spill_bytes(v) for k, v in kernels.items()}}
print(json.dumps(out))
"""


def test_kernels_compile_for_hopper_within_shared_memory_and_registers():
    """The clock kernels and the gated ones, forward and backward, at the largest padded size
    and the launch's warps (and the gated ones of the default precision at T = 200 and 2000 too):
    within shared memory, and, in the fast precisions, without register spills (ptxas -v). A spilling gated forward in tf32x3 (22 KB a thread) took 185 ms a step on
    an H100 where the same kernel without spills took 9.6 ms (docs/gpu.md); ieee is the slow
    reference mode and its forward spills (measured 34.8 ms, 8x tf32x3)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    default = OmegaConf.load(Path(__file__).parents[1] / "conf" / "trainer" / "default.yaml").matmul_precision
    proc = subprocess.run([sys.executable, "-c", COMPILE, default], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for precision, r in out.items():
        assert max(r["shared"].values()) <= 232448, (precision, r)
        if precision != "ieee":
            assert not any(r["spill_bytes"].values()), (precision, r["spill_bytes"])
    # Tensor-core instructions with the operand types each precision asks for (the tile shape
    # is the compiler's choice and differs between Triton versions).
    assert {"bf16x3 at T=200", "bf16x3 at T=2000"} <= out.keys() or default != "bf16x3"
    for precision, types in (("tf32", ".f32.tf32.tf32.f32"), ("bf16x3", ".f32.bf16.bf16.f32"), ("bf16", ".f32.bf16.bf16.f32"),
                             ("ieee", ".f64.f64.f64.f64")):
        mma = out[precision]["mma"]
        assert len(mma) == 1 and mma[0].startswith("mma.sync") and mma[0].endswith(types), (precision, mma)


def test_resume_of_a_run_made_before_matmul_precision(tmp_path):
    """A checkpoint whose stored config has no trainer.matmul_precision (made before the key
    existed) resumes, with today's default for it."""
    run = ["task=adding", "task.seq_len=8", "trainer.eval_every=1", *TINY]
    train(compose_config([*run, "trainer.steps=1"]), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    stored = OmegaConf.create(state["config"])
    del stored.trainer["matmul_precision"]
    torch.save({**state, "config": OmegaConf.to_yaml(stored)}, last)
    (tmp_path / "metrics.json").unlink()
    train(compose_config([*run, "trainer.steps=1", f"resume={tmp_path}"]), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "finished"


# --- The event-gated recurrence (hrnn.ops.gated_leaky_rnn's CUDA path) -----------------------

from test_gated_fused import make as make_gated  # noqa: E402
from test_gated_fused import values_and_grads as gated_values_and_grads  # noqa: E402

from hrnn.ops import gated_leaky_rnn_reference  # noqa: E402

F32, F64 = torch.float32, torch.float64
GATED_CASES = [
    # batch, steps, inputs, hidden, modules, waves, gate mode, dtype
    (6, 12, 3, 32, 4, "shared", "soft", F32),
    (18, 8, 1, 24, 3, None, "soft", F32),           # two programs; 3 modules of 8 pad to 4 x 8
    (5, 10, 2, 20, 4, "per_sample", "soft", F32),   # modules of 5 units pad to 8
    (5, 6, 2, 64, 32, "shared", "soft", F32),       # 32 modules: the gate product has MP columns
    (4, 9, 2, 32, 4, "shared", "hard", F64),        # hard in float64: no threshold ties between
    (3, 7, 1, 16, 2, "per_sample", "hard", F64),    # the kernel's gate and the reference's
    (4, 8, 2, 24, 4, None, "hard", F64),
    (4, 9, 2, 32, 4, "shared", "truncated", F64),   # truncated: the gate where open, its exact gradient,
    (5, 8, 1, 24, 3, None, "truncated", F64),       # 0 where shut
]


def gated_kernels(precision="ieee"):
    return lambda *a, **k: gpu.gated_leaky_rnn(*a, precision, **k)


def gated_id(c):
    return "B{}T{}I{}H{}M{}-{}-{}-{}".format(*c[:6], c[6], str(c[7])[-7:])


@pytest.fixture(params=["unit", "module"])
def gate_layout(request, monkeypatch):
    """Both layouts of the gated kernels (hrnn.ops.gpu.TUNING["unit_gates"]): every unit computing its
    module's gate on the tensor cores, or per module with the gate's small products in FMAs."""
    monkeypatch.setitem(gpu.TUNING, "unit_gates", request.param == "unit")
    return request.param


@pytest.mark.parametrize("case", GATED_CASES, ids=gated_id)
@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
def test_gated_matches_reference(case, last_only, gate_layout):
    """States, activations and the gradient of every input (x, W_x, b, W_h, h0, G_x, g_b, G_h,
    waves) against the reference loop, for a loss that reads both outputs: 1e-5 in float32 (ieee),
    1e-10 in float64, where hard activations are equal."""
    batch, steps, inputs, hidden, modules, waves, mode, dtype = case
    args = make_gated(batch, steps, inputs, hidden, modules, dtype, waves)
    thresholds = args["thresholds"] if mode != "soft" else 0.5
    assert gpu.gated_supports(args["x"], args["w_h"], args["gate_h"]) is None
    want = gated_values_and_grads(gated_leaky_rnn_reference, args, mode, thresholds, last_only)
    got = gated_values_and_grads(gated_kernels(), args, mode, thresholds, last_only)
    tol = 1e-5 if dtype == F32 else 1e-10
    if mode != "soft":
        assert torch.equal(got[1] == 0, want[1] == 0)
        assert 0 < (want[1] == 0).float().mean() < 1  # some gates open, some shut
    if mode == "hard":
        assert torch.equal(got[1], want[1])
    for g, w in ((got[0], want[0]), (got[1], want[1])):
        assert_close_rel(g, w, tol)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert_close_rel(got[2][name], want[2][name], tol)


@pytest.mark.parametrize("waves", [None, "shared"])
def test_gated_truncated_support_matches_reference(waves, gate_layout):
    """A truncated gate with a support: the values are the truncated gate's and the gate's gradient is the
    open gate's at the shut entries within the support, as in the reference loop (float64)."""
    args = make_gated(5, 8, 2, 24, 3, F64, waves, seed=5)
    want = gated_values_and_grads(gated_leaky_rnn_reference, args, "truncated", 0.6, support=0.3)
    got = gated_values_and_grads(gated_kernels(), args, "truncated", 0.6, support=0.3)
    exact = gated_values_and_grads(gated_kernels(), args, "truncated", 0.6)
    assert torch.equal(got[1] == 0, want[1] == 0) and 0 < (want[1] == 0).float().mean() < 1
    for g, w in ((got[0], want[0]), (got[1], want[1])):
        assert_close_rel(g, w, 1e-10)
    for name in want[2]:
        assert_close_rel(got[2][name], want[2][name], 1e-10)
    assert not torch.allclose(got[2]["gate_bias"], exact[2]["gate_bias"])  # the support reached the gate


def test_gated_hard_gate_with_one_threshold(gate_layout):
    """A float threshold (the hard gate's usual call) equals the same threshold as a tensor."""
    args = make_gated(4, 8, 2, 16, 2, F64, "shared")
    want = gated_values_and_grads(gated_leaky_rnn_reference, args, "hard", 0.5)
    got = gated_values_and_grads(gated_kernels(), args, "hard", 0.5)
    assert torch.equal(got[1], want[1])
    assert_close_rel(got[0], want[0], 1e-10)
    for name in want[2]:
        assert_close_rel(got[2][name], want[2][name], 1e-10)


def test_gated_gradcheck_float64(gate_layout):
    """Soft gates and a shared clock wave in double pass gradcheck, all states and last only."""
    a = make_gated(3, 5, 2, 8, 2, F64, "shared")
    names = ("x", "w_x", "bias", "w_h", "h0", "waves", "gate_x", "gate_bias", "gate_h")
    leaves = [a[n].clone().requires_grad_() for n in names]
    for last_only in (False, True):
        def op(*t):
            states, acts = gpu.gated_leaky_rnn(*t, "soft", 0.5, last_only, "ieee")
            return states, acts
        assert torch.autograd.gradcheck(op, leaves, fast_mode=True)


def test_gated_inference_matches_training_forward(gate_layout):
    """Under no_grad the forward-only launch (no candidates, no gates kept) gives the training
    forward's states and activations."""
    a = make_gated(5, 9, 2, 32, 4, F32, "shared")
    inputs = [a[n] for n in ("x", "w_x", "bias", "w_h", "h0", "waves", "gate_x", "gate_bias", "gate_h")]
    for last_only in (False, True):
        with torch.no_grad():
            states, acts = gpu.gated_leaky_rnn(*inputs, "soft", 0.5, last_only, "ieee")
        trained, trained_acts = gpu.gated_leaky_rnn(*[t.clone().requires_grad_() for t in inputs],
                                                            "soft", 0.5, last_only, "ieee")
        assert states.grad_fn is None and trained.grad_fn is not None
        # Not bit-equal: torch's projection picks another product under autograd (ulps apart).
        assert_close_rel(states, trained.detach(), 1e-6)
        assert_close_rel(acts, trained_acts.detach(), 1e-6)


def test_gated_hard_gate_holds_the_state_exactly():
    """A shut gate keeps its module's units bit-for-bit; an open one with wave 1 takes the candidate."""
    a = make_gated(4, 10, 2, 16, 4, F32, None)
    inputs = [a[n] for n in ("x", "w_x", "bias", "w_h", "h0", "waves", "gate_x", "gate_bias", "gate_h")]
    states, acts = gpu.gated_leaky_rnn(*inputs, "hard", 0.5, False, "ieee")
    prev = torch.cat([a["h0"][:, None], states[:, :-1]], dim=1)
    held = (acts == 0).repeat_interleave(4, dim=2)
    assert held.any() and (~held).any()
    assert torch.equal(states[held], prev[held])


def test_gated_op_sends_cuda_tensors_to_the_kernels(cuda_looking, precision_restored, caplog):
    """hrnn.ops.gated_leaky_rnn on CUDA runs the gated kernels in set_matmul_precision's mode
    (bf16: its rounding shows which path ran), and says so once; hidden kernels fall back to
    the reference loop with one line saying why."""
    ops.set_matmul_precision("bf16")
    a = make_gated(6, 10, 2, 32, 4, F32, "shared")
    inputs = [a[n] for n in ("x", "w_x", "bias", "w_h", "h0", "waves", "gate_x", "gate_bias", "gate_h")]
    with caplog.at_level(logging.INFO, logger="hrnn.ops.dispatch"):
        states, acts = ops.gated_leaky_rnn(*inputs, "soft", 0.5, last_only=False)
        ops.gated_leaky_rnn(*inputs, "soft", 0.5, last_only=True)
    exact, exact_acts = gated_leaky_rnn_reference(*inputs, "soft", 0.5)
    bf16_states, _ = gpu.gated_leaky_rnn(*inputs, "soft", 0.5, False, "bf16")
    assert torch.equal(states, bf16_states)
    assert 1e-5 < ((states - exact).norm() / exact.norm()).item() < 2e-2
    assert [r.getMessage() for r in caplog.records] == ["hrnn: CUDA tensors run the gated Triton kernels"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hrnn.ops.dispatch"), ops.kernels_hidden("cuda", "test: kernels hidden"):
        states, acts = ops.gated_leaky_rnn(*inputs, "soft", 0.5, last_only=False)
    assert torch.equal(states, exact) and torch.equal(acts, exact_acts)
    assert [r.getMessage() for r in caplog.records] == [
        "hrnn: CUDA tensors run the gated recurrence's PyTorch loop (same results, slower): test: kernels hidden"]


def test_gated_supports_says_why_not():
    x, w_h = torch.zeros(2, 3, 1), torch.zeros(96, 96)
    assert "need an event gate" in gpu.gated_supports(x, w_h, None)
    # 8 modules of 12 units pad to 8 x 16 = 128: taken; 3 modules of 40 pad to 4 x 64 = 256: not.
    assert gpu.gated_supports(x, w_h, torch.zeros(8, 96)) is None
    assert "pad to 256 > 128" in gpu.gated_supports(x, torch.zeros(120, 120), torch.zeros(3, 120))
