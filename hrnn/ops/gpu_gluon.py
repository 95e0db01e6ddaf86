"""Gluon kernels of both CUDA ops: hrnn/ops/gpu_kernels.py's clock kernels (leaky_forward_kernel,
leaky_backward_kernel) and gated kernels in the unit-gate layout (gated_forward_kernel,
gated_backward_kernel) with every layout written out, for bf16x3 in float32 (the default precision).

Same arguments and results as the Triton kernels (host side: hrnn/ops/gpu.py, which picks these on
a GPU where they apply). Why they exist: the Triton compiler loads u and stores h and c in a
coalesced layout, so each step converted its tiles between that layout and the tensor-core
accumulator's through shared memory, 8 barriers a step in the clock forward and 12 in the gated one
(by disassembly, sm_90). Here every per-step tile lives in the accumulator layout: u is loaded, h
and c are stored and the waves are read in it, and the one exchange a step needs (bf16 halves into
the A operand, since each warp computes 16 columns from all HP units) is one shared-memory round
trip: 2 barriers a step. W_h's two bf16 halves stay in registers, already in the B operand's layout,
for the whole loop.

Gluon has no interpreter: tests/test_gluon.py compiles these for sm_90 on any machine (no spills,
the barrier and MMA counts) and checks them against the reference on a GPU when one is present.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

# One warp per 16 columns of the state (HP / 16 warps, at most 8): each computes its columns of
# every product from the whole state, so a warp's B operand (HP x 16, two bf16 halves) fits in
# its registers. Units above 128 would need W_h back in shared memory; they run the Triton kernels.
MAX_PADDED = 128


def num_warps(hp: int) -> int:
    """Warps of a program for HP padded units (the launch's num_warps must be this)."""
    return max(1, hp // 16)


@gluon.jit
def _tanh(x):
    """tanh from one exp2 and one approximate division (a few ulp of 1); sign folded out."""
    e = gl.exp2(-2.8853900817779268 * gl.abs(x))  # exp(-2|x|)
    t = gl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)
    return gl.where(x < 0, -t, t)


@gluon.jit
def _lerp(h, c, a):
    """torch.lerp(h, c, a) as torch computes it (a = 0 gives h, a = 1 gives c, exactly)."""
    return gl.where(a < 0.5, h + a * (c - h), c - (c - h) * (1.0 - a))


@gluon.jit
def _split(x):
    """x = hi + lo to 16 bits, both bf16 (bf16x3's operand)."""
    hi = x.to(gl.bfloat16)
    return hi, (x - hi.to(gl.float32)).to(gl.bfloat16)


@gluon.jit
def _exchange(x, s_hi, s_lo, A_OP: gl.constexpr):
    """x's bf16 halves through shared memory into the A operand's layout: the step's one exchange
    between warps (each warp computes its columns of a product from every unit)."""
    _split_into(x, s_hi, s_lo)
    return s_hi.load(A_OP), s_lo.load(A_OP)


@gluon.jit
def _split_into(x, s_hi, s_lo):
    x_hi, x_lo = _split(x)
    s_hi.store(x_hi)
    s_lo.store(x_lo)


@gluon.jit
def _products(a_hi, a_lo, w_hi, w_lo, acc, CHAINS: gl.constexpr):
    """acc + a @ w in bf16x3 from operands in their layouts: three bf16 products, small terms
    first, in three independent accumulations (CHAINS 3: a dependent chain of HP / 16 MMAs) or one."""
    if CHAINS == 3:
        zero = gl.zeros_like(acc)
        out = mma_v2(a_hi, w_hi, acc) + (mma_v2(a_lo, w_hi, zero) + mma_v2(a_hi, w_lo, zero))
    else:
        out = mma_v2(a_hi, w_hi, mma_v2(a_lo, w_hi, mma_v2(a_hi, w_lo, acc)))
    return out


@gluon.jit
def _weights(w_h, H, HP: gl.constexpr, TRANSPOSE: gl.constexpr, B_OP: gl.constexpr):
    """W_h (or W_h^T) as bf16x3's two B operands, zero outside H x H."""
    k = gl.arange(0, HP, layout=gl.SliceLayout(1, B_OP))
    j = gl.arange(0, HP, layout=gl.SliceLayout(0, B_OP))
    if TRANSPOSE:  # w[k, j] = W_h[j, k]
        offsets = j[None, :] * H + k[:, None]
    else:
        offsets = k[:, None] * H + j[None, :]
    w = gl.load(w_h + offsets, mask=(k < H)[:, None] & (j < H)[None, :], other=0.0)
    return _split(w)


@gluon.jit
def leaky_forward_kernel(
    u, su_b, su_t, w_h, waves, h0, buf, cands, last,
    B, H, M, UNITS,
    T: gl.constexpr, HP: gl.constexpr, BLOCK_B: gl.constexpr,
    WRITE_STATES: gl.constexpr, WRITE_CANDS: gl.constexpr, WRITE_LAST: gl.constexpr,
    NUM_WARPS: gl.constexpr, CHAINS: gl.constexpr,
):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    rows = gl.program_id(0) * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, HP, layout=gl.SliceLayout(0, mma))
    col_ok = cols < H
    mask = (rows < B)[:, None] & col_ok[None, :]
    w_hi, w_lo = _weights(w_h, H, HP, True, B_OP)
    s_hi = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_B, HP], SMEM)
    s_lo = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_B, HP], SMEM)
    module = cols // UNITS
    tile = rows[:, None] * H + cols[None, :]
    u_tile = u + rows[:, None] * su_b + cols[None, :]
    h = gl.load(h0 + tile, mask=mask, other=0.0)
    # Each step's inputs are loaded one step ahead: their latency hides behind the step before.
    u_next = gl.load(u_tile, mask=mask, other=0.0)
    a_next = gl.load(waves + module, mask=col_ok, other=0.0)[None, :]
    for t in range(T):
        u_t = u_next
        a = a_next
        ahead = gl.minimum(t + 1, T - 1)
        u_next = gl.load(u_tile + ahead * su_t, mask=mask, other=0.0)
        a_next = gl.load(waves + ahead * M + module, mask=col_ok, other=0.0)[None, :]
        x_hi, x_lo = _exchange(h, s_hi, s_lo, A_OP)
        c = _tanh(_products(x_hi, x_lo, w_hi, w_lo, u_t, CHAINS))
        h = _lerp(h, c, a)
        if WRITE_STATES:
            gl.store(buf + (t + 1) * B * H + tile, h, mask=mask)
        if WRITE_CANDS:
            gl.store(cands + t * B * H + tile, c, mask=mask)
    if WRITE_LAST:
        gl.store(last + tile, h, mask=mask)


