"""The clock hierarchy's correctness: schedule, mask direction, state holding, gradients."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from hrnn.models.clock import BasisClock, FixedClock, PeriodClock, binary_basis, cosine_basis
from hrnn.models.recurrent import ClockedRNN, slow_to_fast_mask
from hrnn.ops import leaky_scan, leaky_scan_reference

# Explicit settings for clocks built by hand (the runner takes them from conf/); a test overrides what it studies.
SETTINGS = dict(init="spread", init_weight=0.8, sharpness=1.0, temperature=1.0, entropy_weight=0.0, l1_weight=0.01,
                learn_phase=False, start_periods=None)


def basis_clock(basis: str, size: int, n_modules: int, seq_len: int, regularizer: str, **settings) -> BasisClock:
    return BasisClock(basis, size, n_modules, seq_len, regularizer, **{**SETTINGS, **settings})


def period_clock(n_modules: int, seq_len: int, **settings) -> PeriodClock:
    return PeriodClock(n_modules, seq_len, **{"init": "spread", "start_periods": None, "open_ratio": 0.1, "leak": 0.001, **settings})


def test_binary_column_is_one_exactly_on_multiples():
    basis = binary_basis(50, 20)
    for t, p in itertools.product(range(50), range(1, 21)):
        assert basis[t, p - 1] == (1.0 if t % p == 0 else 0.0)


def test_cosine_basis_orthogonal_with_peaks_on_ticks():
    T = 48
    basis = cosine_basis(T, T // 2 + 1, T).double()
    gram = basis.t() @ basis
    expected = torch.full((T // 2 + 1,), T / 2, dtype=torch.float64)
    expected[0] = expected[-1] = T  # the constant and the Nyquist column
    assert torch.allclose(gram, torch.diag(expected), atol=1e-3)
    # Column k peaks (value 1) at t = 0, T/k, 2T/k: on ticks, no half-sample shift.
    for k in (1, 2, 3, 4, 6, 8, 12):
        ticks = torch.arange(0, T, T // k)
        assert torch.allclose(basis[ticks, k], torch.ones(len(ticks), dtype=torch.float64), atol=1e-6)


CLOCK_VARIANTS = [
    dict(basis=b, regularizer=r, init=i, sharpness=s)
    for b, r, i, s in itertools.product(["binary", "dct"], ["softmax", "l1", "none"], ["spread", "random", "uniform"], [1.0, 4.0])
]


@pytest.mark.parametrize("variant", CLOCK_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_every_transform_keeps_waves_in_unit_interval(variant):
    torch.manual_seed(0)
    T = 64
    size = T if variant["basis"] == "binary" else T // 2 + 1
    clock = basis_clock(size=size, n_modules=4, seq_len=T, **variant)
    with torch.no_grad():  # also far from the initialisation
        clock.coefficients.add_(torch.randn_like(clock.coefficients) * 3)
    waves = clock.waves(T)
    assert waves.shape == (T, 4)
    assert waves.min() >= 0 and waves.max() <= 1
    assert len(clock.periods()) == 4 and all(p >= 1 for p in clock.periods())


def test_period_clock_waves_in_unit_interval_and_open_on_ticks():
    clock = period_clock(n_modules=3, seq_len=100)
    with torch.no_grad():
        clock.log_period.copy_(torch.tensor([4.0, 10.0, 25.0]).log())
    waves = clock.waves(100)
    assert waves.min() >= 0 and waves.max() <= 1
    for m, p in enumerate([4, 10, 25]):
        assert torch.allclose(waves[::p, m], torch.ones(len(range(0, 100, p))), atol=1e-4)
    assert clock.periods() == pytest.approx([4.0, 10.0, 25.0])


def _one_hot_binary_clock(periods: list[int], T: int) -> BasisClock:
    clock = basis_clock("binary", size=T, n_modules=len(periods), seq_len=T, regularizer="none", init="uniform")
    with torch.no_grad():
        clock.coefficients.zero_()
        for m, p in enumerate(periods):
            clock.coefficients[p - 1, m] = 1.0
    return clock


def test_one_hot_spectrum_updates_on_multiples_and_holds_bit_for_bit():
    torch.manual_seed(0)
    periods, T = [1, 3, 5, 7], 40
    model = ClockedRNN(2, 16, _one_hot_binary_clock(periods, T), "full")
    assert model.clock.periods() == [1.0, 3.0, 5.0, 7.0]
    states = model(torch.randn(3, T, 2)).detach()
    previous = torch.zeros(3, 16)
    for t in range(T):
        for m, p in enumerate(periods):
            block = slice(4 * m, 4 * m + 4)
            changed = not torch.equal(states[:, t, block], previous[:, block])
            assert changed == (t % p == 0), (t, p)
        previous = states[:, t]


def test_cwrnn_schedule_is_t_mod_period():
    clock = FixedClock([1, 2, 4, 8])
    waves = clock.waves(33)
    for t, m in itertools.product(range(33), range(4)):
        assert waves[t, m] == float(t % (2**m) == 0)


def test_mask_direction_slow_modules_do_not_read_fast_ones():
    mask = slow_to_fast_mask(6, 3)  # modules of 2 units: 0 fastest, 2 slowest
    # Row = reading unit, column = read unit. Module 0 reads everyone; module 2 only itself.
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 1]
    assert mask[4].tolist() == [0, 0, 0, 0, 1, 1]
    assert mask[2].tolist() == [0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("make_clock", [lambda: FixedClock([1, 2, 4, 8]), lambda: _one_hot_binary_clock([1, 1, 1, 1], 8)])
def test_slow_state_independent_of_fast_state_but_fast_sees_slow(make_clock):
    torch.manual_seed(1)
    model = ClockedRNN(3, 16, make_clock(), connectivity="slow_to_fast")
    x = torch.randn(2, 1, 3)
    h0 = torch.randn(2, 16)
    base = model(x, h0).detach()
    fast = h0.clone()
    fast[:, :4] += 1.0  # perturb module 0 (fastest)
    after = model(x, fast).detach()
    assert torch.equal(after[:, 0, 4:], base[:, 0, 4:])  # slower modules unchanged
    slow = h0.clone()
    slow[:, 12:] += 1.0  # perturb module 3 (slowest)
    after = model(x, slow).detach()
    assert not torch.allclose(after[:, 0, :4], base[:, 0, :4])  # the fastest module reads it


def test_full_connectivity_lets_slow_read_fast():
    torch.manual_seed(1)
    model = ClockedRNN(3, 16, _one_hot_binary_clock([1, 1, 1, 1], 8), connectivity="full")
    x, h0 = torch.randn(2, 1, 3), torch.randn(2, 16)
    fast = h0.clone()
    fast[:, :4] += 1.0
    assert not torch.allclose(model(x, fast)[:, 0, 12:], model(x, h0)[:, 0, 12:])


@pytest.mark.parametrize("basis,regularizer", [("binary", "softmax"), ("dct", "softmax"), ("binary", "l1"), ("dct", "none")])
def test_gradcheck_whole_cell_float64(basis, regularizer):
    torch.manual_seed(0)
    T = 12
    size = 8 if basis == "binary" else T // 2 + 1
    clock = basis_clock(basis, size=size, n_modules=2, seq_len=T, regularizer=regularizer, init="random", sharpness=2.0)
    model = ClockedRNN(2, 6, clock, connectivity="slow_to_fast").double()
    with torch.no_grad():  # keep clipped waves away from the clip's kinks
        model.clock.coefficients.copy_(torch.rand_like(model.clock.coefficients) * 0.4 + 0.05)
    x = torch.randn(2, T, 2, dtype=torch.float64)
    params = [model.input.weight, model.input.bias, model.recurrent, model.clock.coefficients]

    def run(w_in, b_in, w_h, coefficients):
        model.input.weight, model.input.bias = w_in, b_in
        model.recurrent, model.clock.coefficients = w_h, coefficients
        return model(x)

    inputs = [p.detach().clone().requires_grad_() for p in params]
    for module, name in [(model.input, "weight"), (model.input, "bias"), (model, "recurrent"), (model.clock, "coefficients")]:
        delattr(module, name)
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5)


def test_gradcheck_leaky_scan_all_inputs_float64():
    torch.manual_seed(0)
    B, T, H, M = 2, 7, 6, 3
    u = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(H, H, dtype=torch.float64) * 0.5).requires_grad_()
    waves = torch.rand(T, M, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(leaky_scan, (u, w, waves, h0))
    assert torch.autograd.gradcheck(leaky_scan_reference, (u, w, waves, h0))


def test_l1_gradient_matches_penalty():
    clock = basis_clock("binary", size=10, n_modules=3, seq_len=10, regularizer="l1", init="random", l1_weight=0.05)
    with torch.no_grad():
        clock.coefficients.copy_(torch.randn(10, 3))
    clock.penalty().backward()
    assert clock.penalty().item() == pytest.approx(0.05 * clock.coefficients.abs().sum().item())
    assert torch.allclose(clock.coefficients.grad, 0.05 * clock.coefficients.detach().sign())


def test_entropy_penalty_gradient_matches_analytic():
    torch.manual_seed(0)
    clock = basis_clock("dct", size=6, n_modules=2, seq_len=10, regularizer="softmax", init="random", entropy_weight=0.3, temperature=2.0)
    with torch.no_grad():
        clock.coefficients.copy_(torch.randn(6, 2))
    clock.penalty().backward()
    c = clock.coefficients.detach()
    p = torch.softmax(c / 2.0, dim=0)
    entropy = -(p * p.log()).sum(0)
    assert clock.penalty().item() == pytest.approx(0.3 * entropy.mean().item(), rel=1e-5)
    # dH/dc_k = -(1/tau) p_k (log p_k + H), averaged over the 2 modules.
    analytic = 0.3 / 2 * (-(1 / 2.0) * p * (p.log() + entropy))
    assert torch.allclose(clock.coefficients.grad, analytic, atol=1e-6)


def test_softmax_without_entropy_has_no_penalty():
    clock = basis_clock("binary", size=5, n_modules=2, seq_len=5, regularizer="softmax")
    assert clock.penalty().item() == 0.0


def test_spread_init_starts_as_clockwork_hierarchy():
    clock = basis_clock("binary", size=200, n_modules=8, seq_len=200, regularizer="softmax", init_weight=0.8)
    assert clock.periods() == [1, 2, 4, 8, 16, 32, 64, 128]
    weights = clock.weights()
    assert weights[3, 2].item() == pytest.approx(0.8, rel=1e-5)  # period 4 for module 2
    dct = basis_clock("dct", size=101, n_modules=4, seq_len=200, regularizer="softmax")
    assert dct.periods() == pytest.approx([1, 2, 4, 200 / 25])


@pytest.mark.parametrize("init", ["spread", "random", "uniform"])
def test_start_periods_replace_the_start_and_tick_exactly_on_multiples(init):
    """One-hot coefficients (regularizer none) on the given periods: module m's wave is 1 exactly where
    t % p_m == 0 and 0 elsewhere, whatever basis.init says."""
    periods = [2, 3, 5, 12]
    clock = basis_clock("binary", size=30, n_modules=4, seq_len=30, regularizer="none", init=init, start_periods=periods)
    assert clock.periods() == periods
    waves = clock.waves(30)
    for t, (m, p) in itertools.product(range(30), enumerate(periods)):
        assert waves[t, m].item() == (1.0 if t % p == 0 else 0.0), (t, p)
    softmax = basis_clock("binary", size=30, n_modules=4, seq_len=30, regularizer="softmax", start_periods=periods)
    assert [softmax.weights()[p - 1, m].item() for m, p in enumerate(periods)] == pytest.approx([0.8] * 4, rel=1e-5)
    dct = basis_clock("dct", size=16, n_modules=2, seq_len=30, regularizer="softmax", start_periods=[10, 7])
    assert dct.periods() == pytest.approx([10, 30 / 4])  # the nearest columns in log period: k = 3 and 4
    period = period_clock(3, 30, init=init, start_periods=[2.0, 6.0, 24.0])
    assert period.periods() == pytest.approx([2.0, 6.0, 24.0])
    with pytest.raises(ValueError, match="3 start periods for 4 modules"):
        basis_clock("binary", size=30, n_modules=4, seq_len=30, regularizer="none", start_periods=[1, 2, 4])


def test_start_periods_from_the_config_reach_the_model():
    from conftest import compose_config

    from hrnn.config.schema import validate
    from hrnn.models import build_model
    from hrnn.tasks import build_task

    cfg = validate(compose_config(["task=adding", "task.seq_len=40", "basis=binary", "regularizer=none",
                                   "model.hidden_size=8", "model.n_modules=4", "basis.start_periods=[2,4,8,16]"]))
    model = build_model(cfg, build_task(cfg.task, cfg.data_dir, seed=0).spec)
    assert model.backbone.clock.periods() == [2, 4, 8, 16]


def test_cosine_wave_period_is_the_fundamental_of_its_significant_harmonics():
    """A pulse train of period 6 built from harmonics 3 and 2 ticks every 6 steps: wave_periods says 6,
    periods (the dominant component) says a harmonic."""
    steps = 240
    clock = basis_clock("dct", steps // 2 + 1, 4, steps, "softmax")
    logits = torch.full((steps // 2 + 1, 4), -30.0)
    logits[[40, 80, 120], 0] = torch.tensor([2.0, 2.1, 1.5])  # periods 6, 3, 2 (weights ~0.38, 0.42, 0.20)
    logits[12, 1] = 5.0  # one cosine of period 20
    logits[0, 2] = 5.0  # the constant: always active
    logits[[0, 24], 3] = torch.tensor([3.0, 0.0])  # constant with a small period-10 ripple below half its weight
    with torch.no_grad():
        clock.coefficients.copy_(logits)
    assert clock.periods() == [3.0, 20.0, 1.0, 1.0]
    assert clock.wave_periods() == [6.0, 20.0, 1.0, 1.0]
    wave = clock.waves(steps)[:, 0].detach()
    assert torch.allclose(wave[6:], wave[:-6], atol=1e-5)  # the wave repeats every 6 steps ...
    assert not torch.allclose(wave[3:], wave[:-3], atol=1e-2)  # ... and not every 3
    assert float(wave[0]) == pytest.approx(1.0, abs=1e-5) and float(wave[3]) < 0.5  # ticks at multiples of 6


def test_binary_wave_period_is_the_dominant_period_even_for_a_mix():
    """A binary mix of periods 2 and 3 ticks on the union of their ticks, which has no one period:
    the reading is the dominant column's period, here 3 (weight ~0.6 against ~0.4)."""
    clock = basis_clock("binary", 12, 2, 12, "softmax")
    logits = torch.full((12, 2), -30.0)
    logits[[1, 2], 0] = torch.tensor([0.0, math.log(1.5)])  # periods 2 and 3
    logits[4, 1] = 5.0  # period 5 alone
    with torch.no_grad():
        clock.coefficients.copy_(logits)
    wave = clock.waves(12)[:, 0].detach()
    assert [t for t in range(12) if wave[t] > 0.5] == [0, 3, 6, 9]  # the ticks of period 3 carry 0.6 ...
    assert [t for t in range(12) if 0.1 < wave[t] < 0.5] == [2, 4, 8, 10]  # ... period 2's alone 0.4
    assert clock.wave_periods() == [3.0, 5.0]


