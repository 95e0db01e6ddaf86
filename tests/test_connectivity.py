"""Learned connectivity (gated W_h blocks) and slow_to_fast ordered by the clock's learned periods."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import functional_call

from conftest import compose_config
from hrnn.config.schema import validate
from hrnn.ops import leaky_rnn_reference
from hrnn.models import build_model
from hrnn.models.clock import BasisClock, FixedClock
from hrnn.models.recurrent import ClockedRNN, ConnectivityGates, expand_blocks, slow_to_fast_modules
from hrnn.train.optim import build_optimizer
from hrnn.tasks import build_task

M, UNITS = 4, 2
H = M * UNITS


def gated_model(logits: torch.Tensor, weight: float = 0.1, threshold: float = 0.5) -> ClockedRNN:
    torch.manual_seed(0)
    gates = ConnectivityGates(M, init_logit=0.0, weight=weight, threshold=threshold)
    model = ClockedRNN(3, H, FixedClock([1, 1, 2, 3]), "learned", gates=gates).double()
    with torch.no_grad():
        model.gates.logits.copy_(logits)
    return model


LOGITS = torch.tensor([[2.0, -1.0, 0.5, -3.0], [-0.2, 1.0, 0.1, 4.0], [1.5, -2.0, -0.4, 0.3], [0.0, 0.2, -1.2, 3.0]],
                      dtype=torch.float64)  # sigmoid below 0.5 exactly where the logit is negative


def test_gradients_reach_the_gate_logits_gradcheck_and_match_the_definition():
    model = gated_model(LOGITS)
    x, h0 = torch.randn(2, 7, 3, dtype=torch.float64), torch.randn(2, H, dtype=torch.float64)
    waves = model.clock.waves(7).double()

    def through_model(logits, recurrent):
        return functional_call(model, {"gates.logits": logits, "recurrent": recurrent}, (x, h0))

    def definition(logits, recurrent):  # W_h * (sigmoid(L) repeated over each block), then the plain loop
        w_h = recurrent * torch.kron(torch.sigmoid(logits), torch.ones(UNITS, UNITS, dtype=torch.float64))
        return leaky_rnn_reference(x, model.input.weight, model.input.bias, w_h, waves, h0)

    leaves = (LOGITS.clone().requires_grad_(), model.recurrent.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(through_model, leaves)
    weights = torch.randn(2, 7, H, dtype=torch.float64)
    got = torch.autograd.grad((through_model(*leaves) * weights).sum(), leaves)
    want = torch.autograd.grad((definition(*leaves) * weights).sum(), leaves)
    assert got[0].abs().min() > 0  # every gate gets a gradient
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_penalty_is_weight_times_mean_gate_and_its_gradient():
    model = gated_model(LOGITS, weight=0.3)
    gates = torch.sigmoid(LOGITS)
    penalty = model.penalty()
    assert penalty.item() == pytest.approx(0.3 * gates.sum().item() / M**2, rel=1e-12)
    penalty.backward()
    torch.testing.assert_close(model.gates.logits.grad, 0.3 / M**2 * gates * (1 - gates))


def test_evaluation_zeroes_exactly_the_blocks_below_threshold():
    model = gated_model(LOGITS)
    soft = torch.sigmoid(LOGITS)
    assert torch.equal(model.recurrent_weight(), model.recurrent * expand_blocks(soft, H))  # training: soft gates
    model.eval()
    weight = model.recurrent_weight().detach()
    for i, j in itertools.product(range(M), range(M)):
        block = weight[UNITS * i:UNITS * (i + 1), UNITS * j:UNITS * (j + 1)]
        full = model.recurrent.detach()[UNITS * i:UNITS * (i + 1), UNITS * j:UNITS * (j + 1)]
        if LOGITS[i, j] < 0:
            assert torch.equal(block, torch.zeros_like(block)), (i, j)
        else:
            assert torch.equal(block, full * soft[i, j]), (i, j)
    # Behaviour: module 0 does not read module 1 (gate 0.27) in evaluation, and does in training.
    x, h0 = torch.randn(2, 1, 3, dtype=torch.float64), torch.randn(2, H, dtype=torch.float64)
    moved = h0.clone()
    moved[:, UNITS:2 * UNITS] += 1.0
    assert torch.equal(model(x, moved)[:, 0, :UNITS], model(x, h0)[:, 0, :UNITS])
    model.train()
    assert not torch.allclose(model(x, moved)[:, 0, :UNITS], model(x, h0)[:, 0, :UNITS])
    assert torch.equal(model.connectivity(), soft)  # what the runner logs: the soft gates


def one_hot_clock(periods: list[int], steps: int = 16) -> BasisClock:
    clock = BasisClock("binary", size=steps, n_modules=len(periods), seq_len=steps, regularizer="none", init="uniform",
                       init_weight=0.8, sharpness=1.0, learn_phase=False, start_periods=None)
    set_periods(clock, periods)
    return clock


def set_periods(clock: BasisClock, periods: list[int]) -> None:
    with torch.no_grad():
        clock.coefficients.zero_()
        for m, p in enumerate(periods):
            clock.coefficients[p - 1, m] = 1.0


def test_slow_to_fast_follows_the_learned_periods_each_forward():
    """A module reads only modules at least as slow as itself, by the clock's current periods."""
    torch.manual_seed(0)
    model = ClockedRNN(3, H, one_hot_clock([8, 1, 4, 2]), "slow_to_fast")
    assert torch.equal(model.recurrent != 0, expand_blocks(model.connectivity(), H).bool())  # masked at the start
    for periods in ([8, 1, 4, 2], [1, 8, 2, 4]):  # the second: as if training had reordered them
        set_periods(model.clock, periods)
        with torch.no_grad():  # dense weights, so that every block the mask lets through is nonzero
            model.recurrent.copy_(torch.randn(H, H))
        assert model.clock.periods() == periods
        modules = model.connectivity()
        for i, j in itertools.product(range(M), range(M)):
            assert modules[i, j] == float(periods[j] >= periods[i]), (periods, i, j)
        assert torch.equal(model.recurrent_weight() != 0, expand_blocks(modules, H).bool())
        # Perturb the fastest module: only it changes. Perturb the slowest: every module reads it.
        x, h0 = torch.randn(2, 1, 3), torch.randn(2, H)
        base = model(x, h0).detach()
        for module, readers in ((periods.index(1), {periods.index(1)}), (periods.index(8), set(range(M)))):
            moved = h0.clone()
            moved[:, UNITS * module:UNITS * (module + 1)] += 1.0
            after = model(x, moved).detach()
            changed = {m for m in range(M)
                       if not torch.equal(after[:, 0, UNITS * m:UNITS * (m + 1)], base[:, 0, UNITS * m:UNITS * (m + 1)])}
            assert changed == readers, (periods, module)