@gluon.jit
def leaky_backward_kernel(
    grad, sg_b, sg_t, grad_last, buf, cands, w_h, waves, dz, dh0, da_part,
    B, H, M, UNITS,
    T: gl.constexpr, HP: gl.constexpr, BLOCK_B: gl.constexpr,
    GRAD_ALL: gl.constexpr, NEED_DA: gl.constexpr,
    NUM_WARPS: gl.constexpr, CHAINS: gl.constexpr,
):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    pid = gl.program_id(0)
    rows = pid * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, HP, layout=gl.SliceLayout(0, mma))
    col_ok = cols < H
    mask = (rows < B)[:, None] & col_ok[None, :]
    w_hi, w_lo = _weights(w_h, H, HP, False, B_OP)  # dh_{t-1} += dz_t @ W_h
    s_hi = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_B, HP], SMEM)
    s_lo = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_B, HP], SMEM)
    module = cols // UNITS
    tile = rows[:, None] * H + cols[None, :]
    g_tile = grad + rows[:, None] * sg_b + cols[None, :]
    if GRAD_ALL:
        g = gl.zeros([BLOCK_B, HP], gl.float32, layout=mma)
    else:
        g = gl.load(grad_last + tile, mask=mask, other=0.0)
    c_next = gl.load(cands + (T - 1) * B * H + tile, mask=mask, other=0.0)
    a_next = gl.load(waves + (T - 1) * M + module, mask=col_ok, other=0.0)[None, :]
    if GRAD_ALL:
        g_next = gl.load(g_tile + (T - 1) * sg_t, mask=mask, other=0.0)
    if NEED_DA:
        hp_next = gl.load(buf + (T - 1) * B * H + tile, mask=mask, other=0.0)
    for s in range(T):
        t = T - 1 - s
        ahead = gl.maximum(t - 1, 0)
        c = c_next
        a = a_next
        c_next = gl.load(cands + ahead * B * H + tile, mask=mask, other=0.0)
        a_next = gl.load(waves + ahead * M + module, mask=col_ok, other=0.0)[None, :]
        if GRAD_ALL:
            g += g_next
            g_next = gl.load(g_tile + ahead * sg_t, mask=mask, other=0.0)
        if NEED_DA:
            h_prev = hp_next
            hp_next = gl.load(buf + ahead * B * H + tile, mask=mask, other=0.0)
            gl.store(da_part + (pid * T + t) * H + cols, gl.sum(g * (c - h_prev), axis=0), mask=col_ok)
        dz_t = g * a * (1.0 - c * c)
        gl.store(dz + t * B * H + tile, dz_t, mask=mask)
        x_hi, x_lo = _exchange(dz_t, s_hi, s_lo, A_OP)
        g = _products(x_hi, x_lo, w_hi, w_lo, g * (1.0 - a), CHAINS)
    gl.store(dh0 + tile, g, mask=mask)


