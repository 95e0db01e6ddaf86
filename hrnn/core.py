"""The leaky modular recurrence, the one op every clocked model runs.

    h_t = a_t * tanh(u_t + W_h h_{t-1}) + (1 - a_t) * h_{t-1}

`u` is the input projection (W_x x_t + b); `a` holds one activation per module and
step, repeated over the module's units. Models call `leaky_rnn` (x, W_x, b in; the
projection is part of the op) and never loop over time themselves, so the fused
kernels replace the loop, and compute the projection inside it, behind this one function;
`leaky_scan` is the same recurrence for a precomputed u.
"""
from __future__ import annotations

import torch
from torch import Tensor

MATMUL_PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
# tl.dot precision of the CUDA kernels' per-step products. The op itself is exact; runs set
# trainer.matmul_precision (conf/trainer/default.yaml) through set_matmul_precision.
_matmul_precision = "ieee"


def set_matmul_precision(name: str) -> None:
    """Precision of the recurrent products on CUDA (the Triton kernels): ieee (fp32 FMA), tf32,
    tf32x3 (three tf32 products, about fp32 accuracy) or bf16 operands. The state and every
    accumulation stay fp32 in all of them; CPU tensors always run exact fp32/fp64."""
    if name not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision {name!r} is not allowed; allowed: {', '.join(MATMUL_PRECISIONS)}")
    global _matmul_precision
    _matmul_precision = name


def is_hard(waves: Tensor) -> bool:
    """True when every activation is exactly 0 or 1: inactive modules can be skipped."""
    return bool(((waves == 0) | (waves == 1)).all())


def leaky_scan_reference(u: Tensor, w_h: Tensor, waves: Tensor, h0: Tensor) -> Tensor:
    """Plain autograd loop over time: the definition the fast paths are tested against.

    u: (B, T, H) input projection, bias included.
    w_h: (H, H) recurrent weights, already masked for the connectivity.
    waves: (T, M) activation of each of the M modules at each step, in [0, 1].
    h0: (B, H) initial state.
    Returns all states, (B, T, H).
    """
    batch, steps, hidden = u.shape
    n_modules = waves.shape[1]
    a = waves.repeat_interleave(hidden // n_modules, dim=1)  # (T, H)
    w_t = w_h.t()
    h = h0
    states = []
    for t in range(steps):
        candidate = torch.tanh(torch.addmm(u[:, t], h, w_t))
        h = torch.lerp(h, candidate, a[t])
        states.append(h)
    return torch.stack(states, dim=1)


def leaky_scan(u: Tensor, w_h: Tensor, waves: Tensor, h0: Tensor, skip_inactive: bool | None = None,
               last_only: bool = False) -> Tensor:
    """All states of the leaky recurrence, (B, T, H); see the module docstring.

    skip_inactive: compute only the modules active at each step (valid for hard 0/1
    waves only); None decides by looking at the waves, False forces the dense path.
    last_only: return only the final state, (B, H): the same values (and gradients) as
    `leaky_scan(...)[:, -1]`, but the backward never builds a (B, T, H) gradient that is
    zero everywhere except the last step (a 40 MB allocation per step at T = 784).
    """
    _check_shapes(u.shape, w_h, waves, h0)
    from hrnn import fused  # deferred: hrnn.fused imports the compiled extension

    if u.is_cuda:  # the Triton kernels, else the PyTorch loop; one log line says which and why
        from hrnn import triton_core
        if triton_core.use_kernels(u, w_h, waves, h0):
            return triton_core.leaky_scan(u, w_h, waves, h0, last_only, _matmul_precision)
        return fused.leaky_scan_loop(u, w_h, waves, h0, last_only)
    reason = fused.supports(u, w_h, waves, h0)
    if reason is not None:
        fused.warn_fallback(reason)
        return fused.leaky_scan_loop(u, w_h, waves, h0, last_only)
    if skip_inactive is None:
        skip_inactive = is_hard(waves)
    return fused.leaky_scan(u, w_h, waves, h0, skip_inactive, last_only)


def leaky_rnn(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, waves: Tensor, h0: Tensor,
              skip_inactive: bool | None = None, last_only: bool = False) -> Tensor:
    """`leaky_scan(F.linear(x, w_x, bias), w_h, waves, h0, ...)`: the layer models call.

    x: (B, T, I) inputs, w_x: (H, I), bias: (H,) or None. The fused kernels compute the
    projection inside the time loop (only for active modules on a hard clock) and its weight
    gradients inside the backward loop, so no (B, T, H) input projection is materialized;
    elsewhere the projection is one product before `leaky_scan`'s loop. Same values either way.
    """
    if x.dim() != 3 or w_x.shape != (w_h.shape[0], x.shape[-1]) or (
            bias is not None and bias.shape != (w_h.shape[0],)):
        raise ValueError(f"x {tuple(x.shape)}, w_x {tuple(w_x.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit hidden size {w_h.shape[0]}")
    from hrnn import fused

    if x.is_cuda:  # the Triton kernels, else the projection and leaky_scan's CUDA branch (the loop)
        from hrnn import triton_core
        _check_shapes((x.shape[0], x.shape[1], w_h.shape[0]), w_h, waves, h0)
        if triton_core.use_kernels(x, w_h, w_x, waves, h0, *(() if bias is None else (bias,))):
            return triton_core.leaky_rnn(x, w_x, bias, w_h, waves, h0, last_only, _matmul_precision)
        return leaky_scan(torch.nn.functional.linear(x, w_x, bias), w_h, waves, h0, last_only=last_only)
    reason = fused.supports(x, w_x, w_h, waves, h0, *(() if bias is None else (bias,)))
    if reason is not None:
        return leaky_scan(torch.nn.functional.linear(x, w_x, bias), w_h, waves, h0,
                          skip_inactive=skip_inactive, last_only=last_only)
    _check_shapes((x.shape[0], x.shape[1], w_h.shape[0]), w_h, waves, h0)
    if skip_inactive is None:  # learned waves in training never skip (fused.py): spare the (T, H) test
        skip_inactive = not (waves.requires_grad and torch.is_grad_enabled()) and is_hard(waves)
    return fused.leaky_rnn(x, w_x, bias, w_h, waves, h0, skip_inactive, last_only)


def leaky_rnn_reference(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, waves: Tensor,
                        h0: Tensor) -> Tensor:
    """`leaky_rnn`'s definition: the projection as F.linear, then the reference loop."""
    return leaky_scan_reference(torch.nn.functional.linear(x, w_x, bias), w_h, waves, h0)


def _check_shapes(u_shape: tuple, w_h: Tensor, waves: Tensor, h0: Tensor) -> None:
    batch, steps, hidden = u_shape
    if w_h.shape != (hidden, hidden):
        raise ValueError(f"w_h has shape {tuple(w_h.shape)}, expected ({hidden}, {hidden})")
    if waves.dim() != 2 or waves.shape[0] != steps or hidden % waves.shape[1] != 0:
        raise ValueError(f"waves has shape {tuple(waves.shape)}, expected ({steps}, M) with M dividing {hidden}")
    if h0.shape != (batch, hidden):
        raise ValueError(f"h0 has shape {tuple(h0.shape)}, expected ({batch}, {hidden})")