def test_slow_to_fast_ties_are_ordered_by_index_keeping_the_clockwork_block_count():
    modules = slow_to_fast_modules([2.0, 2.0, 1.0])
    # Order: module 2 (period 1), then 0, then 1: module 0 reads 1, module 1 does not read 0.
    assert modules.tolist() == [[1, 1, 0], [0, 1, 0], [1, 1, 1]]
    assert modules.sum() == 3 * 4 / 2
    assert torch.equal(slow_to_fast_modules([0.0, 1.0, 2.0, 3.0]), torch.ones(4, 4).triu())  # index order


def test_connectivity_logits_train_at_their_own_rate():
    """optim.connectivity_lr puts the block-gate logits in a group of their own (null: optim.lr),
    apart from the weights and the clock; without learned connectivity there is no such group."""
    common = ["task=adding", "model.hidden_size=8", "model.n_modules=2", "optim.lr=0.001", "optim.clock_lr=0.02"]
    cfg = validate(compose_config([*common, "model.connectivity=learned", "optim.connectivity_lr=0.05"]))
    net = build_model(cfg, build_task(cfg.task, cfg.data_dir, seed=0).spec)
    groups = build_optimizer(cfg.optim, net).param_groups
    assert [g["lr"] for g in groups] == [0.001, 0.02, 0.05]
    assert groups[2]["params"] == [net.connectivity_logits]
    assert all(p is not net.connectivity_logits for g in groups[:2] for p in g["params"])
    cfg = validate(compose_config([*common, "model.connectivity=learned", "optim.connectivity_lr=null"]))
    assert [g["lr"] for g in build_optimizer(cfg.optim, build_model(cfg, build_task(cfg.task, cfg.data_dir, seed=0).spec)).param_groups] == [0.001, 0.02, 0.001]
    cfg = validate(compose_config(common))
    assert len(build_optimizer(cfg.optim, build_model(cfg, build_task(cfg.task, cfg.data_dir, seed=0).spec)).param_groups) == 2