# ---------------------------------------------------------------------------------------------
# The event-gated recurrence in the unit-gates layout (hrnn/ops/gpu_kernels.py's gated kernels with
# UNIT_GATES, whose comments give the definition): every unit computes its module's gate with a
# second product from the same operand, G_h's row m repeated over module m's columns. Units live
# in MP x UP padded columns; a column's unit in H is (col // UP) * UNITS + col % UP.


@gluon.jit
def _sigmoid(z):
    return gl.fdiv(1.0, 1.0 + gl.exp2(-1.4426950408889634 * z), ieee_rounding=False)


@gluon.jit
def _padded_units(idx, M, UNITS, UP: gl.constexpr):
    """Each padded column's unit in H, and whether it is a real one."""
    return (idx // UP) * UNITS + idx % UP, (idx // UP < M) & (idx % UP < UNITS)


@gluon.jit
def _unit_tiles(B, M, UNITS, BLOCK_B: gl.constexpr, HP: gl.constexpr, UP: gl.constexpr, LAYOUT: gl.constexpr):
    """This program's rows and the padded columns in LAYOUT: each column's unit and module, the
    masks of (rows, units) and of each module's first unit (where per-module values are stored)."""
    rows = gl.program_id(0) * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, LAYOUT))
    cols = gl.arange(0, HP, layout=gl.SliceLayout(0, LAYOUT))
    unit, col_ok = _padded_units(cols, M, UNITS, UP)
    mask = (rows < B)[:, None] & col_ok[None, :]
    return rows, unit, col_ok, cols // UP, mask, mask & (cols % UP == 0)[None, :]


