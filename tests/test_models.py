"""Every model and clock variant trains a step on every task, through the real builders."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import compose_config, load_script
from hrnn.config.schema import validate
from hrnn.models import build_model, count_parameters
from hrnn.errors import UserError
from hrnn.train.environment import seed_everything
from hrnn.train.loop import train
from hrnn.train.optim import build_optimizer, lr_factor
from hrnn.tasks import build_task
from hrnn.tasks.mnist import save_mnist

TASK_OVERRIDES = {
    "copy": ["task=copy", "task.seq_len=6", "task.n_val=4", "task.n_test=4"],
    "adding": ["task=adding", "task.seq_len=12", "task.n_val=4", "task.n_test=4"],
    "timescales": ["task=timescales", "task.seq_len=12", "task.periods=[2,3]", "task.n_val=4", "task.n_test=4"],
    "smnist": ["task=smnist"],
    "pmnist": ["task=pmnist"],
}
CLOCKS = [["model=hrnn", f"basis={b}", f"regularizer={r}"] for b in ("binary", "dct") for r in ("softmax", "l1", "none")]
MODELS = CLOCKS + [["model=hrnn", "basis=period"], ["model=hrnn", "model.connectivity=slow_to_fast"],
                   ["model=cwrnn"], ["model=lstm"], ["model=gru"], ["model=rnn"]]


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    path = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    split = lambda n: (rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64))
    save_mnist(path, {"train": split(8), "val": split(4), "test": split(4)})
    return path


@pytest.mark.parametrize("task", list(TASK_OVERRIDES))
@pytest.mark.parametrize("model", MODELS, ids=lambda m: " ".join(a.split("=")[1] for a in m))
def test_every_model_trains_a_step_on_every_task(task, model, fake_mnist):
    cfg = validate(compose_config([*TASK_OVERRIDES[task], *model, "model.hidden_size=8", "model.n_modules=2",
                                   f"data_dir={fake_mnist}"]))
    torch.manual_seed(0)
    task_obj = build_task(cfg.task, cfg.data_dir, seed=0)
    net = build_model(cfg, task_obj.spec)
    optimizer = build_optimizer(cfg.optim, net)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = task_obj.train_batch(3)
    output = net(x)
    loss = task_obj.loss(output, y) + net.penalty()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, net.parameters())]
    assert sum(changed) >= len(changed) - 1  # everything that the loss reaches moves
    assert count_parameters(net) > 0
    if net.clock is not None:
        assert len(net.clock.periods()) == 2


def test_clock_coefficients_receive_gradient_from_the_task_loss():
    cfg = validate(compose_config([*TASK_OVERRIDES["adding"], "basis=dct", "model.hidden_size=8", "model.n_modules=2"]))
    task = build_task(cfg.task, cfg.data_dir, seed=0)
    net = build_model(cfg, task.spec)
    x, y = task.train_batch(4)
    task.loss(net(x), y).backward()
    assert net.clock.coefficients.grad.abs().sum() > 0


@pytest.mark.parametrize("basis", ["dct", "period"])
def test_clock_lr_zero_freezes_the_clock_at_its_start(tmp_path, basis):
    """Random starting periods (drawn from the model stream) stay bit-identical while the weights train."""
    cfg = compose_config([*TASK_OVERRIDES["adding"], f"basis={basis}", "basis.init=random", "optim.clock_lr=0",
                          "model.hidden_size=8", "model.n_modules=2", "trainer.steps=5", "trainer.eval_every=5",
                          "trainer.progress=false", "trainer.batch_size=4"])
    train(cfg, tmp_path)
    seed_everything(cfg.trainer.seed)  # the start, rebuilt as set_up builds it
    start = build_model(validate(cfg), build_task(cfg.task, cfg.data_dir, cfg.trainer.seed).spec).state_dict()
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    clock_keys = [key for key in start if key.startswith("backbone.clock.")]
    assert clock_keys and all(torch.equal(state["model"][key], start[key]) for key in clock_keys)
    assert not torch.equal(state["model"]["backbone.recurrent"], start["backbone.recurrent"])
    assert len(state["optimizer"]["param_groups"]) == 1  # no group, so no Adam state, for the clock
    assert len(state["optimizer"]["state"]) == len(start) - len(clock_keys)


@pytest.mark.parametrize("clock_lr,expected", [("null", 0.001), ("0.05", 0.05)])
def test_clock_lr_null_is_the_weights_rate(clock_lr, expected):
    cfg = validate(compose_config([*TASK_OVERRIDES["adding"], f"optim.clock_lr={clock_lr}", "optim.lr=0.001",
                                   "model.hidden_size=8", "model.n_modules=2"]))
    net = build_model(cfg, build_task(cfg.task, cfg.data_dir, seed=0).spec)
    groups = build_optimizer(cfg.optim, net).param_groups
    assert [group["lr"] for group in groups] == [0.001, expected]
    assert groups[1]["params"] == [net.clock.coefficients]


def test_final_metrics_are_the_best_checkpoint_scored_on_the_whole_sets(tmp_path):
    """metrics.json's val and test MSE (and train's return value, the val MSE a sweeper optimises),
    recomputed here from best.pt on the full sets in one batch; best.pt is the evaluation with the
    lowest validation MSE in the history."""
    cfg = compose_config([*TASK_OVERRIDES["adding"], "task.n_val=30", "task.n_test=20", "model.hidden_size=8",
                          "model.n_modules=2", "trainer.steps=6", "trainer.eval_every=2", "trainer.eval_batch_size=7",
                          "trainer.progress=false", "trainer.batch_size=4", "optim.lr=0.05"])
    value = train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    history = {entry["step"]: entry["val_mse"] for entry in metrics["history"]}
    assert metrics["best_step"] == min(history, key=history.get) and len(set(history.values())) == 3
    walls = [entry["wall_s"] for entry in metrics["history"]]  # time to each evaluation, for "wall to threshold"
    assert 0 < walls[0] < walls[1] < walls[2] <= metrics["wall_s"]
    task = build_task(cfg.task, cfg.data_dir, seed=0)
    net = build_model(validate(cfg), task.spec)
    net.load_state_dict(torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["model"])
    mse = {}
    with torch.no_grad():
        for split, n in (("val", 30), ("test", 20)):
            x, y = next(task.eval_batches(split, n))
            assert len(x) == n
            mse[split] = torch.nn.functional.mse_loss(net(x), y).item()
    assert metrics["val_metric"] == pytest.approx(mse["val"], rel=1e-5) and value == pytest.approx(mse["val"], rel=1e-5)
    assert metrics["test_metric"] == pytest.approx(mse["test"], rel=1e-5)


def test_timescales_run_reports_recovered_periods(tmp_path):
    cfg = compose_config(["task=timescales", "task.seq_len=24", "task.periods=[4,3]", "task.n_val=4", "task.n_test=4",
                          "basis=binary", "model.hidden_size=8", "model.n_modules=4", "trainer.steps=1",
                          "trainer.progress=false", "trainer.batch_size=2"])
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["periods"] == [1.0, 2.0, 4.0, 8.0]  # the spread start, one step in
    assert metrics["true_periods"] == [4, 3] and metrics["recovered_periods"] == [4] and metrics["recovered"] == 1
    assert metrics["wave_periods"] == [1.0, 2.0, 4.0, 8.0] and metrics["recovered_wave"] == 1


def test_timescales_cosine_run_stores_wave_periods_and_results_reads_them_back(tmp_path):
    """The results study's wave recovery, read from metrics.json and recomputed from best.pt, agree."""
    from omegaconf import OmegaConf

    from hrnn.tasks.synthetic import recovered_periods

    cfg = compose_config(["task=timescales", "task.seq_len=24", "task.periods=[4,6]", "task.n_val=4", "task.n_test=4",
                          "basis=dct", "model.hidden_size=8", "model.n_modules=4", "trainer.steps=2",
                          "trainer.eval_every=1", "trainer.progress=false", "trainer.batch_size=2"])
    train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["wave_periods"]) == 4 and all(24 % p == 0 for p in metrics["wave_periods"])
    assert metrics["recovered_wave"] == len(recovered_periods([4, 6], metrics["wave_periods"]))
    assert all("wave_periods" in entry and "recovered_wave" in entry for entry in metrics["history"])
    job = {"dir": str(tmp_path), "config": OmegaConf.to_container(cfg), "metrics": dict(metrics)}
    wave_recovered = load_script("results", "study").wave_recovered
    assert wave_recovered(job) == metrics["recovered_wave"]
    del job["metrics"]["recovered_wave"]  # a run from before the field: recomputed from the checkpoint
    assert wave_recovered(job) == metrics["recovered_wave"]


