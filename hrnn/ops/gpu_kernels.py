"""Triton kernels of the leaky recurrence; host side and autograd in hrnn/ops/gpu.py.

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
def _round_bf16(x, INTERPRET: tl.constexpr):
    """x rounded to the nearest-even bf16: a bf16 tensor on the GPU; in the interpreter, whose tl.dot
    multiplies bf16 bit patterns as integers and whose casts do not round to nearest, the same value
    kept in fp32 (rounded by hand, as the GPU's conversion does), where the exact product is the bf16 one."""
    if INTERPRET:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    else:
        out = x.to(tl.bfloat16)
    return out


@triton.jit
def _operand(x, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """x as a _dot operand, (hi, lo): for bf16x3 x = hi + lo to 16 bits, both bf16 (a loop-invariant
    weight is split once, before the loop); bf16 rounds x (lo unused); everything else keeps x in
    fp32 (the dot's input_precision then picks ieee, tf32 or tf32x3)."""
    if PRECISION == "bf16x3":
        hi = _round_bf16(x, INTERPRET)
        lo = _round_bf16(x - hi.to(tl.float32), INTERPRET)
    elif PRECISION == "bf16":
        hi = _round_bf16(x, INTERPRET)
        lo = hi
    else:
        hi = x
        lo = x
    return hi, lo


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, CHAINS: tl.constexpr = 1):
    """a @ b for operands from _operand, accumulated in fp32 (fp64 for double operands). bf16x3 is
    three bf16 products, the small terms first: a_hi b_lo + a_lo b_hi + a_hi b_hi, within about
    2^-16 of the fp32 product at twice tf32's tensor-core rate and half its operand registers."""
    a_hi, a_lo = a
    b_hi, b_lo = b
    if PRECISION == "bf16x3" and CHAINS == 3:  # three independent accumulations: a shorter serial chain
        out = tl.dot(a_hi, b_hi) + (tl.dot(a_lo, b_hi) + tl.dot(a_hi, b_lo))
    elif PRECISION == "bf16x3":
        out = tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo))
        out = tl.dot(a_hi, b_hi, out)
    elif PRECISION == "bf16":
        out = tl.dot(a_hi, b_hi)
    else:
        out = tl.dot(a_hi, b_hi, input_precision=PRECISION)
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
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr, CHAINS: tl.constexpr,
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
    # Each step's inputs are loaded one step ahead: their latency hides behind the step before.
    u_next = tl.load(u_tile, mask=mask, other=0.0)
    a_next = tl.load(waves + module, mask=col_ok, other=0.0)[None, :]
    for t in range(T):
        u_t = u_next
        a = a_next
        ahead = tl.minimum(t + 1, T - 1)
        u_next = tl.load(u_tile + ahead * su_t, mask=mask, other=0.0)
        a_next = tl.load(waves + ahead * M + module, mask=col_ok, other=0.0)[None, :]
        c = _tanh(_dot(_operand(h, PRECISION, INTERPRET), wt, PRECISION, CHAINS) + u_t)
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
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr, CHAINS: tl.constexpr,
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
    # Step T-1's inputs first; each step then loads the one before it ahead of its product.
    c_next = tl.load(cands + (T - 1) * B * H + tile, mask=mask, other=0.0)
    a_next = tl.load(waves + (T - 1) * M + module, mask=col_ok, other=0.0)[None, :]
    if GRAD_ALL:
        g_next = tl.load(g_tile + (T - 1) * sg_t, mask=mask, other=0.0)
    if NEED_DA:
        hp_next = tl.load(buf + (T - 1) * B * H + tile, mask=mask, other=0.0)
    for s in range(T):
        t = T - 1 - s
        ahead = tl.maximum(t - 1, 0)
        c = c_next
        a = a_next
        c_next = tl.load(cands + ahead * B * H + tile, mask=mask, other=0.0)
        a_next = tl.load(waves + ahead * M + module, mask=col_ok, other=0.0)[None, :]
        if GRAD_ALL:
            g += g_next
            g_next = tl.load(g_tile + ahead * sg_t, mask=mask, other=0.0)
        if NEED_DA:
            h_prev = hp_next
            hp_next = tl.load(buf + ahead * B * H + tile, mask=mask, other=0.0)
            tl.store(da_part + (pid * T + t) * H + cols, tl.sum(g * (c - h_prev), axis=0), mask=col_ok)
        dz_t = g * a * (1.0 - c * c)
        tl.store(dz + t * B * H + tile, dz_t, mask=mask)
        g = g * (1.0 - a) + _dot(_operand(dz_t, PRECISION, INTERPRET), w, PRECISION, CHAINS)
    tl.store(dh0 + tile, g, mask=mask)


