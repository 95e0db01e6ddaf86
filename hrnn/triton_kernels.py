"""Triton kernels of the leaky recurrence (issue 16); host side and autograd in hrnn/triton_core.py.

    h_t = lerp(h_{t-1}, tanh(u_t + h_{t-1} W_h^T), a_t)

One persistent program per BLOCK_B batch rows runs all T steps: W_h is loaded once and kept
on chip, each step is one `tl.dot` (BLOCK_B x HP) @ (HP x HP) with tanh and the blend fused
after it, and the state never leaves registers. The backward is the mirror loop from T-1 to 0
carrying dh; it writes dz = du (time-major) so that dW_h is one GEMM after the loop, and, when
the waves need a gradient, each program's batch-summed da per unit (summed over programs and
module units on the host: no atomics, deterministic).

Layouts: the states buffer is time-major (T + 1, B, H) with h0 in slot 0, so h_{t-1} for every
step is the contiguous slice buf[:-1] (the dW_h GEMM needs no copy); candidates and dz are
(T, B, H); u and the incoming state gradient are read through their strides, in any layout.

HP (H padded to a power of two >= 16) and T are compile-time constants: HP because tile shapes
must be, T because the interpreter (TRITON_INTERPRET=1, how the tests run these kernels on the
CPU) cannot loop over a runtime bound. Padded units load 0 for W_h, u and a, so they stay 0 and
never reach the real units.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from one exp: libdevice's tanh does not run in the interpreter. Absolute error a few
    ulp of 1; the sign is folded out so exp never overflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _lerp(h, c, a):
    """torch.lerp(h, c, a) the way torch computes it: a = 0 gives h and a = 1 gives c exactly."""
    return tl.where(a < 0.5, h + a * (c - h), c - (c - h) * (1.0 - a))


@triton.jit
def _operand(x, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """x as a tl.dot operand: bf16 rounds it; everything else stays fp32 (the dot's
    input_precision then picks ieee, tf32 or tf32x3)."""
    if PRECISION == "bf16":
        if INTERPRET:
            # The interpreter's tl.dot multiplies bf16 bit patterns as integers, and its casts do
            # not round to nearest: round fp32 to the nearest-even bf16 by hand (what the GPU's
            # conversion does) and keep it in fp32, where the exact product is the bf16 one.
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        else:
            x = x.to(tl.bfloat16)
    return x


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32 (fp64 for double operands)."""
    if PRECISION == "bf16":
        out = tl.dot(a, b)
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def leaky_forward_kernel(
    u, su_b, su_t,          # (B, T, H) input projection, bias included; unit stride over H
    w_h,                    # (H, H) recurrent weights, contiguous, already masked
    waves,                  # (T, M) contiguous
    h0,                     # (B, H) contiguous
    buf,                    # (T + 1, B, H) states, written at slots 1..T (if WRITE_STATES)
    cands,                  # (T, B, H) candidates tanh(.) for the backward (if WRITE_CANDS)
    last,                   # (B, H) final state (if WRITE_LAST)
    B, H, M, UNITS,
    T: tl.constexpr, HP: tl.constexpr, BLOCK_B: tl.constexpr,
    WRITE_STATES: tl.constexpr, WRITE_CANDS: tl.constexpr, WRITE_LAST: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, HP)
    col_ok = cols < H
    mask = (rows < B)[:, None] & col_ok[None, :]
    # W_h^T on chip for the whole loop: wt[k, j] = W_h[j, k], so h @ wt = h W_h^T.
    wt = tl.load(w_h + cols[None, :] * H + cols[:, None], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
    wt = _operand(wt, PRECISION, INTERPRET)
    module = cols // UNITS
    tile = rows[:, None] * H + cols[None, :]  # (B, H) offsets inside one time slice
    u_tile = u + rows[:, None] * su_b + cols[None, :]
    h = tl.load(h0 + tile, mask=mask, other=0.0)
    for t in range(T):
        u_t = tl.load(u_tile + t * su_t, mask=mask, other=0.0)
        a = tl.load(waves + t * M + module, mask=col_ok, other=0.0)[None, :]
        c = _tanh(_dot(_operand(h, PRECISION, INTERPRET), wt, PRECISION) + u_t)
        h = _lerp(h, c, a)
        if WRITE_STATES:
            tl.store(buf + (t + 1) * B * H + tile, h, mask=mask)
        if WRITE_CANDS:
            tl.store(cands + t * B * H + tile, c, mask=mask)
    if WRITE_LAST:
        tl.store(last + tile, h, mask=mask)


@triton.jit
def leaky_backward_kernel(
    grad, sg_b, sg_t,       # (B, T, H) gradient of all states (if GRAD_ALL), any strides, unit over H
    grad_last,              # (B, H) gradient of the final state (if not GRAD_ALL), contiguous
    buf,                    # (T + 1, B, H) states from the forward, h0 at slot 0
    cands,                  # (T, B, H) candidates from the forward
    w_h, waves,
    dz,                     # (T, B, H) out: gradient of the pre-activation = gradient of u
    dh0,                    # (B, H) out
    da_part,                # (programs, T, H) out: batch-summed da per unit (if NEED_DA)
    B, H, M, UNITS,
    T: tl.constexpr, HP: tl.constexpr, BLOCK_B: tl.constexpr,
    GRAD_ALL: tl.constexpr, NEED_DA: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, HP)
    col_ok = cols < H
    mask = (rows < B)[:, None] & col_ok[None, :]
    # W_h itself on chip: dh_{t-1} += dz_t @ W_h.
    w = tl.load(w_h + cols[:, None] * H + cols[None, :], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
    w = _operand(w, PRECISION, INTERPRET)
    module = cols // UNITS
    tile = rows[:, None] * H + cols[None, :]
    g_tile = grad + rows[:, None] * sg_b + cols[None, :]
    if GRAD_ALL:
        g = tl.zeros((BLOCK_B, HP), dtype=dz.dtype.element_ty)
    else:
        g = tl.load(grad_last + tile, mask=mask, other=0.0)
    for s in range(T):
        t = T - 1 - s
        if GRAD_ALL:
            g += tl.load(g_tile + t * sg_t, mask=mask, other=0.0)
        c = tl.load(cands + t * B * H + tile, mask=mask, other=0.0)
        a = tl.load(waves + t * M + module, mask=col_ok, other=0.0)[None, :]
        if NEED_DA:
            h_prev = tl.load(buf + t * B * H + tile, mask=mask, other=0.0)
            tl.store(da_part + (pid * T + t) * H + cols, tl.sum(g * (c - h_prev), axis=0), mask=col_ok)
        dz_t = g * a * (1.0 - c * c)
        tl.store(dz + t * B * H + tile, dz_t, mask=mask)
        g = g * (1.0 - a) + _dot(_operand(dz_t, PRECISION, INTERPRET), w, PRECISION)
    tl.store(dh0 + tile, g, mask=mask)