@gluon.jit
def _unit_operands(w_h, gate_h, H, M, UNITS, HP: gl.constexpr, UP: gl.constexpr, TRANSPOSE: gl.constexpr,
                   B_OP: gl.constexpr):
    """The two B operands over padded units, split: W_h^T (TRANSPOSE, the forward's: w[k, j] =
    W_h[unit j, unit k]) or W_h, in registers; and the gate's, in shared memory (read each step:
    in registers beside W_h's they spill), G_h's row of j's module at unit k (forward) or of k's
    module at unit j (backward: each unit's share of dz_gate stands in for its module's)."""
    k = gl.arange(0, HP, layout=gl.SliceLayout(1, B_OP))
    j = gl.arange(0, HP, layout=gl.SliceLayout(0, B_OP))
    k_unit, k_ok = _padded_units(k, M, UNITS, UP)
    j_unit, j_ok = _padded_units(j, M, UNITS, UP)
    ok = k_ok[:, None] & j_ok[None, :]
    if TRANSPOSE:
        w = gl.load(w_h + j_unit[None, :] * H + k_unit[:, None], mask=ok, other=0.0)
        g = gl.load(gate_h + (j // UP)[None, :] * H + k_unit[:, None], mask=ok, other=0.0)
    else:
        w = gl.load(w_h + k_unit[:, None] * H + j_unit[None, :], mask=ok, other=0.0)
        g = gl.load(gate_h + (k // UP)[:, None] * H + j_unit[None, :], mask=ok, other=0.0)
    w_hi, w_lo = _split(w)
    g_hi, g_lo = _split(g)
    G_SMEM: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [0, 1])
    return (w_hi, w_lo, gl.allocate_shared_memory(gl.bfloat16, [HP, HP], G_SMEM, g_hi),
            gl.allocate_shared_memory(gl.bfloat16, [HP, HP], G_SMEM, g_lo))


@gluon.jit
def _activation(g, thr, thr_value, waves, t, B, M, module, mtile, mask, col_ok, GATE: gl.constexpr,
                THR_TENSOR: gl.constexpr, WAVES: gl.constexpr):
    """(a, w, th) at step t per unit: a = w e(g) (0 in padded units), the clock wave w (shared
    (1, HP), per sample, or 1) and the threshold (one value or per (b, t, m))."""
    if THR_TENSOR:
        th = gl.load(thr + t * B * M + mtile, mask=mask, other=1.0)
    else:
        th = thr_value
    e = _gate_e(g, th, GATE)
    if WAVES == 1:
        w = gl.load(waves + t * M + module, mask=col_ok, other=0.0)[None, :]
        a = e * w
    elif WAVES == 2:
        w = gl.load(waves + t * B * M + mtile, mask=mask, other=0.0)
        a = e * w
    else:
        w = gl.where(col_ok[None, :], 1.0, 0.0)
        a = e
    return gl.where(col_ok[None, :], a, 0.0), w, th


@gluon.jit
def _gate_e(g, th, GATE: gl.constexpr):
    """e: g (soft), 1[g > th] (hard) or g where g > th, else 0 (truncated)."""
    if GATE == 2:
        e = gl.where(g > th, g, 0.0)
    elif GATE == 1:
        e = gl.where(g > th, 1.0, 0.0)
    else:
        e = g
    return e


@gluon.jit
def gated_forward_kernel(
    u, gu, w_h, gate_h, waves, thr, thr_value, h0, buf, cands, gates, acts, last,
    B, H, M, UNITS,
    T: gl.constexpr, MP: gl.constexpr, UP: gl.constexpr, BLOCK_B: gl.constexpr,
    WAVES: gl.constexpr, GATE: gl.constexpr, THR_TENSOR: gl.constexpr,
    WRITE_STATES: gl.constexpr, WRITE_CANDS: gl.constexpr, WRITE_LAST: gl.constexpr,
    NUM_WARPS: gl.constexpr, CHAINS: gl.constexpr,
):
    HP: gl.constexpr = MP * UP
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    rows, unit, col_ok, module, mask, first = _unit_tiles(B, M, UNITS, BLOCK_B, HP, UP, mma)
    w_hi, w_lo, sgate_hi, sgate_lo = _unit_operands(w_h, gate_h, H, M, UNITS, HP, UP, True, B_OP)
    s_hi = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_B, HP], SMEM)
    s_lo = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_B, HP], SMEM)
    tile = rows[:, None] * H + unit[None, :]
    mtile = rows[:, None] * M + module[None, :]
    h = gl.load(h0 + tile, mask=mask, other=0.0)
    u_next = gl.load(u + tile, mask=mask, other=0.0)
    gu_next = gl.load(gu + mtile, mask=mask, other=0.0)
    for t in range(T):
        u_t = u_next
        gu_t = gu_next
        ahead = gl.minimum(t + 1, T - 1)
        u_next = gl.load(u + ahead * B * H + tile, mask=mask, other=0.0)
        gu_next = gl.load(gu + ahead * B * M + mtile, mask=mask, other=0.0)
        a_hi, a_lo = _exchange(h, s_hi, s_lo, A_OP)
        pre = _products(a_hi, a_lo, w_hi, w_lo, u_t, CHAINS)
        g = _sigmoid(_products(a_hi, a_lo, sgate_hi.load(B_OP), sgate_lo.load(B_OP), gu_t, CHAINS))
        a, _, _ = _activation(g, thr, thr_value, waves, t, B, M, module, mtile, mask, col_ok, GATE, THR_TENSOR, WAVES)
        if not WRITE_CANDS:  # else the host derives a_t from the stored gates
            gl.store(acts + t * B * M + mtile, a, mask=first)
        c = _tanh(pre)
        h = _lerp(h, c, a)
        if WRITE_STATES:
            gl.store(buf + (t + 1) * B * H + tile, h, mask=mask)
        if WRITE_CANDS:
            gl.store(cands + t * B * H + tile, c, mask=mask)
            gl.store(gates + t * B * M + mtile, g, mask=first)
    if WRITE_LAST:
        gl.store(last + tile, h, mask=mask)