# ---------------------------------------------------------------------------------------------
# The event-gated recurrence (hrnn/ops/reference.py's definition), soft, hard or truncated gates (GATE 0, 1, 2):
#
#     g_t = sigmoid(gu_t + h_{t-1} G_h^T)     gu_t = x_t G_x^T + g_b, one product before the loop
#     e_t = g_t, or 1[g_t > threshold_t] (straight-through: the backward passes dL/de to g)
#     a_t = w_t * e_t                         w_t the clock wave (T, M), per sample (B, T, M), or 1
#     h_t = lerp(h_{t-1}, tanh(u_t + h_{t-1} W_h^T), a_t)
#
# Units live in a padded layout of MP = next_pow2(M) modules x UP = next_pow2(H / M) units.
# Units past H / M and modules past M load zeros and stay zero. Two layouts of the gate (UNIT_GATES):
#
# - unit gates (the default but in tf32x3): every unit computes its module's gate. The gate's
#   product is a second (BLOCK_B x HP) @ (HP x HP) tensor-core product from the same operand h,
#   G_h's row m repeated over module m's columns, in the main product's precision, so every gate
#   quantity is born in the units' layout: no module sums or broadcasts on the serial chain (on
#   an H200, 6.4-6.6 ms against 8.0 for the module layout, the recurrence at B = 100, T = 784,
#   bf16x3; docs/gpu.md). The backward stores each unit's share of dL/da; the host sums them.
# - module gates: a module's quantities (B, MP) and its units' (B, MP * UP) convert by reshape (a
#   module sum is a sum over the last axis of (B, MP, UP), a module value reaches its units by
#   broadcast). The gate's product h G_h^T is one tl.dot of N = NG = max(16, MP) columns (tl.dot's
#   minimum), G_h in the first MP, zeros after, summed back to MP by reshape; its backward dzg G_h
#   reads dzg repeated NG / MP times against the same rows. Both are exact fp32 (FMA): in tf32x3
#   the split operands leave no registers for a second tensor-core product (ptxas spilled 22 KB
#   per thread, 185 ms a step on an H100 against 8.6 ms in tf32; docs/gpu.md).


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _to_units(x, BLOCK_B: tl.constexpr, MP: tl.constexpr, UP: tl.constexpr):
    """(BLOCK_B, MP) per module -> (BLOCK_B, MP * UP) per unit."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], (BLOCK_B, MP, UP)), (BLOCK_B, MP * UP))


@triton.jit
def _module_sums(x, BLOCK_B: tl.constexpr, MP: tl.constexpr, UP: tl.constexpr):
    """(BLOCK_B, MP * UP) per unit -> (BLOCK_B, MP): each module's sum over its units."""
    return tl.sum(tl.reshape(x, (BLOCK_B, MP, UP)), axis=2)


@triton.jit
def _threshold(thr, thr_value, offsets, mmask, THR_TENSOR: tl.constexpr):
    """The thresholds at these offsets of (T, B, M), or the one value."""
    if THR_TENSOR:
        th = tl.load(thr + offsets, mask=mmask, other=1.0)
    else:
        th = thr_value
    return th


