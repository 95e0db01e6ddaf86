"""Fast path for `hrnn.core.leaky_scan`: the C++ kernels in hrnn/csrc behind an autograd.Function.

The extension (`hrnn._fused_C`) is compiled at install time (setup.py). It runs the whole time
loop in C++ for float32/float64 CPU tensors, with a hand-written backward through time.
Anything it does not cover (extension not built, CUDA tensors, other dtypes) goes to the pure
PyTorch reference loop, which gives the same results; that is logged once per process.

    available() -> bool      whether the extension loaded
    unavailable_reason()     why not (None when it did)
    supports(*tensors)       whether these tensors can take the fast path
    leaky_scan(...)          the fast op (same contract as hrnn.core.leaky_scan)
    leaky_rnn(...)           the same with the input projection fused in (hrnn.core.leaky_rnn)
    cpu_capability()         which build of the kernels runs: default, avx2 or avx512

One install holds the kernels built for each CPU capability; at import the best one this CPU
executes is chosen, and HRNN_CPU_CAPABILITY=default|avx2|avx512 forces a lower one (to compare
them, or to rule one out); a value this CPU cannot run is an error naming the allowed ones.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from hrnn.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.float64)

try:
    if os.environ.get("HRNN_DISABLE_FUSED", "0") not in ("", "0"):  # =0 or empty: not disabled
        raise ImportError("disabled by HRNN_DISABLE_FUSED")
    from hrnn import _fused_C as _C  # type: ignore[attr-defined]

    _REASON: str | None = None
except ImportError as err:  # not built (source tree without install) or disabled
    _C = None
    _REASON = (f"the C++ extension hrnn._fused_C is not available ({err}); "
               "build it with `pip install --no-build-isolation -e .`")

CAPABILITIES = ("default", "avx2", "avx512")  # lowest first
CAPABILITY_VARIABLE = "HRNN_CPU_CAPABILITY"


def set_cpu_capability(name: str) -> None:
    """Run the kernels built for `name` from now on (one of `cpu_capabilities()`); UserError otherwise."""
    if name not in CAPABILITIES:
        raise UserError(f"{CAPABILITY_VARIABLE}={name!r} is not a CPU capability; allowed: {', '.join(CAPABILITIES)}")
    here = cpu_capabilities()
    if name not in here:
        raise UserError(f"{CAPABILITY_VARIABLE}={name} cannot run on this CPU; allowed here: {', '.join(here) or 'none'}")
    _C.set_capability(name)


def cpu_capability() -> str | None:
    """The CPU capability whose kernels run (default, avx2 or avx512); None without the extension."""
    return _C.capability() if _C is not None else None


def cpu_capabilities() -> list[str]:
    """The capabilities this CPU can run, lowest first (empty without the extension)."""
    return list(_C.capabilities()) if _C is not None else []


# The extension starts on the best build this CPU executes; HRNN_CPU_CAPABILITY names a lower one.
if _C is not None and os.environ.get(CAPABILITY_VARIABLE, "").strip():
    set_cpu_capability(os.environ[CAPABILITY_VARIABLE].strip())

_warned = False  # the fallback is announced once per process


def available() -> bool:
    """True when the compiled kernels loaded."""
    return _C is not None


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not used at all (None when they loaded)."""
    return _REASON


def supports(*tensors: Tensor) -> str | None:
    """None if the fast path takes these tensors, else the reason it does not."""
    if _C is None:
        return _REASON
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device.type != "cpu":
            return f"the fused kernels are CPU-only (got a {t.device.type} tensor)"
        if t.dtype != dtype or t.dtype not in _DTYPES:
            return f"the fused kernels take float32/float64 only (got {t.dtype})"
        if t.layout != torch.strided:
            return "the fused kernels take dense tensors only"
    return None


def warn_fallback(reason: str) -> None:
    """Log, once per process, that the pure PyTorch loop runs instead of the kernels."""
    global _warned
    if _warned:
        return
    _warned = True
    log.warning("hrnn: leaky_scan is using the pure PyTorch loop (same results, slower): %s", reason)


def _grad_and_skip(tensors: tuple, waves: Tensor, skip_inactive: bool) -> tuple[bool, bool]:
    """Whether a graph is needed, and whether to skip inactive tiles: not when the waves need a
    gradient, which at a = 0 depends on the candidates skipping would not compute."""
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return need_grad, bool(skip_inactive) and not (need_grad and waves.requires_grad)


class _LeakyScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, w_h, waves, h0, skip, last_only):  # noqa: D102
        states, cands = _C.forward(u, w_h, waves, h0, skip, True, False)
        ctx.save_for_backward(states, cands, h0, w_h, waves)
        ctx.skip = skip
        # last_only: the backward then gets a (B, H) gradient, not a mostly-zero (B, T, H) one.
        return states[:, -1].clone() if last_only else states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):  # noqa: D102
        states, cands, h0, w_h, waves = ctx.saved_tensors
        need = ctx.needs_input_grad
        du, dw, dwaves, dh0 = _C.backward(grad_states, states, cands, h0, w_h, waves,
                                          ctx.skip, need[2])
        return (du if need[0] else None, dw if need[1] else None,
                dwaves if need[2] else None, dh0 if need[3] else None, None, None)


