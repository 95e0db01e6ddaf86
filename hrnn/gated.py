"""The leaky recurrence with per-sample activations and an event gate computed inside the loop.

`hrnn.core` runs one shared (T, M) clock wave for the whole batch. An event gate reads
the state, so each sample's activations differ and are only known step by step:

    g_t = sigmoid(x_t G_x^T + h_{t-1} G_h^T + g_b)            (B, M)   event gate
    e_t = g_t                                  gate_mode "soft"
        = 1[g_t > thresholds_t]                gate_mode "hard" (straight-through gradient)
    a_t = w_t * e_t                            w_t: clock wave, (M,) or per sample (B, M); 1 if none
    c_t = tanh(x_t W_x^T + b + h_{t-1} W_h^T)  (B, H)   candidate
    h_t = h_{t-1} + a_t * (c_t - h_{t-1})      a_t repeated over each module's H / M units

The straight-through estimator passes dL/de_t to g_t unchanged (Bengio et al. 2013):
forward 0/1, backward as if e_t = g_t. A hard a_t = 0 holds h bit-for-bit and a_t = 1
takes the candidate exactly (torch.lerp), so a kernel may skip the rows and modules with
a_t = 0 in the forward (the backward still needs their candidates for dL/dg, as
`hrnn.fused` does for waves that require grad). Stochastic binarisation is the same op
with thresholds drawn uniform in [0, 1) by the caller: no random numbers are drawn in here,
so a kernel is deterministic given its inputs.

`gated_leaky_rnn` is the op models call: the fused C++ core (hrnn/csrc/gated_kernels.cpp,
through `hrnn._fused_C`) when it is built and takes the inputs (CPU, float32/float64), else
`gated_leaky_rnn_reference`, the definition, with the same results. The core takes x and the
weights, and forms x_t W_x^T + b (and the gate's x_t G_x^T + g_b) per step inside the loop,
for the open pairs only. Under torch.no_grad it skips the candidates of closed (sample, module)
pairs, and with last_only keeps the state in place and writes no (B, T, H) tensor at all; with a
gradient it computes every candidate (the straight-through gradient reads them) and skips the
closed pairs in the backward. Blocks of W_h that are all zero (learned connectivity's hard gates
in evaluation, the slow-to-fast mask) are skipped in the forward's candidate products.
`chunker_leaky_rnn` is the same loop with the Chunker's gate (a module wakes when the one
below mispredicts the input); see its reference's docstring.
"""
from __future__ import annotations

import torch
from torch import Tensor

GATE_MODES = ("soft", "hard")