def test_period_clock_wave_period_is_its_learned_period():
    clock = period_clock(n_modules=3, seq_len=100)
    with torch.no_grad():
        clock.log_period.copy_(torch.tensor([3.0, 7.5, 40.0]).log())
    assert clock.wave_periods() == pytest.approx([3.0, 7.5, 40.0])
    waves = clock.waves(120).detach()
    assert all(torch.allclose(waves[p_int:, m], waves[:-p_int, m], atol=1e-4) for m, p_int in [(0, 3), (2, 40)])


def test_logcos_columns_are_cosines_half_an_octave_apart():
    T = 64
    clock = basis_clock("logcos", size=11, n_modules=2, seq_len=T, regularizer="softmax")
    periods = [1.0] + [2 ** ((j + 1) / 2) for j in range(1, 11)]  # 1 (the constant), 2, 2.83, 4, ..., 64
    assert clock.component_periods.tolist() == pytest.approx(periods)
    t = torch.arange(T, dtype=torch.float64)
    for j, period in enumerate(periods):
        expected = torch.ones(T, dtype=torch.float64) if j == 0 else torch.cos(2 * math.pi * t / period)
        assert torch.allclose(clock.matrix[:, j].double(), expected, atol=1e-6)
    # The spread start is the Clockwork hierarchy on columns that hold it exactly: 1, 2, 4, ...
    assert basis_clock("logcos", 15, 8, 200, "softmax").periods() == pytest.approx([1, 2, 4, 8, 16, 32, 64, 128])


