"""The CUDA backend: the Triton kernels (hrnn/ops/gpu_kernels.py) behind autograd Functions, for the
clock op (`leaky_scan`, `leaky_rnn`) and the event-gated op (`gated_leaky_rnn`).

    supports(*tensors)              None, or why the clock kernels cannot take these tensors
    gated_supports(...)             the same for the gated kernels
    leaky_scan(...)                 the op for a precomputed u (contract: hrnn.ops.leaky_scan)
    leaky_rnn(...)                  the same with x, W_x, b: the projection is one product before
                                    the loop, its gradients come from torch's linear backward
    gated_leaky_rnn(...)            the event-gated op (contract: hrnn.ops.gated_leaky_rnn)

Which tensors come here, and the log line that says so, is hrnn/ops/dispatch.py's choice.

The input projection is not fused into the loop (unlike the CPU kernels): on a GPU it is one
GEMM of (T*B, I) x (I, H), a few microseconds against milliseconds for the serial loop, and the
kernels then take any I. It runs time-major, so u and du are contiguous (T, B, H) slices and
dW_x = du^T x, db = sum du are torch's own products.

Precision (`hrnn.ops.set_matmul_precision`, `trainer.matmul_precision`) is that of the per-step
products (h W_h^T forward, dz W_h backward, and the gate's): ieee, tf32, tf32x3, bf16x3 (each
operand split into two bf16 halves, three bf16 products; the default, within 1e-2 of float64
gradients at a third less time than tf32x3 on an H200, docs/gpu.md) or bf16 operands. The state,
the candidates, dh and every accumulation stay fp32; dW_h and the projection are torch GEMMs
under torch's own fp32 setting. float64 tensors always run ieee.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from hrnn.ops.dispatch import Availability

# W_h stays in shared memory for the whole loop: 128 fp32 units (64 fp64) keep the backward
# under 227 KB per block on an H100 (tests/test_triton.py compiles them for sm_90 to check).
MAX_HIDDEN = {torch.float32: 128, torch.float64: 64}
BLOCK_B = 16       # batch rows per program (tl.dot needs at least 16)
GATE_CODES = {"soft": 0, "hard": 1, "truncated": 2}  # the gated kernels' GATE: e = g, 1[g > thr], g 1[g > thr]
# Launch settings that measurement may change (scripts/bench/bench_cuda.py --sweep and
# scripts/gpu/kernel_times.py set them): None picks BLOCK_B, 4 warps for HP <= 64 and 8 above, and
# the gates' layout by precision (`unit_gates`, in gated_launch). `chains`: bf16x3's three products
# in one accumulation (1) or three summed (3); on an H200 the two were within 3% (docs/gpu.md).
# `gluon`: None runs the Gluon kernels (both ops) where they apply (_gluon), False never.
TUNING: dict = {"block_b": None, "num_warps": None, "unit_gates": None, "chains": 3, "gluon": None}

try:
    if os.environ.get("HRNN_DISABLE_TRITON"):
        raise ImportError("disabled by HRNN_DISABLE_TRITON")
    from triton.runtime.interpreter import InterpretedFunction

    from hrnn.ops import gpu_kernels as _K

    # TRITON_INTERPRET=1 when the kernels were defined: they run on CPU tensors (tests).
    INTERPRET = isinstance(_K.leaky_forward_kernel, InterpretedFunction)
    _LOAD_REASON: str | None = None
except ImportError as err:
    _K, INTERPRET = None, False
    _LOAD_REASON = f"the Triton kernels are not available ({err})" + (
        "; install Triton with `pip install -e '.[gpu]'`" if isinstance(err, ModuleNotFoundError) else "")
try:  # Gluon (Triton's explicit-layout dialect) compiles for a GPU only: no interpreter
    if _K is None or INTERPRET:
        raise ImportError("no Triton or interpreted")
    from hrnn.ops import gpu_gluon as _G
except ImportError:
    _G = None
_availability = Availability(_LOAD_REASON)
unavailable_reason = _availability.unavailable_reason
hide = _availability.hide


def supports(inputs: Tensor, w_h: Tensor, *others: Tensor) -> str | None:
    """None if the kernels take these tensors (x or u, W_h, then the others), else why not."""
    if unavailable_reason() is not None:
        return unavailable_reason()
    for t in (inputs, w_h, *others):
        if t.device.type != "cuda" and not INTERPRET:
            return f"the Triton kernels take CUDA tensors (got a {t.device.type} tensor)"
        if t.dtype != inputs.dtype or t.dtype not in (torch.float32, torch.float64):
            return f"the Triton kernels take float32/float64 only (got {t.dtype})"
        if t.layout != torch.strided:
            return "the Triton kernels take dense tensors only"
    batch, steps, hidden = inputs.shape[0], inputs.shape[1], w_h.shape[0]
    if hidden > MAX_HIDDEN[inputs.dtype]:
        return (f"hidden size {hidden} > {MAX_HIDDEN[inputs.dtype]} in {inputs.dtype}: "
                "W_h would not fit in one SM's shared memory")
    if (steps + 1) * batch * _padded(hidden) >= 2 ** 31:
        return f"B * T * H = {batch} * {steps} * {hidden} exceeds the kernels' 32-bit offsets"
    return None


def _padded(hidden: int) -> int:
    return max(16, 1 << (hidden - 1).bit_length())


def launch(hidden: int, batch: int) -> tuple[tuple, dict]:
    """Grid and launch options of the clock kernels for HP = hidden padded."""
    hp = _padded(hidden)
    block_b = TUNING["block_b"] or BLOCK_B
    warps = TUNING["num_warps"] or (4 if hp <= 64 else 8)
    return ((batch + block_b - 1) // block_b,), {"HP": hp, "BLOCK_B": block_b, "num_warps": warps,
                                                  "CHAINS": TUNING["chains"]}


def _dot_precision(precision: str, dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float64 else precision


def _gluon(hidden: int, precision: str, dtype: torch.dtype) -> bool:
    """Whether hrnn/ops/gpu_gluon.py's kernels apply (the clock op's, and the gated op's in the unit
    layout): on a GPU, bf16x3 in float32, at most 128 padded units (W_h's halves in registers),
    unless TUNING["gluon"] is False."""
    return (_G is not None and TUNING["gluon"] is not False and _dot_precision(precision, dtype) == "bf16x3"
            and _padded(hidden) <= _G.MAX_PADDED)


def _clock_kernel(name: str, hidden: int, batch: int, precision: str, dtype: torch.dtype):
    """(kernel, grid, options) of the clock op's forward or backward: the Gluon kernel where _gluon,
    else the Triton one, which takes the precision and the interpreter flag."""
    grid, opts = launch(hidden, batch)
    if _gluon(hidden, precision, dtype):
        warps = TUNING["num_warps"] or _G.num_warps(opts["HP"])
        return getattr(_G, name), grid, {"HP": opts["HP"], "BLOCK_B": opts["BLOCK_B"], "NUM_WARPS": warps,
                                         "num_warps": warps, "CHAINS": opts["CHAINS"]}
    return getattr(_K, name), grid, dict(opts, PRECISION=_dot_precision(precision, dtype), INTERPRET=INTERPRET)


def _forward(u: Tensor, w_h: Tensor, waves: Tensor, h0: Tensor, precision: str, keep: bool,
             last_only: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(buf, cands, last): buf (T + 1, B, H) with h0 at 0 when the states are kept or returned;
    cands (T, B, H) when keep (for the backward); last (B, H) when last_only."""
    batch, steps, hidden = u.shape
    states = keep or not last_only
    buf = u.new_empty(steps + 1, batch, hidden) if states else h0
    if states:
        buf[0] = h0
    cands = u.new_empty(steps, batch, hidden) if keep else h0
    last = u.new_empty(batch, hidden) if last_only else h0
    kernel, grid, opts = _clock_kernel("leaky_forward_kernel", hidden, batch, precision, u.dtype)
    kernel[grid](
        u, u.stride(0), u.stride(1), w_h, waves, h0, buf, cands, last,
        batch, hidden, waves.shape[1], hidden // waves.shape[1], T=steps,
        WRITE_STATES=states, WRITE_CANDS=keep, WRITE_LAST=last_only, **opts)
    return buf, cands, last


class _LeakyScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, w_h, waves, h0, last_only, precision):  # noqa: D102
        buf, cands, last = _forward(u, w_h, waves, h0, precision, True, last_only)
        ctx.save_for_backward(buf, cands, w_h, waves)
        ctx.last_only, ctx.precision = last_only, precision
        # All states: a (B, T, H) view of the time-major buffer, no copy.
        return last if last_only else buf[1:].transpose(0, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        buf, cands, w_h, waves = ctx.saved_tensors
        need = ctx.needs_input_grad
        steps, batch, hidden = cands.shape
        n_modules = waves.shape[1]
        kernel, grid, opts = _clock_kernel("leaky_backward_kernel", hidden, batch, ctx.precision, buf.dtype)
        if ctx.last_only:
            grad, strides = grad.contiguous(), (0, 0)
        else:
            grad = grad if grad.stride(2) == 1 else grad.contiguous()
            strides = (grad.stride(0), grad.stride(1))
        dz = torch.empty_like(cands)
        dh0 = buf.new_empty(batch, hidden)
        da_part = buf.new_empty(grid[0], steps, hidden) if need[2] else dh0
        kernel[grid](
            grad, *strides, grad, buf, cands, w_h, waves, dz, dh0, da_part,
            batch, hidden, n_modules, hidden // n_modules, T=steps,
            GRAD_ALL=not ctx.last_only, NEED_DA=need[2], **opts)
        # dW_h = sum_t dz_t^T h_{t-1}: one GEMM over the time-major slices, no copy.
        dw = torch.mm(dz.view(-1, hidden).t(), buf[:-1].view(-1, hidden)) if need[1] else None
        dwaves = da_part.sum(0).view(steps, n_modules, -1).sum(2) if need[2] else None
        return dz.transpose(0, 1) if need[0] else None, dw, dwaves, dh0 if need[3] else None, None, None


def leaky_scan(u: Tensor, w_h: Tensor, waves: Tensor, h0: Tensor, last_only: bool, precision: str) -> Tensor:
    """All states (B, T, H) or the last (B, H) through the kernels; caller checked shapes and
    `supports`. u may have any strides with unit stride over H (else it is copied)."""
    u = u if u.stride(2) == 1 else u.contiguous()
    w_h, waves, h0 = w_h.contiguous(), waves.contiguous(), h0.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, w_h, waves, h0)):
        return _LeakyScan.apply(u, w_h, waves, h0, bool(last_only), precision)
    with torch.no_grad():  # inference: no candidates kept, the states only if returned
        buf, _, last = _forward(u, w_h, waves, h0, precision, False, last_only)
        return last if last_only else buf[1:].transpose(0, 1)