@triton.jit
def _gate_value(g, thr, thr_value, offsets, mmask, GATE: tl.constexpr, THR_TENSOR: tl.constexpr):
    """e: g itself (soft), 1[g > threshold] (hard) or g where g > threshold, else 0 (truncated), with
    thresholds (T, B, M) or one value."""
    if GATE != 0:
        th = _threshold(thr, thr_value, offsets, mmask, THR_TENSOR)
        if GATE == 2:
            e = tl.where(g > th, g, 0.0)
        else:
            e = (g > th).to(g.dtype)
    else:
        e = g
    return e


@triton.jit
def _wave(waves, t, B, M, mcols, m_ok, mtile, mmask, g, WAVES: tl.constexpr):
    """w_t in module layout: (1, MP) shared, (BLOCK_B, MP) per sample, or ones."""
    if WAVES == 1:
        w = tl.load(waves + t * M + mcols, mask=m_ok, other=0.0)[None, :]
    elif WAVES == 2:
        w = tl.load(waves + t * B * M + mtile, mask=mmask, other=0.0)
    else:
        w = tl.where(m_ok[None, :], 1.0, 0.0).to(g.dtype)
    return w


@triton.jit
def _activation(g, thr, thr_value, waves, t, B, M, mcols, m_ok, mtile, mmask, GATE: tl.constexpr,
                THR_TENSOR: tl.constexpr, WAVES: tl.constexpr):
    """(e, w, a) at step t: the gate's value, the clock wave, and a = w e (0 in padded modules)."""
    e = _gate_value(g, thr, thr_value, t * B * M + mtile, mmask, GATE, THR_TENSOR)
    w = _wave(waves, t, B, M, mcols, m_ok, mtile, mmask, g, WAVES)
    return e, w, tl.where(m_ok[None, :], e * w, 0.0)


@triton.jit
def _saved_step(buf, cands, t, B, H, tile, mask):
    """What the forward saved of step t: the candidates and h_{t-1} (buf's slot t)."""
    c = tl.load(cands + t * B * H + tile, mask=mask, other=0.0)
    h_prev = tl.load(buf + t * B * H + tile, mask=mask, other=0.0)
    return c, h_prev


@triton.jit
def _gate_grad(da, g, e, w, grad_act, dwave, t, B, M, mtile, mmask, m_ok, th, support,
               HAS_GRAD_ACT: tl.constexpr, NEED_DWAVE: tl.constexpr, GATE: tl.constexpr):
    """The gradient of one step's gate logits from da, the module sums of dL/dh_t (c - h_prev) (plus
    dL/da if given; stored times e as dL/dw if asked): dz = da w g (1 - g), straight-through when hard
    (de = dg), and 0 where a truncated gate is shut, except within `support` below its threshold (the
    pseudo-derivative: the open gate's gradient there, which the kernel then keeps apart from the
    carry: it reaches the gate's weights only)."""
    if HAS_GRAD_ACT:
        da += tl.load(grad_act + t * B * M + mtile, mask=mmask, other=0.0)
    if NEED_DWAVE:
        tl.store(dwave + t * B * M + mtile, da * e, mask=mmask)
    return tl.where(m_ok[None, :], _logit_grad(da, g, w, th, support, GATE), 0.0)


@triton.jit
def _logit_grad(da, g, w, th, support, GATE: tl.constexpr):
    """The gate logits' gradient from dL/da (either layout): da w g (1 - g), and 0 where a truncated
    gate is shut beyond `support` below its threshold th (the step's thresholds, read once by the caller)."""
    dz = da * w * g * (1.0 - g)
    if GATE == 2:
        dz = tl.where(g > th - support, dz, 0.0)
    return dz


