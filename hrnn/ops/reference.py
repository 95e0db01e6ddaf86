"""The definitions of the ops: one plain PyTorch loop per op, which the kernels are tested against
and which runs wherever no kernel takes the inputs (hrnn/ops/dispatch.py chooses).

The clock op, `leaky_scan` / `leaky_rnn` (one shared (T, M) wave for the whole batch):

    h_t = a_t * tanh(u_t + W_h h_{t-1}) + (1 - a_t) * h_{t-1}

`u` is the input projection (W_x x_t + b; `leaky_rnn` takes x, W_x and b and forms it); `a` holds
one activation per module and step, repeated over the module's units.

The event-gated op, `gated_leaky_rnn`: an event gate reads the state, so each sample's
activations differ and are only known step by step:

    g_t = sigmoid(x_t G_x^T + h_{t-1} G_h^T + g_b)            (B, M)   event gate
    e_t = g_t                                  gate_mode "soft"
        = 1[g_t > thresholds_t]                gate_mode "hard" (straight-through gradient)
        = g_t 1[g_t > thresholds_t]            gate_mode "truncated" (exact gradient, 0 where shut,
                                               except within `support` below the threshold)
    a_t = w_t * e_t                            w_t: clock wave, (M,) or per sample (B, M); 1 if none
    c_t = tanh(x_t W_x^T + b + h_{t-1} W_h^T)  (B, H)   candidate
    h_t = h_{t-1} + a_t * (c_t - h_{t-1})      a_t repeated over each module's H / M units

The straight-through estimator passes dL/de_t to g_t unchanged (Bengio et al. 2013):
forward 0/1, backward as if e_t = g_t. A hard a_t = 0 holds h bit-for-bit and a_t = 1
takes the candidate exactly (torch.lerp), so a kernel may skip the rows and modules with
a_t = 0 in the forward (the backward still needs their candidates for dL/dg, as the clock
op's kernels do for waves that require grad). Stochastic binarisation is the same op
with thresholds drawn uniform in [0, 1) by the caller: no random numbers are drawn in here,
so a kernel is deterministic given its inputs.

The truncated gate is the soft gate cut to exactly 0 at or below a threshold tau: an open entry
updates by g itself, a shut one holds h bit-for-bit. Its gradient is the true one, g(1 - g) where
open and 0 where shut (no estimator), so a shut (sample, step, module) needs no candidate in the
forward and passes dL/dh_t through unchanged in the backward: training costs what the open
entries cost. Since dg/dz = g(1 - g) is already small where g is small, cutting there loses
little gradient. But a gate that falls below its threshold everywhere gets no gradient at all and
stays shut for good; `support` > 0 gives a shut entry with thresholds_t - support < g_t the gradient
it would have if open (a pseudo-derivative of bounded support, as EGRU's): dL/de = w sum over the
module's units of dL/dh_t (c_t - h_{t-1}), times g(1 - g), into the gate's own weights G_x, g_b and
G_h, with x_t and h_{t-1} held. Its value stays exactly 0 and its state is held, and no gradient of it
reaches the state: through a shut entry dL/dh_{t-1} stays dL/dh_t exactly. (Passed on through G_h,
as an open gate's is, the pseudo-gradient of every shut entry near its threshold compounded over the
steps: on sequential MNIST the gradient norm reached 1e17 within ten steps.) Only the entry's
candidate is needed, so the cost follows the entries open or within the support.

`chunker_leaky_rnn` is the same loop with the Chunker's gate (a module wakes when the one
below mispredicts the input); see its reference's docstring.

The loops read the projections through `unbind(1)` rather than `u[:, t]`: each `u[:, t]` puts a
select in the graph whose backward writes a zero-filled (B, T, H) gradient, so the backward would
cost O(T^2) memory traffic (~17 s at B=100, T=784, H=128 on a 2-core machine, against ~0.1 s
forward). Values and gradients are the same either way.
"""
from __future__ import annotations

import torch
from torch import Tensor

GATE_MODES = ("soft", "hard", "truncated")


def check_scan(u_shape: tuple, w_h: Tensor, waves: Tensor, h0: Tensor) -> None:
    """ValueError unless w_h (H, H), waves (T, M) with M dividing H and h0 (B, H) fit u's (B, T, H)."""
    batch, steps, hidden = u_shape
    if w_h.shape != (hidden, hidden):
        raise ValueError(f"w_h has shape {tuple(w_h.shape)}, expected ({hidden}, {hidden})")
    if waves.dim() != 2 or waves.shape[0] != steps or hidden % waves.shape[1] != 0:
        raise ValueError(f"waves has shape {tuple(waves.shape)}, expected ({steps}, M) with M dividing {hidden}")
    if h0.shape != (batch, hidden):
        raise ValueError(f"h0 has shape {tuple(h0.shape)}, expected ({batch}, {hidden})")