@gluon.jit
def gated_backward_kernel(
    grad, sg_b, sg_t, grad_last, grad_act, buf, cands, gates, w_h, gate_h, waves, thr, thr_value, support,
    dz, dzg, dzl, dwave, dh0,
    B, H, M, UNITS,
    T: gl.constexpr, MP: gl.constexpr, UP: gl.constexpr, BLOCK_B: gl.constexpr,
    WAVES: gl.constexpr, GATE: gl.constexpr, THR_TENSOR: gl.constexpr,
    GRAD_ALL: gl.constexpr, HAS_GRAD: gl.constexpr, HAS_GRAD_ACT: gl.constexpr, NEED_DWAVE: gl.constexpr,
    SUPPORT: gl.constexpr, NUM_WARPS: gl.constexpr, CHAINS: gl.constexpr,
):
    HP: gl.constexpr = MP * UP
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    rows, unit, col_ok, module, mask, first = _unit_tiles(B, M, UNITS, BLOCK_B, HP, UP, mma)
    w_hi, w_lo, sgate_hi, sgate_lo = _unit_operands(w_h, gate_h, H, M, UNITS, HP, UP, False, B_OP)
    s_hi = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_B, HP], SMEM)
    s_lo = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_B, HP], SMEM)
    sg_hi = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_B, HP], SMEM)
    sg_lo = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_B, HP], SMEM)
    tile = rows[:, None] * H + unit[None, :]
    mtile = rows[:, None] * M + module[None, :]
    g_tile = grad + rows[:, None] * sg_b + unit[None, :]
    if GRAD_ALL or not HAS_GRAD:
        gh = gl.zeros([BLOCK_B, HP], gl.float32, layout=mma)
    else:
        gh = gl.load(grad_last + tile, mask=mask, other=0.0)
    c_next = gl.load(cands + (T - 1) * B * H + tile, mask=mask, other=0.0)
    hp_next = gl.load(buf + (T - 1) * B * H + tile, mask=mask, other=0.0)
    if GRAD_ALL:
        grad_next = gl.load(g_tile + (T - 1) * sg_t, mask=mask, other=0.0)
    for s in range(T):
        t = T - 1 - s
        c = c_next
        h_prev = hp_next
        ahead = gl.maximum(t - 1, 0)
        c_next = gl.load(cands + ahead * B * H + tile, mask=mask, other=0.0)
        hp_next = gl.load(buf + ahead * B * H + tile, mask=mask, other=0.0)
        g = gl.load(gates + t * B * M + mtile, mask=mask, other=0.0)
        if GRAD_ALL:
            gh += grad_next
            grad_next = gl.load(g_tile + ahead * sg_t, mask=mask, other=0.0)
        a, w_t, th = _activation(g, thr, thr_value, waves, t, B, M, module, mtile, mask, col_ok, GATE, THR_TENSOR,
                                 WAVES)
        # Each unit's share of its module's dL/da; the host sums them into dzg, dzl and dwave.
        share = gh * (c - h_prev)
        if HAS_GRAD_ACT:  # dL/da joins the module's sum once, at its first unit
            share += gl.load(grad_act + t * B * M + mtile, mask=first, other=0.0)
        gl.store(dzg + t * B * H + tile, share, mask=mask)
        dzg_t = share * w_t * g * (1.0 - g)
        if GATE == 2:
            dzg_t = gl.where(g > th - support, dzg_t, 0.0)
        if SUPPORT:
            dzg_t = gl.where(g <= th, 0.0, dzg_t)
        dzg_t = gl.where(col_ok[None, :], dzg_t, 0.0)
        dz_t = gh * a * (1.0 - c * c)
        gl.store(dz + t * B * H + tile, dz_t, mask=mask)
        # One exchange for both products: dz_t's and dzg_t's halves into the A operand's layout.
        _split_into(dz_t, s_hi, s_lo)
        _split_into(dzg_t, sg_hi, sg_lo)
        gate_back = _products(sg_hi.load(A_OP), sg_lo.load(A_OP), sgate_hi.load(B_OP), sgate_lo.load(B_OP),
                              gh * (1.0 - a), CHAINS)
        gh = _products(s_hi.load(A_OP), s_lo.load(A_OP), w_hi, w_lo, gate_back, CHAINS)
    gl.store(dh0 + tile, gh, mask=mask)
