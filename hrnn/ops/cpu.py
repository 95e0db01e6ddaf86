"""The CPU backend: the C++ kernels in hrnn/ops/csrc behind autograd Functions.

The extension (`hrnn.ops._C`) is compiled at install time (setup.py). It runs the whole time loop
in C++ for float32/float64 CPU tensors, with a hand-written backward through time, for both ops:
the clock op (`leaky_scan`, `leaky_rnn`) and the event-gated op (`gated_leaky_rnn`). Which tensors
come here is hrnn/ops/dispatch.py's choice; what the kernels do not take runs the reference loops.

One install holds the kernels built for each CPU capability (default, avx2, avx512); at import the
best one this CPU executes is chosen, and HRNN_CPU_CAPABILITY names a lower one (to compare them,
or to rule one out): a value this CPU cannot run is a UserError naming the allowed ones, raised by
importing this module. HRNN_DISABLE_FUSED=1 (any value but empty or 0) leaves the extension
unloaded. The capability table, its detection and the variable live in csrc/capability.cpp.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from hrnn.errors import UserError
from hrnn.ops.dispatch import Availability

_DTYPES = (torch.float32, torch.float64)

try:
    if os.environ.get("HRNN_DISABLE_FUSED", "0") not in ("", "0"):  # =0 or empty: not disabled
        raise ImportError("disabled by HRNN_DISABLE_FUSED")
    from hrnn.ops import _C  # type: ignore[attr-defined]

    _LOAD_REASON: str | None = None
except ImportError as err:  # not built (source tree without install) or disabled
    _C = None
    _LOAD_REASON = (f"the C++ extension hrnn.ops._C is not available ({err}); "
                    "build it with `pip install --no-build-isolation -e .`")
_availability = Availability(_LOAD_REASON)
unavailable_reason = _availability.unavailable_reason
hide = _availability.hide

# Every capability's name, lowest first (empty without the extension).
CAPABILITIES = tuple(_C.known_capabilities()) if _C is not None else ()

_ENVIRONMENT_ERROR = _C.apply_environment() if _C is not None else ""  # HRNN_CPU_CAPABILITY, when set
if _ENVIRONMENT_ERROR:
    raise UserError(_ENVIRONMENT_ERROR)


def set_cpu_capability(name: str) -> None:
    """Run the kernels built for `name` from now on (one of `cpu_capabilities()`); UserError otherwise."""
    error = _C.capability_error(name) if _C is not None else f"no CPU capability can run: {_LOAD_REASON}"
    if error:
        raise UserError(error)
    _C.set_capability(name)


def cpu_capability() -> str | None:
    """The CPU capability whose kernels run (default, avx2 or avx512); None without the extension."""
    return _C.capability() if _C is not None else None


def cpu_capabilities() -> list[str]:
    """The capabilities this CPU can run, lowest first (empty without the extension)."""
    return list(_C.capabilities()) if _C is not None else []


def available() -> bool:
    """True when the compiled kernels loaded (and are not hidden)."""
    return unavailable_reason() is None


def kernel_path() -> str:
    """What CPU tensors of the kernels' dtypes run: the capability (default, avx2, avx512) or "pytorch loop"."""
    return cpu_capability() if available() else "pytorch loop"


def extension():
    """The compiled module itself (None without it): its raw entry points, for tests of the C++ checks."""
    return _C


def supports(*tensors: Tensor) -> str | None:
    """None if the kernels take these tensors, else the reason they do not."""
    if unavailable_reason() is not None:
        return unavailable_reason()
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device.type != "cpu":
            return f"the fused kernels are CPU-only (got a {t.device.type} tensor)"
        if t.dtype != dtype or t.dtype not in _DTYPES:
            return f"the fused kernels take float32/float64 only (got {t.dtype})"
        if t.layout != torch.strided:
            return "the fused kernels take dense tensors only"
    return None


def is_hard(waves: Tensor) -> bool:
    """True when every activation is exactly 0 or 1: inactive modules can be skipped."""
    return bool(((waves == 0) | (waves == 1)).all())


def skips_by_default(waves: Tensor) -> bool:
    """skip_inactive where the caller leaves it open: for hard waves that need no gradient (learned
    waves in training never skip, and the (T, H) test of their values is spared)."""
    return not (waves.requires_grad and torch.is_grad_enabled()) and is_hard(waves)


def _needs_graph(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _skip(need_grad: bool, waves: Tensor, skip_inactive: bool) -> bool:
    """Whether to skip inactive tiles: not when the waves need a gradient, which at a = 0
    depends on the candidates skipping would not compute."""
    return bool(skip_inactive) and not (need_grad and waves.requires_grad)


def _trimmed(states: Tensor, last_only: bool) -> Tensor:
    """last_only: the final state alone, so the backward gets a (B, H) gradient, not a mostly-zero (B, T, H) one."""
    return states[:, -1].clone() if last_only else states


# --- The clock op ---------------------------------------------------------------------------

class _LeakyScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, w_h, waves, h0, skip, last_only):  # noqa: D102
        states, cands = _C.forward(u, w_h, waves, h0, skip, True, False)
        ctx.save_for_backward(states, cands, h0, w_h, waves)
        ctx.skip = skip
        return _trimmed(states, last_only)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):  # noqa: D102
        states, cands, h0, w_h, waves = ctx.saved_tensors
        need = ctx.needs_input_grad
        du, dw, dwaves, dh0 = _C.backward(grad_states, states, cands, h0, w_h, waves, ctx.skip, need[2])
        return (du if need[0] else None, dw if need[1] else None,
                dwaves if need[2] else None, dh0 if need[3] else None, None, None)