def check_projection(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor) -> None:
    """ValueError unless x is (B, T, I), w_x (H, I) and bias (H,) or None, for W_h's H."""
    if x.dim() != 3 or w_x.shape != (w_h.shape[0], x.shape[-1]) or (
            bias is not None and bias.shape != (w_h.shape[0],)):
        raise ValueError(f"x {tuple(x.shape)}, w_x {tuple(w_x.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit hidden size {w_h.shape[0]}")


def leaky_scan_reference(u: Tensor, w_h: Tensor, waves: Tensor, h0: Tensor, last_only: bool = False) -> Tensor:
    """The clock op's definition, a plain autograd loop over time.

    u: (B, T, H) input projection, bias included.
    w_h: (H, H) recurrent weights, already masked for the connectivity.
    waves: (T, M) activation of each of the M modules at each step, in [0, 1].
    h0: (B, H) initial state.
    Returns all states, (B, T, H), or with last_only the final one, (B, H).
    """
    hidden = u.shape[2]
    a = waves.repeat_interleave(hidden // waves.shape[1], dim=1)  # (T, H)
    w_t = w_h.t()
    h = h0
    states = []
    for u_t, a_t in zip(u.unbind(1), a.unbind(0)):
        h = torch.lerp(h, torch.tanh(torch.addmm(u_t, h, w_t)), a_t)
        states.append(h)
    return h if last_only else torch.stack(states, dim=1)


def leaky_rnn_reference(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, waves: Tensor,
                        h0: Tensor, last_only: bool = False) -> Tensor:
    """`leaky_rnn`'s definition: the projection as F.linear, then the clock op's loop."""
    return leaky_scan_reference(torch.nn.functional.linear(x, w_x, bias), w_h, waves, h0, last_only)


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
                              gate_h: Tensor | None, gate_mode: str, thresholds: Tensor | float,
                              last_only: bool = False, support: float = 0.0) -> tuple[Tensor, Tensor]:
    """The event-gated op's definition (module docstring), a plain autograd loop over time.

    x: (B, T, I); w_x: (H, I); bias: (H,) or None; w_h: (H, H), already masked or gated for the
    connectivity; h0: (B, H).
    waves: (T, M) shared or (B, T, M) per-sample clock activations in [0, 1], or None (all 1).
    gate_x: (M, I), gate_bias: (M,), gate_h: (M, H): the event gate, or all three None (a_t = w_t).
    gate_mode: "soft", "hard" or "truncated"; thresholds: a float or a tensor broadcastable to (B, T, M),
    read by "hard" and "truncated"; support (truncated only): the width below the threshold where a shut
    entry's gate still learns (module docstring).
    Returns all states (B, T, H), or with last_only the final one (B, H), and the activations a (B, T, M).
    """
    batch, steps, _ = x.shape
    hidden = w_h.shape[0]
    n_modules = check_gated(x, w_h, h0, waves, gate_x, gate_bias, gate_h, gate_mode, support)
    units = hidden // n_modules
    u = torch.nn.functional.linear(x, w_x, bias).unbind(1)  # unbind, not u[:, t]: module docstring
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
            gate = torch.sigmoid(gate_u[t] + product[:, hidden:])
            e = _binarise(gate, gate_mode, thresholds, t)
            if support > 0:
                e = e + _within_support(gate, thresholds[t], support, x[:, t], h, gate_x, gate_bias, gate_h)
            a = a * e
        h = torch.lerp(h, candidate, a.repeat_interleave(units, dim=1))
        states.append(h)
        activations.append(a)
    return (h if last_only else torch.stack(states, dim=1)), torch.stack(activations, dim=1)