def leaky_rnn(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, waves: Tensor, h0: Tensor,
              last_only: bool, precision: str) -> Tensor:
    """`leaky_scan(F.linear(x, w_x, bias), ...)` with the projection computed time-major."""
    u = torch.nn.functional.linear(x.transpose(0, 1), w_x, bias)  # (T, B, H), contiguous
    return leaky_scan(u.transpose(0, 1), w_h, waves, h0, last_only, precision)


# --- The event-gated op ---------------------------------------------------------------------

def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def gated_layout(hidden: int, n_modules: int) -> tuple[int, int, int]:
    """(MP, UP, NG): modules and units per module padded to powers of two, and the gate product's
    columns (tl.dot needs at least 16). The kernels work on MP * UP padded units."""
    mp, up = _pow2(n_modules), _pow2(hidden // n_modules)
    return mp, up, max(16, mp)


def gated_supports(x: Tensor, w_h: Tensor, gate_h: Tensor | None, *others: Tensor) -> str | None:
    """None if the gated kernels take these tensors, else why not."""
    if gate_h is None:
        return "the gated Triton kernels need an event gate (waves alone run the clock op's kernels)"
    reason = supports(x, w_h, gate_h, *others)
    if reason is not None:
        return reason
    mp, up, _ = gated_layout(w_h.shape[0], gate_h.shape[0])
    if mp * up > MAX_HIDDEN[x.dtype]:
        return (f"{gate_h.shape[0]} modules of {w_h.shape[0] // gate_h.shape[0]} units pad to {mp * up} > "
                f"{MAX_HIDDEN[x.dtype]} in {x.dtype}: W_h would not fit in one SM's shared memory")
    return None


def gated_launch(hidden: int, n_modules: int, batch: int, steps: int, waves: Tensor | None,
                 thr: Tensor | None, thr_value: float, gate: int, precision: str, dtype: torch.dtype):
    """Grid and launch options of the gated kernels. Unit gates (every unit computes its module's
    gate on the tensor cores, beside the main product) unless tf32x3, whose split operands leave no
    registers for the gate's product (ptxas spills; tests/test_triton.py): there the module layout,
    with the gate's small products in fp32 FMAs."""
    mp, up, ng = gated_layout(hidden, n_modules)
    unit_gates = TUNING["unit_gates"]
    if unit_gates is None:
        unit_gates = _dot_precision(precision, dtype) != "tf32x3"
    block_b = TUNING["block_b"] or BLOCK_B
    grid = ((batch + block_b - 1) // block_b,)
    common = dict(T=steps, MP=mp, UP=up, BLOCK_B=block_b, WAVES=0 if waves is None else waves.dim() - 1, GATE=gate,
                  THR_TENSOR=thr is not None, CHAINS=TUNING["chains"], UNIT_GATES=unit_gates)
    if unit_gates and _gluon(mp * up, precision, dtype):  # hrnn/ops/gpu_gluon.py's, in the unit layout
        warps = TUNING["num_warps"] or _G.num_warps(mp * up)
        return grid, dict(common, NUM_WARPS=warps, num_warps=warps, GLUON=True)
    warps = TUNING["num_warps"] or (4 if mp * up <= 64 else 8)  # 4 spills registers at 128 (ptxas -v)
    return grid, dict(common, NG=ng, PRECISION=_dot_precision(precision, dtype), INTERPRET=INTERPRET,
                      num_warps=warps, GLUON=False)


def _gated_kernel(name: str, opts: dict):
    """The gated kernel `name` and its launch options, from gated_launch's: Gluon's (unit gates
    implied) or Triton's."""
    opts = dict(opts)
    if opts.pop("GLUON"):
        del opts["UNIT_GATES"]
        return getattr(_G, name), opts
    return getattr(_K, name), opts


def _gate_terms(gates: Tensor, waves: Tensor | None, thr: Tensor | None, thr_value: float, gate: int):
    """(e, w) of the gated kernels' _activation, from the gate values g (T, B, M) the forward stored:
    e = g, 1[g > threshold] or g 1[g > threshold]; w the clock wave broadcast to (T, B, M), or 1."""
    th = thr if thr is not None else thr_value
    if gate == 0:
        e = gates
    elif gate == 1:
        e = (gates > th).to(gates.dtype)
    else:
        e = torch.where(gates > th, gates, 0.0)
    w = 1.0 if waves is None else waves[:, None, :] if waves.dim() == 2 else waves
    return e, w


def _gated_forward(u, gu, w_h, gate_h, waves, h0, thr, thr_value, gate, precision, keep, last_only):
    """(buf, cands, gates, acts, last): buf (T + 1, B, H) with h0 at 0 when the states are kept or
    returned; cands (T, B, H) and gates (T, B, M) when keep (for the backward); acts (T, B, M)
    always; last (B, H) when last_only and the states are not kept."""
    steps, batch, hidden = u.shape
    n_modules = gate_h.shape[0]
    states, write_last = keep or not last_only, last_only and not keep
    buf = u.new_empty(steps + 1, batch, hidden) if states else h0
    if states:
        buf[0] = h0
    cands = torch.empty_like(u) if keep else h0
    gates = torch.empty_like(gu) if keep else h0
    acts = torch.empty_like(gu)
    last = u.new_empty(batch, hidden) if write_last else h0
    grid, opts = gated_launch(hidden, n_modules, batch, steps, waves, thr, thr_value, gate, precision, u.dtype)
    kernel, launch_opts = _gated_kernel("gated_forward_kernel", opts)
    kernel[grid](
        u, gu, w_h, gate_h, u if waves is None else waves, u if thr is None else thr, thr_value, h0,
        buf, cands, gates, acts, last, batch, hidden, n_modules, hidden // n_modules,
        WRITE_STATES=states, WRITE_CANDS=keep, WRITE_LAST=write_last, **launch_opts)
    if keep and opts["UNIT_GATES"]:  # that kernel stores the gates, not a_t = w e(g), when it keeps them
        e, w = _gate_terms(gates, waves, thr, thr_value, gate)
        acts = e * w
    return buf, cands, gates, acts, last


class _GatedScan(torch.autograd.Function):
    """u (T, B, H) and gu (T, B, M) time-major, waves None, (T, M) or time-major (T, B, M)."""

    @staticmethod
    def forward(ctx, u, gu, w_h, gate_h, waves, h0, thr, thr_value, gate, last_only, precision, support,
                x, gate_x, gate_bias):  # noqa: D102
        buf, cands, gates, acts, _ = _gated_forward(u, gu, w_h, gate_h, waves, h0, thr, thr_value, gate, precision,
                                                    True, last_only)
        ctx.save_for_backward(buf, cands, gates, w_h, gate_h, waves, thr, x if support else None)
        ctx.thr_value, ctx.gate, ctx.last_only, ctx.precision = thr_value, gate, last_only, precision
        ctx.support = support
        ctx.set_materialize_grads(False)
        states = buf[-1].clone() if last_only else buf[1:].transpose(0, 1)
        return states, acts.transpose(0, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, grad_acts):  # noqa: D102
        buf, cands, gates, w_h, gate_h, waves, thr, x = ctx.saved_tensors
        need = ctx.needs_input_grad
        steps, batch, hidden = cands.shape
        n_modules = gate_h.shape[0]
        grid, opts = gated_launch(hidden, n_modules, batch, steps, waves, thr, ctx.thr_value, ctx.gate,
                                   ctx.precision, buf.dtype)
        if grad is None or ctx.last_only:
            grad = grad.contiguous() if grad is not None else None
            strides = (0, 0)
        else:
            grad = grad if grad.stride(2) == 1 else grad.contiguous()
            strides = (grad.stride(0), grad.stride(1))
        if grad_acts is not None:
            grad_acts = grad_acts.transpose(0, 1).contiguous()  # (T, B, M)
        # The unit-gates kernel stores each unit's share of dL/da (T, B, H) in dzg, from which dzg, dzl
        # and dwave follow below; the module-gates kernel stores those three (T, B, M) itself.
        unit_gates = opts["UNIT_GATES"]
        dz, dzg = torch.empty_like(cands), torch.empty_like(cands if unit_gates else gates)
        dzl = torch.empty_like(gates) if ctx.support and not unit_gates else dzg
        dwave = torch.empty_like(gates) if need[4] and not unit_gates else dzg
        dh0 = buf.new_empty(batch, hidden)
        kernel, launch_opts = _gated_kernel("gated_backward_kernel", opts)
        kernel[grid](
            buf if grad is None else grad, *strides, buf if grad is None else grad,
            dzg if grad_acts is None else grad_acts, buf, cands, gates, w_h, gate_h,
            buf if waves is None else waves, buf if thr is None else thr, ctx.thr_value, ctx.support,
            dz, dzg, dzl, dwave, dh0, batch, hidden, n_modules, hidden // n_modules,
            GRAD_ALL=grad is not None and not ctx.last_only, HAS_GRAD=grad is not None,
            HAS_GRAD_ACT=grad_acts is not None, NEED_DWAVE=need[4], SUPPORT=bool(ctx.support), **launch_opts)
        if unit_gates:
            dzg, dzl, dwave = _gate_grads(dzg.view(steps, batch, n_modules, -1).sum(3), gates, waves, thr,
                                          ctx.thr_value, ctx.gate, ctx.support, need[4])
        prev = buf[:-1].reshape(-1, hidden)
        dw = torch.mm(dz.view(-1, hidden).t(), prev) if need[2] else None
        dg = torch.mm((dzg + dzl if ctx.support else dzg).view(-1, n_modules).t(), prev) if need[3] else None
        # Within the support the logits' gradient reaches the gate's weights only: G_x and g_b here
        # (gu's gradient, dzg, carries the rest to them and to x).
        dgx = dgb = None
        if ctx.support:
            within = dzl.transpose(0, 1).reshape(-1, n_modules)                     # (B T, M)
            dgx = torch.mm(within.t(), x.reshape(-1, x.shape[-1])) if need[13] else None
            dgb = within.sum(0) if need[14] else None
        dwaves = None
        if need[4]:
            dwaves = dwave.sum(1) if waves.dim() == 2 else dwave
        return (dz if need[0] else None, dzg if need[1] else None, dw, dg, dwaves,
                dh0 if need[5] else None, None, None, None, None, None, None, None, dgx, dgb)


def _gate_grads(da: Tensor, gates: Tensor, waves, thr, thr_value: float, gate: int, support: float, need_dwave: bool):
    """(dzg, dzl, dwave) from dL/da (T, B, M), as the module-gates kernel computes them per step: the
    logits' gradient da w g (1 - g), zero where a truncated gate is shut beyond its support; within
    the support it goes to dzl (the gate's weights only) and dzg keeps the open entries; dwave = da e."""
    e, w = _gate_terms(gates, waves, thr, thr_value, gate)
    logits = da * w * gates * (1.0 - gates)
    th = thr if thr is not None else thr_value
    if gate == 2:
        logits = torch.where(gates > th - support, logits, 0.0)
    dzg, dzl = logits, None
    if support:
        shut = gates <= th
        dzg, dzl = torch.where(shut, 0.0, logits), torch.where(shut, logits, 0.0)
    return dzg, dzl, da * e if need_dwave else None


def gated_leaky_rnn(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, h0: Tensor, waves: Tensor | None,
                    gate_x: Tensor, gate_bias: Tensor, gate_h: Tensor, gate_mode: str, thresholds: Tensor | float,
                    last_only: bool, precision: str, support: float = 0.0) -> tuple[Tensor, Tensor]:
    """hrnn.ops.gated_leaky_rnn through the kernels (caller checked shapes and `gated_supports`):
    the states (B, T, H) or the last (B, H), and the activations (B, T, M). Both projections are
    one product each before the loop, time-major; their gradients are torch's linear backward. Every
    candidate is computed, so a truncated gate's `support` costs nothing more here; its shut entries'
    gradient (dzl) reaches G_x, g_b and G_h only, and is added to theirs below."""
    batch, steps, _ = x.shape
    xt = x.transpose(0, 1)
    u = torch.nn.functional.linear(xt, w_x, bias)                # (T, B, H)
    gu = torch.nn.functional.linear(xt, gate_x, gate_bias)       # (T, B, M)
    if waves is not None:
        waves = waves.contiguous() if waves.dim() == 2 else waves.transpose(0, 1).contiguous()
    gate = GATE_CODES[gate_mode]
    thr, thr_value = None, 0.5
    if gate:
        if isinstance(thresholds, Tensor) and thresholds.dim():
            thr = thresholds.detach().to(x.dtype).expand(batch, steps, gate_h.shape[0]).transpose(0, 1).contiguous()
        else:
            thr_value = float(thresholds)
    args = (u.contiguous(), gu.contiguous(), w_h.contiguous(), gate_h.contiguous(), waves, h0.contiguous(), thr)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)):
        # Inference: no candidates or gates kept, the states only if returned.
        buf, _, _, acts, last = _gated_forward(*args, thr_value, gate, precision, False, bool(last_only))
        return (last if last_only else buf[1:].transpose(0, 1)), acts.transpose(0, 1)
    return _GatedScan.apply(*args, thr_value, gate, bool(last_only), precision, float(support),
                            x.detach() if support else None, gate_x, gate_bias)