def leaky_scan(u: Tensor, w_h: Tensor, waves: Tensor, h0: Tensor, skip_inactive: bool,
               last_only: bool = False) -> Tensor:
    """All states (B, T, H), or the last one (B, H) if last_only, through the compiled kernels;
    caller checked shapes and `supports`.

    skip_inactive: compute, at each step, only the units whose activation is nonzero (in tiles of
    up to 16 units). Exact for any waves, since a = 0 holds the state bit-for-bit; but the gradient
    w.r.t. the waves at a = 0 needs the skipped candidates, so skipping is turned off when the
    waves require grad.

    Blocks of w_h (module i reads module j) that are all zero, as learned connectivity's hard
    gates leave them in evaluation or the slow-to-fast mask does, are skipped in the forward's
    products (register capabilities; exact: they add exact zeros). The backward is dense.
    """
    need_grad = _needs_graph((u, w_h, waves, h0))
    skip = _skip(need_grad, waves, skip_inactive)
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
        return _trimmed(states, last_only)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):  # noqa: D102
        states, cands, x, w_x, h0, w_h, waves = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _C.backward_x(grad_states, states, cands, x, w_x, h0, w_h, waves, ctx.skip, need[0], need[4])
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
    need_grad = _needs_graph((x, w_x, bias, w_h, waves, h0))
    skip = _skip(need_grad, waves, skip_inactive)
    x, w_x, w_h, waves, h0 = (t.contiguous() for t in (x, w_x, w_h, waves, h0))
    bias = None if bias is None else bias.contiguous()
    if not need_grad:
        with torch.no_grad():
            return _C.forward_x(x, w_x, bias, w_h, waves, h0, skip, False, bool(last_only))[0]
    return _LeakyRNN.apply(x, w_x, bias, w_h, waves, h0, skip, bool(last_only))


# --- The event-gated op ---------------------------------------------------------------------

class _GatedLeakyRNN(torch.autograd.Function):
    """The fused core behind autograd, input projections included: the kernels form
    b + x_t W_x^T (and g_b + x_t G_x^T) per step and accumulate their gradients in the backward
    loop, so no (B, T, H) u or du exists (at f = 0 those cost more than the skipping saved)."""

    @staticmethod
    def forward(ctx, x, w_x, bias, gate_x, gate_bias, w_h, gate_h, waves, h0, thr, truncated, support,
                all_candidates, last_only):  # noqa: D102
        inputs = (x, w_x, bias, gate_x, gate_bias, w_h, gate_h, waves, h0, thr)
        states, cands, activations, gates = _C.gated_forward(*inputs, truncated, support, all_candidates, True, False)
        ctx.save_for_backward(states, cands, activations, gates, *inputs)
        ctx.truncated, ctx.support, ctx.all_candidates = truncated, support, all_candidates
        ctx.set_materialize_grads(False)
        return _trimmed(states, last_only), activations

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states, grad_activations):  # noqa: D102
        states, cands, activations, gates, *inputs = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_states is None:
            grad_states = torch.zeros_like(states)
        grads = _C.gated_backward(grad_states, grad_activations, states, cands, activations, gates, *inputs,
                                  ctx.truncated, ctx.support, need[0], ctx.all_candidates, need[7])
        return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None, None)


def gated_leaky_rnn(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, h0: Tensor, waves: Tensor | None,
                    gate_x: Tensor | None, gate_bias: Tensor | None, gate_h: Tensor | None, gate_mode: str,
                    thresholds: Tensor | float, last_only: bool = False, support: float = 0.0) -> tuple[Tensor, Tensor]:
    """hrnn.ops.gated_leaky_rnn through the kernels (caller checked shapes and `supports`). Under
    torch.no_grad the closed (sample, module) pairs' candidates are skipped, and with last_only no
    (B, T, H) tensor is written; with a gradient every candidate is computed (the straight-through
    gradient reads them) and the backward skips the closed pairs, except under a truncated gate, whose
    shut pairs need no candidate: forward and backward then compute the open pairs only (and those
    within `support` below the threshold, whose gate gradient reads their candidate)."""
    gated = gate_x is not None
    thr = None
    if gated and gate_mode != "soft":  # the reference's cast; broadcast only when it varies
        thr = torch.as_tensor(thresholds, dtype=x.dtype, device=x.device)
        if thr.dim():
            thr = thr.expand(x.shape[0], x.shape[1], gate_x.shape[0]).contiguous()
    truncated = gated and gate_mode == "truncated"
    inputs = (x, w_x, bias, gate_x, gate_bias, w_h, gate_h, waves, h0)
    args = [None if t is None else t.contiguous() for t in inputs]
    if not _needs_graph(inputs):  # forward only: closed modules' candidates are skipped
        with torch.no_grad():
            states, _, activations, _ = _C.gated_forward(*args, thr, truncated, 0.0, False, False, bool(last_only))
        return states, activations
    # The straight-through gradient (and a waves gradient) at a = 0 reads the candidate; a truncated
    # gate's gradient is 0 where shut.
    all_candidates = (gated and not truncated) or (waves is not None and waves.requires_grad)
    return _GatedLeakyRNN.apply(*args, thr, truncated, float(support), all_candidates, bool(last_only))


def last_candidate_blocks() -> int:
    """Candidate blocks (sample, step, module) the event-gated kernels computed in their last
    forward (-1 before any, or without them): B T M when dense, the number of open (b, t, m)
    when they skipped."""
    return _C.gated_candidate_blocks() if _C is not None else -1