def leaky_scan(u: Tensor, w_h: Tensor, waves: Tensor, h0: Tensor, skip_inactive: bool,
               last_only: bool = False) -> Tensor:
    """All states (B, T, H), or the last one (B, H) if last_only, through the compiled kernels;
    caller checked shapes and `supports`.

    skip_inactive: compute, at each step, only the units whose activation is nonzero (in
    tiles of up to 16 units). Exact for any waves, since a = 0 holds the state bit-for-bit;
    but the gradient w.r.t. the waves at a = 0 needs the skipped candidates, so skipping is
    turned off when the waves require grad.

    Blocks of w_h (module i reads module j) that are all zero, as learned connectivity's hard
    gates leave them in evaluation or the slow-to-fast mask does, are skipped in the forward's
    products (register capabilities; exact: they add exact zeros). The backward is dense.
    """
    need_grad, skip = _grad_and_skip((u, w_h, waves, h0), waves, skip_inactive)
    u, w_h, waves, h0 = u.contiguous(), w_h.contiguous(), waves.contiguous(), h0.contiguous()
    if not need_grad:
        # Inference: forward-only kernel; no candidates kept, no graph recorded; with last_only
        # the kernels return the (B, H) last state and write no (B, T, H) states at all.
        with torch.no_grad():
            return _C.forward(u, w_h, waves, h0, skip, False, bool(last_only))[0]
    return _LeakyScan.apply(u, w_h, waves, h0, skip, bool(last_only))


class _LeakyRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_x, bias, w_h, waves, h0, skip, last_only):  # noqa: D102
        states, cands = _C.forward_x(x, w_x, bias, w_h, waves, h0, skip, True, False)
        ctx.save_for_backward(states, cands, x, w_x, h0, w_h, waves)
        ctx.skip = skip
        return states[:, -1].clone() if last_only else states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):  # noqa: D102
        states, cands, x, w_x, h0, w_h, waves = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw_x, db, dw_h, dwaves, dh0 = _C.backward_x(grad_states, states, cands, x, w_x, h0, w_h,
                                                         waves, ctx.skip, need[0], need[4])
        grads = (dx, dw_x, db, dw_h, dwaves, dh0)
        return (*(g if n else None for g, n in zip(grads, need)), None, None)


def leaky_rnn(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, waves: Tensor, h0: Tensor,
              skip_inactive: bool, last_only: bool = False) -> Tensor:
    """`leaky_scan(F.linear(x, w_x, bias), ...)` with the projection inside the kernels' loop;
    caller checked shapes and `supports`.

    u_t = x_t W_x^T + b is computed per step for the active tiles only, and dW_x, db are
    accumulated in the backward loop: no (B, T, H) u or gradient of u exists. On a hard clock
    that is what makes skipping pay: with u hoisted, writing u and reading its gradient twice
    (dW_x, db) cost every module at every step (~6 ms of a 19 ms cwrnn step at T = 784).
    """
    tensors = (x, w_x, w_h, waves, h0) if bias is None else (x, w_x, bias, w_h, waves, h0)
    need_grad, skip = _grad_and_skip(tensors, waves, skip_inactive)
    x, w_x, w_h, waves, h0 = (t.contiguous() for t in (x, w_x, w_h, waves, h0))
    bias = None if bias is None else bias.contiguous()
    if not need_grad:
        with torch.no_grad():
            return _C.forward_x(x, w_x, bias, w_h, waves, h0, skip, False, bool(last_only))[0]
    return _LeakyRNN.apply(x, w_x, bias, w_h, waves, h0, skip, bool(last_only))


def leaky_scan_loop(u: Tensor, w_h: Tensor, waves: Tensor, h0: Tensor, last_only: bool = False) -> Tensor:
    """The pure PyTorch fallback: `hrnn.core.leaky_scan_reference`, step for step the same ops.

    The one change is reading u through `unbind(1)` rather than `u[:, t]`: each `u[:, t]`
    puts a select in the graph whose backward writes a zero-filled (B, T, H) gradient, so
    the reference's backward costs O(T^2) memory traffic (~17 s at B=100, T=784, H=128 on
    the 2-core dev machine, against ~0.1 s forward). Values and gradients are identical.
    last_only returns the final h itself (B, H): the same value as the last row of the stack.
    """
    hidden = u.shape[2]
    a = waves.repeat_interleave(hidden // waves.shape[1], dim=1)
    w_t = w_h.t()
    h = h0
    states = []
    for u_t, a_t in zip(u.unbind(1), a.unbind(0)):
        h = torch.lerp(h, torch.tanh(torch.addmm(u_t, h, w_t)), a_t)
        states.append(h)
    return h if last_only else torch.stack(states, dim=1)


def pool_stats() -> dict:
    """Idle bytes / blocks held by the extension's buffer pool, and its limit."""
    if _C is None:
        return {"cached_bytes": 0, "blocks": 0, "limit_bytes": 0}
    cached, blocks, limit = _C.pool_stats()
    return {"cached_bytes": cached, "blocks": blocks, "limit_bytes": limit}


def set_pool_limit(nbytes: int) -> None:
    """Cap the idle memory the buffer pool keeps for reuse (0 disables reuse)."""
    if _C is not None:
        _C.set_pool_limit(int(nbytes))
