"""The gated recurrence (hrnn.ops.gated_leaky_rnn) against its definition, and event activation in the model."""
from __future__ import annotations

import pytest
import torch

from hrnn.models.clock import FixedClock
from hrnn.models.recurrent import EVALUATION_DRAWS_SEED, ChunkerGate, ClockedRNN, EventGate
from hrnn.ops import chunker_leaky_rnn_reference, gated_leaky_rnn, gated_leaky_rnn_reference, leaky_rnn_reference

B, T, I, H, M = 3, 9, 2, 8, 4
F64 = torch.float64


def inputs(seed: int = 0, dtype=F64) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=dtype) * scale)
    return {"x": r(B, T, I), "w_x": r(H, I, scale=0.7), "bias": r(H, scale=0.1), "w_h": r(H, H, scale=0.4),
            "h0": r(B, H, scale=0.5), "gate_x": r(M, I), "gate_bias": r(M, scale=0.5), "gate_h": r(M, H)}


def run(args: dict, waves=None, mode="soft", thresholds=0.5):
    return gated_leaky_rnn_reference(args["x"], args["w_x"], args["bias"], args["w_h"], args["h0"], waves,
                                     args["gate_x"], args["gate_bias"], args["gate_h"], mode, thresholds)


def gate_values(args: dict, states: torch.Tensor) -> torch.Tensor:
    """g_t from the definition, reading h_{t-1} off the returned states: (B, T, M)."""
    previous = torch.cat([args["h0"].unsqueeze(1), states[:, :-1]], dim=1)
    return torch.sigmoid(args["x"] @ args["gate_x"].t() + previous @ args["gate_h"].t() + args["gate_bias"])


def test_hard_gate_zero_holds_state_bit_for_bit_and_one_takes_the_candidate():
    args = inputs(1)
    waves = FixedClock([1, 2, 3, 1]).waves(T).to(F64)  # clock_event: wave * gate
    states, a = run(args, waves, mode="hard")
    gate = gate_values(args, states)
    assert torch.equal(a, (gate > 0.5).to(F64) * waves)  # a_t = w_t * 1[g_t > threshold]
    assert 0 < a.mean() < 1  # both cases occur
    previous = torch.cat([args["h0"].unsqueeze(1), states[:, :-1]], dim=1)
    candidate = torch.tanh(args["x"] @ args["w_x"].t() + args["bias"] + previous @ args["w_h"].t())
    for b in range(B):
        for t in range(T):
            for m in range(M):
                block = slice(2 * m, 2 * m + 2)
                if a[b, t, m] == 0:
                    assert torch.equal(states[b, t, block], previous[b, t, block]), (b, t, m)
                else:
                    assert t % [1, 2, 3, 1][m] == 0  # the clock's schedule bounds the updates
                    torch.testing.assert_close(states[b, t, block], candidate[b, t, block], rtol=0, atol=1e-14)