@triton.jit
def _gated_layout(B, M, UNITS, MP: tl.constexpr, UP: tl.constexpr, NG: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's rows, and the padded layout: each padded column's unit index in H, which
    columns and modules are real, the masks of (rows, units) and (rows, modules), the gate
    product's columns."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols = tl.arange(0, MP * UP)
    unit = (cols // UP) * UNITS + cols % UP
    col_ok = (cols // UP < M) & (cols % UP < UNITS)
    mcols = tl.arange(0, MP)
    m_ok = mcols < M
    mask = row_ok[:, None] & col_ok[None, :]
    mmask = row_ok[:, None] & m_ok[None, :]
    return rows, unit, col_ok, mask, mcols, m_ok, mmask, tl.arange(0, NG)


@triton.jit
def gated_forward_kernel(
    u,                      # (T, B, H) x W_x^T + b, contiguous
    gu,                     # (T, B, M) x G_x^T + g_b, contiguous
    w_h, gate_h,            # (H, H), (M, H) contiguous
    waves,                  # (T, M) if WAVES == 1, (T, B, M) if WAVES == 2 (time-major), else unused
    thr, thr_value,         # (T, B, M) thresholds if THR_TENSOR, else the one value (hard and truncated gates)
    h0,                     # (B, H)
    buf,                    # (T + 1, B, H) states at slots 1..T (if WRITE_STATES)
    cands,                  # (T, B, H) candidates (if WRITE_CANDS)
    gates,                  # (T, B, M) g_t (if WRITE_CANDS: the backward reads them)
    acts,                   # (T, B, M) a_t, always (the op returns them)
    last,                   # (B, H) final state (if WRITE_LAST)
    B, H, M, UNITS,
    T: tl.constexpr, MP: tl.constexpr, UP: tl.constexpr, NG: tl.constexpr, BLOCK_B: tl.constexpr,
    WAVES: tl.constexpr, GATE: tl.constexpr, THR_TENSOR: tl.constexpr,
    WRITE_STATES: tl.constexpr, WRITE_CANDS: tl.constexpr, WRITE_LAST: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr, UNIT_GATES: tl.constexpr,
    CHAINS: tl.constexpr,
):
    rows, unit, col_ok, mask, mcols, m_ok, mmask, ng = _gated_layout(B, M, UNITS, MP, UP, NG, BLOCK_B)
    wt = tl.load(w_h + unit[None, :] * H + unit[:, None], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
    wt = _operand(wt, PRECISION, INTERPRET)
    tile = rows[:, None] * H + unit[None, :]
    if UNIT_GATES:
        # Every unit computes its module's gate: G_h's row for module m fills the columns of m's
        # units, so the gate's product is a second tensor-core product beside the main one, from
        # the same operand h, and every gate quantity is already in the units' layout. The
        # module-layout names below index per unit; stores keep each module's first unit only.
        module = tl.arange(0, MP * UP) // UP
        gt = tl.load(gate_h + module[None, :] * H + unit[:, None], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
        gt = _operand(gt, PRECISION, INTERPRET)
        mcols, m_ok = module, col_ok
        mtile = rows[:, None] * M + module[None, :]
        mmask = mask
        store_mask = mask & (tl.arange(0, MP * UP) % UP == 0)[None, :]
    else:
        gt = tl.load(gate_h + ng[None, :] * H + unit[:, None], mask=col_ok[:, None] & (ng < M)[None, :], other=0.0)
        mtile = rows[:, None] * M + mcols[None, :]
        store_mask = mmask
    h = tl.load(h0 + tile, mask=mask, other=0.0)
    # The next step's inputs are loaded one step ahead: their latency hides behind this step's products.
    u_next = tl.load(u + tile, mask=mask, other=0.0)
    gu_next = tl.load(gu + mtile, mask=mmask, other=0.0)
    for t in range(T):
        u_t = u_next
        gu_t = gu_next
        ahead = tl.minimum(t + 1, T - 1)
        u_next = tl.load(u + ahead * B * H + tile, mask=mask, other=0.0)
        gu_next = tl.load(gu + ahead * B * M + mtile, mask=mmask, other=0.0)
        h_op = _operand(h, PRECISION, INTERPRET)
        pre = _dot(h_op, wt, PRECISION, CHAINS) + u_t
        if UNIT_GATES:
            z = _dot(h_op, gt, PRECISION, CHAINS) + gu_t
        else:
            z = tl.sum(tl.reshape(_dot((h, h), (gt, gt), "ieee"), (BLOCK_B, NG // MP, MP)), axis=1) + gu_t
        g = _sigmoid(z)
        _, _, a = _activation(g, thr, thr_value, waves, t, B, M, mcols, m_ok, mtile, mmask, GATE, THR_TENSOR, WAVES)
        if not (UNIT_GATES and WRITE_CANDS):  # else the host derives a_t from the stored gates
            tl.store(acts + t * B * M + mtile, a, mask=store_mask)
        c = _tanh(pre)
        if UNIT_GATES:
            h = _lerp(h, c, a)
        else:
            h = _lerp(h, c, _to_units(a, BLOCK_B, MP, UP))
        if WRITE_STATES:
            tl.store(buf + (t + 1) * B * H + tile, h, mask=mask)
        if WRITE_CANDS:
            tl.store(cands + t * B * H + tile, c, mask=mask)
            tl.store(gates + t * B * M + mtile, g, mask=store_mask)
    if WRITE_LAST:
        tl.store(last + tile, h, mask=mask)


@triton.jit
def gated_backward_kernel(
    grad, sg_b, sg_t,       # (B, T, H) gradient of all states (if GRAD_ALL), unit stride over H
    grad_last,              # (B, H) gradient of the final state (if not GRAD_ALL and HAS_GRAD), contiguous
    grad_act,               # (T, B, M) gradient of the activations (if HAS_GRAD_ACT), contiguous
    buf, cands, gates,      # from the forward
    w_h, gate_h, waves, thr, thr_value,
    support,                # truncated: the shut gates with g > threshold - support get the open gate's gradient
    dz,                     # (T, B, H) out: gradient of u
    dzg,                    # (T, B, M) out: gradient of gu (the gate's pre-activation)
    dzl,                    # (T, B, M) out (if SUPPORT): the logits' gradient at the shut entries within the
                            # support, for the gate's weights only (dzg is 0 there: nothing reaches x or h)
    dwave,                  # (T, B, M) out: dL/dw_t per sample (if NEED_DWAVE)
    dh0,                    # (B, H) out
    B, H, M, UNITS,
    T: tl.constexpr, MP: tl.constexpr, UP: tl.constexpr, NG: tl.constexpr, BLOCK_B: tl.constexpr,
    WAVES: tl.constexpr, GATE: tl.constexpr, THR_TENSOR: tl.constexpr,
    GRAD_ALL: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_GRAD_ACT: tl.constexpr, NEED_DWAVE: tl.constexpr,
    SUPPORT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, UNIT_GATES: tl.constexpr,
    CHAINS: tl.constexpr,
):
    rows, unit, col_ok, mask, mcols, m_ok, mmask, ng = _gated_layout(B, M, UNITS, MP, UP, NG, BLOCK_B)
    w = tl.load(w_h + unit[:, None] * H + unit[None, :], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
    w = _operand(w, PRECISION, INTERPRET)
    tile = rows[:, None] * H + unit[None, :]
    if UNIT_GATES:
        # The forward's layout: every unit holds its module's gate quantities. A module's dL/da is the
        # sum over its units of their shares gh (c - h_prev) (plus dL/da at its first unit): the shares
        # are stored (T, B, H), and the host sums them and derives dzg, dzl and dwave, off the serial
        # chain. The carry's dzg G_h is the product of each unit's share times its module's
        # w g (1 - g) with G_h's row m repeated at every unit of module m: no module sum on the chain.
        module = tl.arange(0, MP * UP) // UP
        first = tl.arange(0, MP * UP) % UP == 0
        gexp = tl.load(gate_h + module[:, None] * H + unit[None, :], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
        gexp = _operand(gexp, PRECISION, INTERPRET)
        mcols, m_ok = module, col_ok
        mtile = rows[:, None] * M + module[None, :]
        mmask = mask
        first_mask = mask & first[None, :]
    else:
        gr = tl.load(gate_h + ng[:, None] * H + unit[None, :], mask=(ng < M)[:, None] & col_ok[None, :], other=0.0)
        mtile = rows[:, None] * M + mcols[None, :]
    g_tile = grad + rows[:, None] * sg_b + unit[None, :]
    if GRAD_ALL or not HAS_GRAD:
        gh = tl.zeros((BLOCK_B, MP * UP), dtype=dz.dtype.element_ty)
    else:
        gh = tl.load(grad_last + tile, mask=mask, other=0.0)
    # Step T-1's inputs first; each step then loads the one before it ahead of its products.
    c_next, hp_next = _saved_step(buf, cands, T - 1, B, H, tile, mask)
    if not UNIT_GATES:
        g_next = tl.load(gates + (T - 1) * B * M + mtile, mask=mmask, other=0.0)
    if GRAD_ALL:
        grad_next = tl.load(g_tile + (T - 1) * sg_t, mask=mask, other=0.0)
    for s in range(T):
        t = T - 1 - s
        c = c_next
        h_prev = hp_next
        ahead = tl.maximum(t - 1, 0)
        c_next, hp_next = _saved_step(buf, cands, ahead, B, H, tile, mask)
        if UNIT_GATES:  # the gates (T, B, M) read per unit at their step: a step ahead spilled registers
            g = tl.load(gates + t * B * M + mtile, mask=mmask, other=0.0)
        else:
            g = g_next
            g_next = tl.load(gates + ahead * B * M + mtile, mask=mmask, other=0.0)
        if GRAD_ALL:
            gh += grad_next
            grad_next = tl.load(g_tile + ahead * sg_t, mask=mask, other=0.0)
        e, w_t, a = _activation(g, thr, thr_value, waves, t, B, M, mcols, m_ok, mtile, mmask, GATE, THR_TENSOR, WAVES)
        th = _threshold(thr, thr_value, t * B * M + mtile, mmask, THR_TENSOR) if GATE == 2 else thr_value
        if UNIT_GATES:
            share = gh * (c - h_prev)
            if HAS_GRAD_ACT:  # dL/da joins the module's sum once, at its first unit
                share += tl.load(grad_act + t * B * M + mtile, mask=first_mask, other=0.0)
            tl.store(dzg + t * B * H + tile, share, mask=mask)  # the host derives dzg, dzl and dwave
            dzg_t = _logit_grad(share, g, w_t, th, support, GATE)
            if SUPPORT:
                dzg_t = tl.where(g <= th, 0.0, dzg_t)
            dzg_t = tl.where(col_ok[None, :], dzg_t, 0.0)
            a_units = a
            gate_back = _dot(_operand(dzg_t, PRECISION, INTERPRET), gexp, PRECISION)
        else:
            da = _module_sums(gh * (c - h_prev), BLOCK_B, MP, UP)
            dzg_t = _gate_grad(da, g, e, w_t, grad_act, dwave, t, B, M, mtile, mmask, m_ok, th, support,
                               HAS_GRAD_ACT, NEED_DWAVE, GATE)
            if SUPPORT:  # the shut entries within the support: their gradient goes to dzl, not on to x or h
                shut = g <= th
                tl.store(dzl + t * B * M + mtile, tl.where(shut, dzg_t, 0.0), mask=mmask)
                dzg_t = tl.where(shut, 0.0, dzg_t)
            tl.store(dzg + t * B * M + mtile, dzg_t, mask=mmask)
            a_units = _to_units(a, BLOCK_B, MP, UP)
            dzg_rep = tl.reshape(tl.broadcast_to(dzg_t[:, None, :], (BLOCK_B, NG // MP, MP)), (BLOCK_B, NG))
            gate_back = _dot((dzg_rep, dzg_rep), (gr, gr), "ieee")
        dz_t = gh * a_units * (1.0 - c * c)
        tl.store(dz + t * B * H + tile, dz_t, mask=mask)
        gh = gh * (1.0 - a_units) + _dot(_operand(dz_t, PRECISION, INTERPRET), w, PRECISION, CHAINS) + gate_back
    tl.store(dh0 + tile, gh, mask=mask)