def chunker_leaky_rnn_reference(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, h0: Tensor,
                                predict_w: Tensor, predict_b: Tensor, log_threshold: Tensor, gate_mode: str,
                                thresholds: Tensor | float, last_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The Chunker-style recurrence: module m >= 1 wakes when module m - 1 mispredicts the input.

        x^m_t = P_m h^m_{t-1} + p_m                  module m's prediction of x_t, m = 0 .. M-2
        eps^m_t = mean_i (x_t,i - x^m_t,i)^2          its error, (B, M-1)
        g^{m+1}_t = eps^m_t / (eps^m_t + theta_{m+1})  = sigmoid(log eps - log theta): 1/2 at eps = theta
        a^0_t = 1, a^{m+1}_t = e(g^{m+1}_t)            e as in the event gate (soft, or hard at thresholds)

    then the leaky update of the module docstring. predict_w: (M-1, I, H/M); predict_b: (M-1, I);
    log_threshold: (M-1,) log theta of modules 1 .. M-1. With the hard gate at threshold 1/2 a
    module wakes exactly when the error below it exceeds its theta. Returns the states (B, T, H) (the
    last, (B, H), with last_only), the activations (B, T, M) and the errors eps (B, T, M-1), which the
    model trains the predictions on.
    """
    batch, steps, _ = x.shape
    n_modules = check_chunker(x, w_h, predict_w, predict_b, log_threshold, gate_mode)
    units = w_h.shape[0] // n_modules
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
    return ((h if last_only else torch.stack(states, dim=1)), torch.stack(activations, dim=1),
            torch.stack(errors, dim=1))


def _binarise(gate: Tensor, gate_mode: str, thresholds: Tensor | tuple, t: int) -> Tensor:
    """e_t: the gate itself ("soft"), 1[gate > thresholds_t] with a straight-through gradient ("hard"), or
    the gate where it exceeds thresholds_t and exactly 0 elsewhere, gradient included ("truncated")."""
    if gate_mode == "hard":
        return StraightThrough.apply(gate, thresholds[t])
    if gate_mode == "truncated":
        return torch.where(gate > thresholds[t], gate, torch.zeros_like(gate))
    return gate


def _within_support(gate: Tensor, threshold: Tensor, support: float, x_t: Tensor, h: Tensor, gate_x: Tensor,
                    gate_bias: Tensor, gate_h: Tensor) -> Tensor:
    """Exactly 0 in value; where the truncated gate is shut within `support` below its threshold, the
    gradient of the gate with respect to its own weights G_x, g_b and G_h, x_t and h_{t-1} held
    (local - local.detach(): the value 0, the gradient of `local`)."""
    within = (gate <= threshold) & (gate > threshold - support)
    local = torch.sigmoid(torch.nn.functional.linear(x_t.detach(), gate_x, gate_bias) + h.detach() @ gate_h.t())
    return torch.where(within, local - local.detach(), torch.zeros_like(gate))


def _per_step(thresholds: Tensor | float, gate_mode: str, shape: tuple[int, int, int], like: Tensor):
    """thresholds as one (B, M) tensor per step (hard and truncated gates only)."""
    if gate_mode == "soft":
        return None
    return torch.as_tensor(thresholds, dtype=like.dtype, device=like.device).expand(shape).unbind(1)


def check_gated(x: Tensor, w_h: Tensor, h0: Tensor, waves: Tensor | None, gate_x: Tensor | None,
                gate_bias: Tensor | None, gate_h: Tensor | None, gate_mode: str, support: float = 0.0) -> int:
    """The number of modules M, after checking every shape of the event-gated op against x (B, T, I) and w_h (H, H)."""
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
    check_gate_mode(gate_mode)
    if not (support == 0 or (gate_mode == "truncated" and 0 < support <= 1)):
        raise ValueError(f"support={support!r}; allowed: 0, or in (0, 1] with the truncated gate")
    return n_modules


def check_chunker(x: Tensor, w_h: Tensor, predict_w: Tensor, predict_b: Tensor, log_threshold: Tensor,
                  gate_mode: str) -> int:
    """The number of modules M, after checking the Chunker's predictions and thresholds against x and w_h."""
    inputs, hidden = x.shape[2], w_h.shape[0]
    n_modules = predict_w.shape[0] + 1
    if (hidden % n_modules or predict_w.shape != (n_modules - 1, inputs, hidden // n_modules)
            or predict_b.shape != (n_modules - 1, inputs) or log_threshold.shape != (n_modules - 1,)):
        raise ValueError(f"predict_w {tuple(predict_w.shape)}, predict_b {tuple(predict_b.shape)}, log_threshold "
                         f"{tuple(log_threshold.shape)} do not fit (M-1, {inputs}, H/M), (M-1, {inputs}), (M-1,) "
                         f"with H = {hidden} and M - 1 = {n_modules - 1}")
    check_gate_mode(gate_mode)
    return n_modules


def check_gate_mode(gate_mode: str) -> None:
    if gate_mode not in GATE_MODES:
        raise ValueError(f"gate_mode={gate_mode!r}; allowed: {', '.join(GATE_MODES)}")