def test_logcos_default_size_is_every_half_octave_up_to_the_length():
    from hrnn.models import default_basis_size
    assert [default_basis_size("logcos", T) for T in (2, 3, 4, 200, 784, 1024)] == [2, 3, 4, 15, 19, 20]


@pytest.mark.parametrize("basis", ["dct", "logcos"])
def test_learned_phase_shifts_the_wave_by_that_many_steps(basis):
    """cos(2 pi f (t - s)): a shift of s steps is the unshifted wave s steps later; a zero shift changes nothing."""
    torch.manual_seed(0)
    T = 48
    size = T // 2 + 1 if basis == "dct" else 11
    plain = basis_clock(basis, size, 3, T, "softmax", init="random")
    shifted = basis_clock(basis, size, 3, T, "softmax", init="random", learn_phase=True)
    with torch.no_grad():
        shifted.coefficients.copy_(plain.coefficients)
    assert torch.allclose(shifted.waves(T), plain.waves(T), atol=1e-6)  # a phase starts at 0
    with torch.no_grad():
        shifted.phase.copy_(torch.tensor([0.0, 5.0, 13.0]))
    reference = plain.waves(2 * T)  # the unshifted wave on a longer axis, read s steps back
    waves = shifted.waves(2 * T)
    for module, s in enumerate([0, 5, 13]):
        assert torch.allclose(waves[s:, module], reference[: 2 * T - s, module], atol=1e-5)
    assert shifted.phases() == [0.0, 5.0, 13.0] and plain.phases() is None