def test_truncated_gate_is_the_gate_above_its_threshold_and_a_shut_module_holds():
    """e_t = g_t where g_t > tau, exactly 0 elsewhere: a shut module keeps its state bit for bit, an open
    one moves by g toward its candidate; the gradient reaching the gate is 0 wherever it is shut."""
    args = {k: v.clone().requires_grad_() for k, v in inputs(4).items()}
    states, a = run(args, mode="truncated", thresholds=0.45)
    gate = gate_values(args, states).detach()
    assert torch.equal(a.detach() == 0, gate <= 0.45)  # (the gate read back equals the op's to ulps)
    torch.testing.assert_close(a.detach(), torch.where(gate > 0.45, gate, torch.zeros_like(gate)), rtol=0, atol=1e-15)
    assert 0 < (a == 0).float().mean() < 1
    previous = torch.cat([args["h0"].unsqueeze(1), states[:, :-1]], dim=1).detach()
    candidate = torch.tanh(args["x"] @ args["w_x"].t() + args["bias"] + previous @ args["w_h"].t()).detach()
    units = a.detach().repeat_interleave(H // M, dim=2)
    assert torch.equal(states.detach()[units == 0], previous[units == 0])
    torch.testing.assert_close(states.detach(), previous + units * (candidate - previous), rtol=0, atol=1e-14)
    # The gate's logit gets dL/de g (1 - g) where open and nothing where shut: with the loss reading the
    # activations alone, the bias gradient is the sum of g (1 - g) over the open entries of each module.
    grad_bias, = torch.autograd.grad(a.sum(), args["gate_bias"], retain_graph=True)
    # The states also carry gradient to the gate through h; read the activations at t = 0 only, where h = h0.
    grad_bias0, = torch.autograd.grad(a[:, 0].sum(), args["gate_bias"])
    g0 = gate[:, 0]
    torch.testing.assert_close(grad_bias0, (torch.where(g0 > 0.45, g0 * (1 - g0), torch.zeros_like(g0))).sum(0))
    assert grad_bias.abs().sum() > 0


def test_truncated_support_gives_a_shut_gate_near_its_threshold_the_open_gates_gradient():
    """Within `support` below tau a shut entry keeps the value 0 and its state, but its logit gets the
    gradient an open gate would: dL/de g (1 - g) with dL/de = sum over its units of dL/dh_t (c_t - h_{t-1}).
    At t = 0 with a loss linear in h_0's successor, dL/dh_1 does not depend on the forward, so each logit's
    gradient is the soft gate's where open or within the support, and 0 further below (a plain loop here).
    That gradient reaches the gate's weights only: h0's and x's gradients are the exact gate's."""
    args = {k: v.clone().requires_grad_() for k, v in inputs(4).items()}
    tau, support = 0.45, 0.2
    first = {**args, "x": args["x"][:, :1]}
    readout = torch.randn(B, 1, H, generator=torch.Generator().manual_seed(3), dtype=F64)
    states, a = run(first, mode="truncated", thresholds=tau)
    grad_exact, state_exact, x_exact = torch.autograd.grad((states * readout).sum(),
                                                           [args["gate_bias"], args["h0"], args["x"]])
    states_s, a_s = gated_leaky_rnn_reference(first["x"], first["w_x"], first["bias"], first["w_h"], first["h0"], None,
                                              first["gate_x"], first["gate_bias"], first["gate_h"], "truncated", tau,
                                              support=support)
    assert torch.equal(states_s, states) and torch.equal(a_s, a)  # the values are the truncated gate's
    grad_support, state_support, x_support = torch.autograd.grad((states_s * readout).sum(),
                                                                 [args["gate_bias"], args["h0"], args["x"]])
    assert torch.equal(state_support, state_exact) and torch.equal(x_support, x_exact)
    # The plain loop: the open gate's dL/dlogit per (sample, module), kept where g > tau - support.
    h0 = args["h0"].detach()
    g = torch.sigmoid(first["x"][:, 0].detach() @ args["gate_x"].detach().t() + h0 @ args["gate_h"].detach().t()
                      + args["gate_bias"].detach())
    candidate = torch.tanh(first["x"][:, 0].detach() @ args["w_x"].detach().t() + args["bias"].detach()
                           + h0 @ args["w_h"].detach().t())
    want = torch.zeros(M, dtype=F64)
    want_exact = torch.zeros(M, dtype=F64)
    for b in range(B):
        for m in range(M):
            units = slice(m * (H // M), (m + 1) * (H // M))
            de = (readout[b, 0, units] * (candidate[b, units] - h0[b, units])).sum()
            dlogit = de * g[b, m] * (1 - g[b, m])
            if g[b, m] > tau - support:
                want[m] += dlogit
            if g[b, m] > tau:
                want_exact[m] += dlogit
    within = (g <= tau) & (g > tau - support)
    assert within.any() and (g <= tau - support).any() and (g > tau).any()
    torch.testing.assert_close(grad_support, want, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_exact, want_exact, rtol=0, atol=1e-14)
    assert not torch.allclose(grad_support, grad_exact)


@pytest.mark.parametrize("mode,support", [("soft", 0.1), ("truncated", -0.1), ("truncated", 1.5)])
def test_a_support_outside_the_truncated_gate_or_its_range_is_refused(mode, support):
    args = inputs(0)
    with pytest.raises(ValueError, match=f"support={support}; allowed: 0, or in \\(0, 1\\] with the truncated gate"):
        gated_leaky_rnn(args["x"], args["w_x"], args["bias"], args["w_h"], args["h0"], None, args["gate_x"],
                        args["gate_bias"], args["gate_h"], mode, 0.5, support=support)


def test_stochastic_thresholds_are_read_per_sample_step_and_module():
    args = inputs(2)
    thresholds = torch.rand(B, T, M, generator=torch.Generator().manual_seed(3), dtype=F64)
    states, a = run(args, mode="hard", thresholds=thresholds)
    assert torch.equal(a, (gate_values(args, states) > thresholds).to(F64))


def test_straight_through_gradients_match_the_definition():
    """Hard forward, and gradients as if e_t = g_t: the surrogate g + (1[g > 0.5] - g).detach()."""
    args = {k: v.requires_grad_() for k, v in inputs(4).items()}
    waves = torch.rand(T, M, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_()

    def definition():
        u = args["x"] @ args["w_x"].t() + args["bias"]
        h, states = args["h0"], []
        for t in range(T):
            g = torch.sigmoid(args["x"][:, t] @ args["gate_x"].t() + h @ args["gate_h"].t() + args["gate_bias"])
            e = g + ((g > 0.5).to(F64) - g).detach()
            a = (waves[t] * e).repeat_interleave(H // M, dim=1)
            h = h + a * (torch.tanh(u[:, t] + h @ args["w_h"].t()) - h)
            states.append(h)
        return torch.stack(states, dim=1)

    leaves = [*args.values(), waves]
    weights = torch.randn(B, T, H, dtype=F64)
    got_states, got_a = run(args, waves, mode="hard")
    got = torch.autograd.grad((got_states * weights).sum(), leaves)
    want_states = definition()
    want = torch.autograd.grad((want_states * weights).sum(), leaves)
    torch.testing.assert_close(got_states, want_states, rtol=0, atol=1e-12)
    for name, g, w in zip([*args, "waves"], got, want):
        assert g.abs().sum() > 0, name  # every input, the gate's included, gets a gradient
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("per_sample", [False, True], ids=["waves (T, M)", "waves (B, T, M)"])
def test_gradcheck_soft_path_every_input_float64(per_sample):
    args = {k: v.requires_grad_() for k, v in inputs(6).items()}
    shape = (B, T, M) if per_sample else (T, M)
    waves = torch.rand(*shape, dtype=F64, generator=torch.Generator().manual_seed(7)).requires_grad_()
    names = list(args)

    def states(*tensors):
        values = dict(zip(names, tensors[:-1]))
        return run(values, tensors[-1], mode="soft")[0]

    assert torch.autograd.gradcheck(states, (*args.values(), waves))


def test_per_sample_waves_equal_the_shared_path_when_gates_are_constant():
    args = inputs(8)
    waves = torch.rand(B, T, M, dtype=F64, generator=torch.Generator().manual_seed(9))
    core = lambda b, w: leaky_rnn_reference(args["x"][b:b + 1], args["w_x"], args["bias"], args["w_h"], w,
                                            args["h0"][b:b + 1])
    no_gate = {**args, "gate_x": None, "gate_bias": None, "gate_h": None}
    per_sample, a = run(no_gate, waves)
    assert torch.equal(a, waves)
    for b in range(B):  # each sample's own waves, as the (T, M) path runs them
        torch.testing.assert_close(per_sample[b:b + 1], core(b, waves[b]), rtol=0, atol=1e-14)
    # A gate that is always open (hard, g = sigmoid(30) > 0.5) or always 0.3 (soft) is the clock path, scaled.
    constant = {**args, "gate_x": torch.zeros(M, I, dtype=F64), "gate_h": torch.zeros(M, H, dtype=F64)}
    shared = waves[0]
    opened, _ = run({**constant, "gate_bias": torch.full((M,), 30.0, dtype=F64)}, shared, mode="hard")
    soft, _ = run({**constant, "gate_bias": torch.full((M,), 0.3, dtype=F64).logit()}, shared, mode="soft")
    for b in range(B):
        torch.testing.assert_close(opened[b:b + 1], core(b, shared), rtol=0, atol=1e-14)
        torch.testing.assert_close(soft[b:b + 1], core(b, shared * 0.3), rtol=0, atol=1e-14)


def test_last_only_and_shape_errors():
    args = inputs(10)
    states, a = gated_leaky_rnn(**args, waves=None, gate_mode="soft", thresholds=0.5, last_only=True)
    full, _ = gated_leaky_rnn(**args, waves=None, gate_mode="soft", thresholds=0.5)
    torch.testing.assert_close(states, full[:, -1], rtol=0, atol=0)  # the op's own last row (the fused
    torch.testing.assert_close(states, run(args)[0][:, -1], rtol=0, atol=1e-13)  # core when built)
    with pytest.raises(ValueError, match=r"waves has shape \(5, 4\), expected \(9, 4\) or \(3, 9, 4\)"):
        run(args, torch.ones(5, M, dtype=F64))
    with pytest.raises(ValueError, match="gate_mode='sometimes'; allowed: soft, hard"):
        run(args, mode="sometimes")
    with pytest.raises(ValueError, match="give all three or none"):
        run({**args, "gate_h": None})


def make_model(mode: str, clock=True, update_weight=0.1, slope=5.0) -> ClockedRNN:
    torch.manual_seed(0)
    event = EventGate(I, H, M, mode, bias=-1.0, threshold=0.5, update_weight=update_weight, slope=slope)
    return ClockedRNN(I, H, FixedClock([1, 2, 4, 8]) if clock else None, "full", event=event)


@pytest.mark.parametrize("mode", ["hard", "stochastic", "soft", "annealed", "truncated"])
def test_model_penalty_is_update_weight_times_mean_activation(mode):
    model = make_model(mode)
    x = torch.randn(B, T, I)
    model(x)
    fraction = model.activations.mean()
    assert model.penalty().item() == pytest.approx(0.1 * fraction.item())
    assert model.update_fraction() == pytest.approx(fraction.item())
    if mode not in ("soft", "annealed", "truncated"):  # annealed trains soft; truncated keeps g where open
        assert set(model.activations.unique().tolist()) <= {0.0, 1.0}
    assert make_model(mode, update_weight=0.0)(x) is not None and make_model(mode, update_weight=0.0).penalty() == 0


def test_stochastic_gate_draws_in_training_and_in_evaluation_from_a_fixed_seed():
    """Evaluation draws U from a generator seeded with EVALUATION_DRAWS_SEED, not from the global RNG
    and not the threshold: at t = 0 (h = h0 for every mode) a = 1[g > U] with the soft model's g."""
    model = make_model("stochastic", clock=False)
    x = torch.randn(B, T, I)
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert not torch.equal(first, model(x))  # different draws, different updates
    model.eval()
    torch.manual_seed(3)
    evaluated, activations = model(x), model.activations
    torch.manual_seed(4)
    assert torch.equal(evaluated, model(x))  # evaluation draws do not follow the global RNG
    soft = make_model("soft", clock=False).eval()  # the same weights (seed 0)
    soft(x)
    draws = torch.rand(B, T, M, generator=torch.Generator().manual_seed(EVALUATION_DRAWS_SEED))
    assert torch.equal(activations[:, 0], (soft.activations[:, 0] > draws[:, 0]).to(activations.dtype))
    assert 0 < activations.mean() < 1


def test_hard_gate_parameters_get_gradients_from_the_loss_through_the_straight_through_estimator():
    model = make_model("hard")
    (model(torch.randn(B, T, I))[:, -1].square().sum() + model.penalty()).backward()
    for name in ("input.weight", "input.bias", "recurrent.weight"):
        assert model.event.get_parameter(name).grad.abs().sum() > 0, name


def chunker_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=F64) * scale
    return {"x": r(B, T, I), "w_x": r(H, I, scale=0.7), "bias": r(H, scale=0.1), "w_h": r(H, H, scale=0.4),
            "h0": r(B, H, scale=0.5), "predict_w": r(M - 1, I, H // M), "predict_b": r(M - 1, I, scale=0.3),
            "log_threshold": r(M - 1, scale=0.3)}


def chunker_errors(args: dict, states: torch.Tensor) -> torch.Tensor:
    """eps^m_t from the definition: module m's linear prediction of x_t from h^m_{t-1}, m < M - 1."""
    previous = torch.cat([args["h0"].unsqueeze(1), states[:, :-1]], dim=1)  # h_{t-1}, (B, T, H)
    errors = []
    for m in range(M - 1):
        prediction = previous[:, :, 2 * m:2 * m + 2] @ args["predict_w"][m].t() + args["predict_b"][m]
        errors.append((args["x"] - prediction).square().mean(dim=2))
    return torch.stack(errors, dim=2)


def test_chunker_module_wakes_exactly_when_the_module_below_mispredicts():
    args = chunker_inputs(11)
    states, a, errors = chunker_leaky_rnn_reference(**args, gate_mode="hard", thresholds=0.5)
    torch.testing.assert_close(errors, chunker_errors(args, states), rtol=0, atol=1e-12)
    theta = args["log_threshold"].exp()
    assert torch.equal(a[:, :, 0], torch.ones(B, T, dtype=F64))  # module 0 always updates
    assert torch.equal(a[:, :, 1:], (errors > theta).to(F64))  # g = eps / (eps + theta) > 1/2  <=>  eps > theta
    assert 0 < a[:, :, 1:].mean() < 1
    previous = torch.cat([args["h0"].unsqueeze(1), states[:, :-1]], dim=1)
    for b, t, m in zip(*torch.nonzero(a == 0, as_tuple=True)):
        assert torch.equal(states[b, t, 2 * m:2 * m + 2], previous[b, t, 2 * m:2 * m + 2])


def test_gradcheck_chunker_soft_path_every_input_float64():
    args = chunker_inputs(12)
    args["x"] = args["x"][:, :5].contiguous()  # 5 steps keep the gradcheck short
    args = {k: v.requires_grad_() for k, v in args.items()}
    names = list(args)

    def outputs(*tensors):
        states, _, errors = chunker_leaky_rnn_reference(**dict(zip(names, tensors)), gate_mode="soft", thresholds=0.5)
        return states, errors

    assert torch.autograd.gradcheck(outputs, tuple(args.values()))


def test_chunker_model_penalty_trains_predictions_and_thresholds():
    torch.manual_seed(0)
    gate = ChunkerGate(I, H, M, "hard", threshold_init=0.5, threshold=0.5, update_weight=0.1, prediction_weight=2.0)
    model = ClockedRNN(I, H, None, "full", event=gate)
    model(torch.randn(B, T, I))
    penalty = model.penalty()
    assert penalty.item() == pytest.approx(0.1 * model.activations.mean().item() + 2.0 * gate.errors.mean().item())
    assert model.activations.shape == (B, T, M) and gate.errors.shape == (B, T, M - 1)
    (model(torch.randn(B, T, I))[:, -1].square().sum() + model.penalty()).backward()
    for name in ("predict_w", "predict_b", "log_threshold"):
        assert gate.get_parameter(name).grad.abs().sum() > 0, name


def test_annealed_gate_is_sigmoid_of_slope_times_z_in_training_and_z_above_zero_in_evaluation():
    model = make_model("annealed", clock=False, slope=7.0).double()
    event, x = model.event, torch.randn(B, T, I, dtype=F64)
    args = {"x": x, "w_x": model.input.weight, "bias": model.input.bias, "w_h": model.recurrent, "h0": torch.zeros(B, H, dtype=F64),
            "gate_x": event.input.weight, "gate_bias": event.input.bias, "gate_h": event.recurrent.weight}
    for fraction, slope in ((0.0, 1.0), (0.5, 4.0), (1.0, 7.0), (3.0, 7.0)):  # s = 1 + 6 * min(fraction, 1)
        model.set_progress(fraction)
        assert event.slope == slope
        states = model(x)
        scaled = {**args, **{k: slope * args[k] for k in ("gate_x", "gate_bias", "gate_h")}}
        expected, activations = run(scaled)
        torch.testing.assert_close(states, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(model.activations, activations, rtol=0, atol=1e-12)
        assert 0 < activations.mean() < 1 and not set(activations.unique().tolist()) <= {0.0, 1.0}
    model.eval()
    states = model(x)  # hard at z > 0, whatever the slope: sigmoid(z) > 1/2
    expected, activations = run(args, mode="hard", thresholds=0.5)
    torch.testing.assert_close(states, expected, rtol=0, atol=1e-12)
    assert torch.equal(model.activations, activations) and 0 < activations.mean() < 1
    assert set(activations.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(activations, (gate_values(args, states) > 0.5).to(F64), rtol=0, atol=0)


def test_annealed_gate_trains_hard_from_its_fraction_with_the_straight_through_gradient():
    """gate_hard_from = 0.5: soft sigmoid(s z) before half of training; from there on hard
    1[z > 0] in training too, its gradient the straight-through one of sigmoid(s z) (the
    reference loop's hard mode on the slope-scaled weights); 1.0 (the default) never trains hard."""
    torch.manual_seed(0)
    event = EventGate(I, H, M, "annealed", bias=-1.0, threshold=0.5, update_weight=0.1, slope=5.0, hard_from=0.5)
    model = ClockedRNN(I, H, None, "full", event=event).double()
    x = torch.randn(B, T, I, dtype=F64)
    model.set_progress(0.25)
    model(x)
    assert event.op_mode() == "soft" and not set(model.activations.unique().tolist()) <= {0.0, 1.0}
    model.set_progress(0.75)  # s = 1 + 4 * 0.75 = 4
    model(x)[:, -1].square().sum().backward()
    assert event.op_mode() == "hard" and set(model.activations.unique().tolist()) <= {0.0, 1.0}
    assert 0 < model.activations.mean() < 1
    scaled = [(4.0 * w).detach().requires_grad_() for w in (event.input.weight, event.input.bias, event.recurrent.weight)]
    states, acts = gated_leaky_rnn_reference(x, model.input.weight.detach(), model.input.bias.detach(),
                                             model.recurrent.detach(), torch.zeros(B, H, dtype=F64), None, *scaled,
                                             "hard", 0.5)
    assert torch.equal(acts, model.activations)
    states[:, -1].square().sum().backward()
    for mine, theirs in zip((event.input.weight, event.input.bias, event.recurrent.weight), scaled):
        torch.testing.assert_close(mine.grad, 4.0 * theirs.grad, rtol=1e-10, atol=1e-12)
        assert mine.grad.abs().sum() > 0
    never = make_model("annealed", clock=False)
    never.set_progress(1.0)  # the last training step: still soft with the default
    assert never.event.op_mode() == "soft"


def test_annealed_gate_gradient_is_the_slope_times_the_soft_gate_gradient_at_the_scaled_weights():
    """d/dW f(s W) = s f'(s W): the model's gate gradients against the reference loop's, float64."""
    model = make_model("annealed", clock=False, slope=3.0).double()
    model.set_progress(0.5)  # s = 2
    x = torch.randn(B, T, I, dtype=F64)
    model(x)[:, -1].square().sum().backward()
    event = model.event
    scaled = [(2.0 * w).detach().requires_grad_() for w in (event.input.weight, event.input.bias, event.recurrent.weight)]
    states, _ = gated_leaky_rnn_reference(x, model.input.weight.detach(), model.input.bias.detach(), model.recurrent.detach(),
                                          torch.zeros(B, H, dtype=F64), None, *scaled, "soft", 0.5)
    states[:, -1].square().sum().backward()
    for mine, theirs in zip((event.input.weight, event.input.bias, event.recurrent.weight), scaled):
        torch.testing.assert_close(mine.grad, 2.0 * theirs.grad, rtol=1e-10, atol=1e-12)
        assert mine.grad.abs().sum() > 0