@pytest.mark.parametrize("name", ["cwrnn", "hrnn", "lstm"])
def test_last_readout_asks_for_the_last_state_only(name):
    """readout "last" gets backbone(x, last_only=True): the same output and gradients as the
    head on backbone(x)[:, -1]."""
    from hrnn.models.clock import FixedClock
    from hrnn.models.recurrent import ClockedRNN, SequenceModel, TorchRNN

    torch.manual_seed(0)
    if name == "lstm":
        backbone = TorchRNN("lstm", 3, 16)
    else:
        clock = FixedClock([1, 2, 4, 8])
        backbone = ClockedRNN(3, 16, clock, "slow_to_fast" if name == "cwrnn" else "full")
    model = SequenceModel(backbone, 16, 5, "last")
    x = torch.randn(4, 11, 3)
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    want = model.head(model.backbone(x)[:, -1])
    want_grads = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    assert out.shape == (4, 5)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_scales_every_group_by_its_definition(tmp_path, schedule):
    """After step s the optimizer holds base * (1 + cos(pi (s - 1) / steps)) / 2 for cosine, base for
    constant, in the weights' group and the clock's; checkpoints store the base rates."""
    steps = 6
    cfg = compose_config([*TASK_OVERRIDES["adding"], f"optim.schedule={schedule}", "optim.lr=0.002",
                          "optim.clock_lr=0.02", "model.hidden_size=8", "model.n_modules=2",
                          f"trainer.steps={steps}", "trainer.eval_every=3", "trainer.progress=false",
                          "trainer.batch_size=4"])
    train(cfg, tmp_path)
    groups = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    factor = (1 + math.cos(math.pi * (steps - 1) / steps)) / 2 if schedule == "cosine" else 1.0
    assert [g["base_lr"] for g in groups] == [0.002, 0.02]
    assert [g["lr"] for g in groups] == pytest.approx([0.002 * factor, 0.02 * factor], rel=1e-12)
    assert lr_factor(schedule, 1, steps) == 1.0
    if schedule == "cosine":
        assert lr_factor(schedule, steps // 2 + 1, steps) == pytest.approx(0.5)
        assert 0 < lr_factor(schedule, steps, steps) < 0.1


def test_an_unknown_lr_schedule_is_one_line_naming_the_allowed():
    with pytest.raises(UserError, match=r"optim.schedule='linear' is not allowed; allowed: constant, cosine"):
        validate(compose_config([*TASK_OVERRIDES["adding"], "optim.schedule=linear"]))