def test_learned_phase_gets_a_gradient_that_gradcheck_confirms_float64():
    torch.manual_seed(0)
    T = 12
    clock = basis_clock("logcos", 6, 2, T, "softmax", init="random", learn_phase=True).double()
    with torch.no_grad():
        clock.phase.copy_(torch.tensor([0.3, 1.7], dtype=torch.float64))
    coefficients, phase = clock.coefficients.detach().clone(), clock.phase.detach().clone()
    del clock.coefficients, clock.phase

    def waves(c, p):
        clock.coefficients, clock.phase = c, p
        return clock.waves(T)

    assert torch.autograd.gradcheck(waves, (coefficients.requires_grad_(), phase.requires_grad_()))
    waves(coefficients, phase).sum().backward()
    assert phase.grad.abs().min() > 0


def test_a_frozen_clock_freezes_its_phase_too():
    from omegaconf import OmegaConf

    from hrnn.train.optim import build_optimizer
    clock = basis_clock("dct", 13, 2, 24, "softmax", learn_phase=True)
    model = ClockedRNN(1, 4, clock, connectivity="full")
    settings = OmegaConf.create({"name": "adam", "lr": 1e-3, "clock_lr": 0, "connectivity_lr": None, "weight_decay": 0.0})
    optimizer = build_optimizer(settings, model)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(clock.phase) not in trained and id(clock.coefficients) not in trained
    assert not clock.phase.requires_grad


def test_a_binary_clock_refuses_a_phase():
    with pytest.raises(ValueError, match="cosine basis"):
        basis_clock("binary", 8, 2, 8, "softmax", learn_phase=True)