class StraightThrough(torch.autograd.Function):
    """1[gate > thresholds] forward; the gradient passes to `gate` unchanged."""

    @staticmethod
    def forward(ctx, gate: Tensor, thresholds: Tensor) -> Tensor:  # noqa: D102
        return (gate > thresholds).to(gate.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


def gated_leaky_rnn_reference(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, h0: Tensor,
                              waves: Tensor | None, gate_x: Tensor | None, gate_bias: Tensor | None,
                              gate_h: Tensor | None, gate_mode: str, thresholds: Tensor | float) -> tuple[Tensor, Tensor]:
    """Plain autograd loop over time: the definition (module docstring) fused kernels are tested against.

    x: (B, T, I); w_x: (H, I); bias: (H,) or None; w_h: (H, H), already masked or gated for the
    connectivity; h0: (B, H).
    waves: (T, M) shared or (B, T, M) per-sample clock activations in [0, 1], or None (all 1).
    gate_x: (M, I), gate_bias: (M,), gate_h: (M, H): the event gate, or all three None (a_t = w_t).
    gate_mode: "soft" or "hard"; thresholds: a float or a tensor broadcastable to (B, T, M), read by "hard".
    Returns all states (B, T, H) and the activations a (B, T, M).
    """
    batch, steps, _ = x.shape
    hidden = w_h.shape[0]
    n_modules = _check(x, w_h, h0, waves, gate_x, gate_bias, gate_h, gate_mode)
    units = hidden // n_modules
    u = torch.nn.functional.linear(x, w_x, bias).unbind(1)  # unbind, not u[:, t]: see fused.leaky_scan_loop
    gated = gate_x is not None
    if gated:
        gate_u = torch.nn.functional.linear(x, gate_x, gate_bias).unbind(1)
        # One product per step for the candidate and the gate: [W_h; G_h] h_{t-1}.
        w_t = torch.cat([w_h, gate_h]).t()
        thresholds = _per_step(thresholds, gate_mode, (batch, steps, n_modules), x)
    else:
        w_t = w_h.t()
    if waves is not None and waves.dim() == 2:
        waves = waves.expand(batch, steps, n_modules)
    h = h0
    states, activations = [], []
    for t in range(steps):
        product = h @ w_t
        candidate = torch.tanh(u[t] + product[:, :hidden])
        a = x.new_ones(batch, n_modules) if waves is None else waves[:, t]
        if gated:
            a = a * _binarise(torch.sigmoid(gate_u[t] + product[:, hidden:]), gate_mode, thresholds, t)
        h = torch.lerp(h, candidate, a.repeat_interleave(units, dim=1))
        states.append(h)
        activations.append(a)
    return torch.stack(states, dim=1), torch.stack(activations, dim=1)


def chunker_leaky_rnn_reference(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, h0: Tensor,
                                predict_w: Tensor, predict_b: Tensor, log_threshold: Tensor, gate_mode: str,
                                thresholds: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """The Chunker-style recurrence: module m >= 1 wakes when module m - 1 mispredicts the input.

        x^m_t = P_m h^m_{t-1} + p_m                  module m's prediction of x_t, m = 0 .. M-2
        eps^m_t = mean_i (x_t,i - x^m_t,i)^2          its error, (B, M-1)
        g^{m+1}_t = eps^m_t / (eps^m_t + theta_{m+1})  = sigmoid(log eps - log theta): 1/2 at eps = theta
        a^0_t = 1, a^{m+1}_t = e(g^{m+1}_t)            e as in the event gate (soft, or hard at thresholds)

    then the leaky update of the module docstring. predict_w: (M-1, I, H/M); predict_b: (M-1, I);
    log_threshold: (M-1,) log theta of modules 1 .. M-1. With the hard gate at threshold 1/2 a
    module wakes exactly when the error below it exceeds its theta. Returns the states (B, T, H),
    the activations (B, T, M) and the errors eps (B, T, M-1), which the model trains the predictions on.
    """
    batch, steps, inputs = x.shape
    hidden = w_h.shape[0]
    n_modules = predict_w.shape[0] + 1
    if (hidden % n_modules or predict_w.shape != (n_modules - 1, inputs, hidden // n_modules)
            or predict_b.shape != (n_modules - 1, inputs) or log_threshold.shape != (n_modules - 1,)):
        raise ValueError(f"predict_w {tuple(predict_w.shape)}, predict_b {tuple(predict_b.shape)}, log_threshold "
                         f"{tuple(log_threshold.shape)} do not fit (M-1, {inputs}, H/M), (M-1, {inputs}), (M-1,) "
                         f"with H = {hidden} and M - 1 = {n_modules - 1}")
    if gate_mode not in GATE_MODES:
        raise ValueError(f"gate_mode={gate_mode!r}; allowed: {', '.join(GATE_MODES)}")
    units = hidden // n_modules
    u = torch.nn.functional.linear(x, w_x, bias).unbind(1)
    thresholds = _per_step(thresholds, gate_mode, (batch, steps, n_modules - 1), x)
    theta = log_threshold.exp()
    h, w_t = h0, w_h.t()
    states, activations, errors = [], [], []
    for t in range(steps):
        candidate = torch.tanh(u[t] + h @ w_t)
        below = h.view(batch, n_modules, units)[:, :-1]  # modules 0 .. M-2
        prediction = torch.einsum("bmk,mik->bmi", below, predict_w) + predict_b
        error = (x[:, t].unsqueeze(1) - prediction).square().mean(dim=2)  # (B, M-1)
        woken = _binarise(error / (error + theta), gate_mode, thresholds, t)
        a = torch.cat([torch.ones_like(woken[:, :1]), woken], dim=1)
        h = torch.lerp(h, candidate, a.repeat_interleave(units, dim=1))
        states.append(h)
        activations.append(a)
        errors.append(error)
    return torch.stack(states, dim=1), torch.stack(activations, dim=1), torch.stack(errors, dim=1)


def chunker_leaky_rnn(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, h0: Tensor, predict_w: Tensor,
                      predict_b: Tensor, log_threshold: Tensor, gate_mode: str, thresholds: Tensor | float,
                      last_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """`chunker_leaky_rnn_reference`, with the last state only (B, H) if last_only; the op a kernel takes over."""
    states, activations, errors = chunker_leaky_rnn_reference(x, w_x, bias, w_h, h0, predict_w, predict_b,
                                                              log_threshold, gate_mode, thresholds)
    return (states[:, -1] if last_only else states), activations, errors


def _binarise(gate: Tensor, gate_mode: str, thresholds: Tensor | tuple, t: int) -> Tensor:
    """e_t: the gate itself ("soft"), or 1[gate > thresholds_t] with a straight-through gradient ("hard")."""
    return StraightThrough.apply(gate, thresholds[t]) if gate_mode == "hard" else gate


def _per_step(thresholds: Tensor | float, gate_mode: str, shape: tuple[int, int, int], like: Tensor):
    """thresholds as one (B, M) tensor per step (hard gates only)."""
    if gate_mode != "hard":
        return None
    return torch.as_tensor(thresholds, dtype=like.dtype, device=like.device).expand(shape).unbind(1)


def gated_leaky_rnn(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, h0: Tensor, waves: Tensor | None,
                    gate_x: Tensor | None, gate_bias: Tensor | None, gate_h: Tensor | None, gate_mode: str,
                    thresholds: Tensor | float, last_only: bool = False) -> tuple[Tensor, Tensor]:
    """States (B, T, H), or the last (B, H) with last_only, and the activations (B, T, M).

    Same arguments as `gated_leaky_rnn_reference`. CPU tensors run the fused core when it is built
    and takes them, CUDA tensors the Triton kernels (hrnn/triton_core.py) when Triton is there and
    takes them; otherwise the reference loop (logged once per process).
    """
    from hrnn import fused  # deferred, as in hrnn.core: hrnn.fused imports the compiled extension

    n_modules = _check(x, w_h, h0, waves, gate_x, gate_bias, gate_h, gate_mode)
    gated = gate_x is not None
    tensors = [t for t in (x, w_x, bias, w_h, h0, waves, gate_x, gate_bias, gate_h) if t is not None]
    if x.is_cuda:  # the gated Triton kernels, else the reference loop; one log line says which and why
        from hrnn import core, triton_core
        if triton_core.use_gated_kernels(x, w_h, gate_h, *tensors):
            return triton_core.gated_leaky_rnn(x, w_x, bias, w_h, h0, waves, gate_x, gate_bias, gate_h, gate_mode,
                                               thresholds, last_only, core._matmul_precision)
        return _reference_op(x, w_x, bias, w_h, h0, waves, gate_x, gate_bias, gate_h, gate_mode, thresholds, last_only)
    reason = fused.supports(*tensors)
    if reason is not None:
        fused.warn_fallback(reason)
        return _reference_op(x, w_x, bias, w_h, h0, waves, gate_x, gate_bias, gate_h, gate_mode, thresholds, last_only)
    thr = None
    if gated and gate_mode == "hard":  # the reference's cast; broadcast only when it varies
        thr = torch.as_tensor(thresholds, dtype=x.dtype, device=x.device)
        if thr.dim():
            thr = thr.expand(x.shape[0], x.shape[1], n_modules).contiguous()
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    args = [None if t is None else t.contiguous() for t in (x, w_x, bias, gate_x, gate_bias, w_h, gate_h, waves, h0)]
    if not need_grad:  # forward only: closed modules' candidates are skipped; last_only writes no (B, T, H)
        with torch.no_grad():
            states, _, activations, _ = fused._C.gated_forward(*args, thr, False, False, bool(last_only))
        return states, activations
    # The straight-through gradient (and a waves gradient) at a = 0 reads the candidate.
    all_candidates = gated or (waves is not None and waves.requires_grad)
    return _GatedLeakyRNN.apply(*args, thr, all_candidates, bool(last_only))


def _reference_op(x, w_x, bias, w_h, h0, waves, gate_x, gate_bias, gate_h, gate_mode, thresholds, last_only):
    """The op's fallback: the reference loop, with the op's last_only."""
    states, activations = gated_leaky_rnn_reference(x, w_x, bias, w_h, h0, waves, gate_x, gate_bias, gate_h,
                                                    gate_mode, thresholds)
    return (states[:, -1] if last_only else states), activations


def last_candidate_blocks() -> int:
    """Candidate blocks (sample, step, module) the fused core computed in its last forward
    (-1 before any): B T M when dense, the number of open (b, t, m) when it skipped."""
    from hrnn import fused

    return fused._C.gated_candidate_blocks() if fused.available() else -1


class _GatedLeakyRNN(torch.autograd.Function):
    """The fused core behind autograd, input projections included: the kernels form
    b + x_t W_x^T (and g_b + x_t G_x^T) per step and accumulate their gradients in the backward
    loop, so no (B, T, H) u or du exists (at f = 0 those cost more than the skipping saved)."""

    @staticmethod
    def forward(ctx, x, w_x, bias, gate_x, gate_bias, w_h, gate_h, waves, h0, thr, all_candidates,
                last_only):  # noqa: D102
        from hrnn import fused

        inputs = (x, w_x, bias, gate_x, gate_bias, w_h, gate_h, waves, h0, thr)
        states, cands, activations, gates = fused._C.gated_forward(*inputs, all_candidates, True, False)
        ctx.save_for_backward(states, cands, activations, gates, *inputs)
        ctx.all_candidates = all_candidates
        ctx.set_materialize_grads(False)
        # last_only: the backward then gets a (B, H) gradient, not a mostly-zero (B, T, H) one.
        return (states[:, -1].clone() if last_only else states), activations

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states, grad_activations):  # noqa: D102
        from hrnn import fused

        states, cands, activations, gates, *inputs = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_states is None:
            grad_states = torch.zeros_like(states)
        grads = fused._C.gated_backward(grad_states, grad_activations, states, cands, activations, gates, *inputs,
                                        need[0], ctx.all_candidates, need[7])
        return (*(g if n else None for g, n in zip(grads, need)), None, None, None)


def _check(x: Tensor, w_h: Tensor, h0: Tensor, waves: Tensor | None, gate_x: Tensor | None,
           gate_bias: Tensor | None, gate_h: Tensor | None, gate_mode: str) -> int:
    """The number of modules M, after checking every shape against x (B, T, I) and w_h (H, H)."""
    batch, steps, inputs = x.shape
    hidden = w_h.shape[0]
    if (gate_x is None) != (gate_h is None) or (gate_x is None) != (gate_bias is None):
        raise ValueError("gate_x, gate_bias and gate_h come together: give all three or none")
    if waves is None and gate_x is None:
        raise ValueError("give waves, an event gate, or both")
    n_modules = gate_x.shape[0] if gate_x is not None else waves.shape[-1]
    if hidden % n_modules or w_h.shape != (hidden, hidden) or h0.shape != (batch, hidden):
        raise ValueError(f"w_h {tuple(w_h.shape)} and h0 {tuple(h0.shape)} do not fit batch {batch} and "
                         f"{n_modules} modules")
    if waves is not None and waves.shape not in ((steps, n_modules), (batch, steps, n_modules)):
        raise ValueError(f"waves has shape {tuple(waves.shape)}, expected ({steps}, {n_modules}) or "
                         f"({batch}, {steps}, {n_modules})")
    if gate_x is not None and (gate_x.shape != (n_modules, inputs) or gate_h.shape != (n_modules, hidden)
                               or gate_bias.shape != (n_modules,)):
        raise ValueError(f"gate_x {tuple(gate_x.shape)}, gate_h {tuple(gate_h.shape)}, gate_bias "
                         f"{tuple(gate_bias.shape)} do not fit ({n_modules}, {inputs}), ({n_modules}, {hidden}), "
                         f"({n_modules},)")
    if gate_mode not in GATE_MODES:
        raise ValueError(f"gate_mode={gate_mode!r}; allowed: {', '.join(GATE_MODES)}")
    return n_modules
