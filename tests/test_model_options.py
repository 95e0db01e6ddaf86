"""Learned connectivity and event activation from the config: every task, the CLI, validation, logging."""
from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, compose_config, read_metrics, run_cli
from hrnn.config.schema import validate
from hrnn.errors import UserError
from hrnn.models import build_model
from hrnn.models.recurrent import EventGate
from hrnn.train.loop import train
from hrnn.train.optim import build_optimizer
from hrnn.tasks import build_task
from test_models import TASK_OVERRIDES, fake_mnist  # noqa: F401  (a fixture)

OPTIONS = [["model.connectivity=learned"], ["model.activation=event", "model.gate=hard"],
           ["model.activation=clock_event", "model.gate=stochastic", "model.connectivity=slow_to_fast"],
           ["model.activation=event", "model.gate=soft", "model.connectivity=learned"],
           ["model.activation=chunker", "model.gate=hard", "model.connectivity=slow_to_fast"],
           ["model.activation=event", "model.gate=annealed"]]


@pytest.mark.parametrize("task", list(TASK_OVERRIDES))
@pytest.mark.parametrize("options", OPTIONS, ids=" ".join)
def test_every_option_trains_a_step_on_every_task(task, options, fake_mnist):  # noqa: F811
    # gate_bias 1: gates start open, so one step reaches every weight; at the default -3 a hard gate
    # starts shut and only the gate itself gets a gradient (docs/models.md).
    cfg = validate(compose_config([*TASK_OVERRIDES[task], *options, "model.hidden_size=8", "model.n_modules=2",
                                   "model.gate_bias=1.0", f"data_dir={fake_mnist}"]))
    torch.manual_seed(0)
    task_obj = build_task(cfg.task, cfg.data_dir, seed=0)
    net = build_model(cfg, task_obj.spec)
    optimizer = build_optimizer(cfg.optim, net)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    x, y = task_obj.train_batch(3)
    loss = task_obj.loss(net(x), y) + net.penalty()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    unchanged = [name for name, p in net.named_parameters() if torch.equal(before[name], p.detach())]
    assert unchanged == [], unchanged  # the gates and logits learn from the first step
    assert (net.clock is None) == (cfg.model.activation in ("event", "chunker"))


@pytest.mark.parametrize("task,options", [("adding", ["model.connectivity=learned"]), ("adding", ["model.activation=event"]),
                                          ("copy", ["model.activation=clock_event"]), ("adding", ["model.activation=chunker"])])
def test_cli_trains_and_logs_connectivity_and_update_fraction(tmp_path, task, options):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, f"task={task}", "task.seq_len=10", *options, "trainer.steps=4", "trainer.eval_every=2",
                      "trainer.num_threads=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    metrics = read_metrics(run_dir)
    if "model.activation=chunker" in options:  # no fused core: the header and metrics.json do not claim one
        assert metrics["cpu_kernels"] == "pytorch loop" and "(recurrence: pytorch loop)" in result.stdout
    assert [entry["step"] for entry in metrics["history"]] == [2, 4]
    assert all(0 <= entry["val_update_fraction"] <= 1 for entry in metrics["history"])
    assert 0 <= metrics["test"]["update_fraction"] <= 1
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/update_fraction")] == [2, 4]
    if "model.connectivity=learned" in options:
        assert [e.step for e in events.Images("model/connectivity")] == [2, 4]
        matrices = [entry["connectivity"] for entry in metrics["history"]] + [metrics["connectivity"]]
        assert all(len(m) == 4 and all(len(row) == 4 and all(0 < g < 1 for g in row) for row in m) for m in matrices)
        best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)["model"]
        torch.testing.assert_close(torch.tensor(metrics["connectivity"]),
                                   torch.sigmoid(best["backbone.gates.logits"]), rtol=0, atol=1e-7)
    else:
        assert "connectivity" not in metrics and "model/connectivity" not in events.Tags()["images"]


def test_in_process_learned_connectivity_history_follows_the_checkpoints(tmp_path):
    cfg = compose_config([*TINY, "task.seq_len=8", "model.connectivity=learned", "model.connectivity_weight=100",
                          "trainer.steps=3", "trainer.eval_every=1"])
    train(cfg, tmp_path)
    history = read_metrics(tmp_path)["history"]
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["model"]["backbone.gates.logits"]
    torch.testing.assert_close(torch.tensor(history[-1]["connectivity"]), torch.sigmoid(last), rtol=0, atol=1e-7)
    means = [torch.tensor(entry["connectivity"]).mean().item() for entry in history]
    assert means[0] > means[1] > means[2]  # a penalty this strong outweighs the task: it closes the gates


BAD = [
    (["model.activation=sometimes"], "model.activation='sometimes' is not allowed; allowed: clock, event, clock_event, chunker"),
    (["model.gate=maybe"], "model.gate='maybe' is not allowed; allowed: hard, stochastic, soft, annealed, truncated"),
    (["model.gate_slope=0.5"], "model.gate_slope=0.5 must be at least 1"),
    (["model.activation=chunker", "model.gate=annealed"], "model.gate=annealed is for activation=event or clock_event"),
    (["model.gate_hard_from=1.5"], "model.gate_hard_from=1.5 must be in [0, 1]: the fraction of training after which"),
    (["model.gate_threshold=1.5"], "model.gate_threshold=1.5 must be in (0, 1): it is compared with a sigmoid"),
    (["model.connectivity_threshold=0"], "model.connectivity_threshold=0.0 must be in (0, 1): it is compared with a sigmoid"),
    (["model.update_weight=-1"], "model.update_weight=-1.0 must be non-negative"),
    (["model.connectivity_weight=-0.1"], "model.connectivity_weight=-0.1 must be non-negative"),
    (["model.gate_bias=closed"], "bad value 'closed' for model.gate_bias"),
    (["model.chunker_threshold=0"], "model.chunker_threshold=0.0 must be positive"),
    (["model.activation=chunker", "model.n_modules=1"], "model.n_modules=1 is too few for activation=chunker"),
    (["model.gate=truncated", "model.gate_threshold_warmup=2"], "model.gate_threshold_warmup=2.0 must be in [0, 1]"),
    (["model.gate_threshold_warmup=0.5"], "model.gate_threshold_warmup=0.5 is for model.gate=truncated with activation=event "
                                          "or clock_event (here gate=soft, activation=clock_event)"),
    (["model.gate=truncated", "model.gate_threshold=0.3", "model.gate_support=0.4"],
     "model.gate_support=0.4 must be in [0, model.gate_threshold=0.3]"),
    (["model.gate_support=0.1"], "model.gate_support=0.1 is for model.gate=truncated with activation=event "
                                 "or clock_event (here gate=soft, activation=clock_event)"),
    (["model.gate=truncated", "model.gate_open_target=1"], "model.gate_open_target=1.0 must be in [0, 1)"),
    (["model.gate_open_target=0.1"], "model.gate_open_target=0.1 is for model.gate=truncated with activation=event "
                                     "or clock_event (here gate=soft, activation=clock_event)"),
    (["model.gate=truncated", "model.gate_open_target=0.1", "model.gate_open_rate=0"],
     "model.gate_open_rate=0.0 must be positive"),
    (["model.gate=truncated", "model.gate_open_per_module=true"],
     "model.gate_open_per_module=true is for a truncated gate with model.gate_open_target > 0 (here 0.0)"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[o[0] for o, _ in BAD])
def test_bad_option_is_one_clear_line(overrides, message):
    with pytest.raises(UserError) as caught:
        validate(compose_config(overrides))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_event_activation_ignores_the_clock_settings_and_the_cli_reports_one_line(tmp_path):
    validate(compose_config(["model.activation=event", "basis.size=100000"]))  # no clock: its size is not read
    with pytest.raises(UserError, match="basis.size=100000 exceeds"):
        validate(compose_config(["model.activation=clock_event", "basis.size=100000"]))
    result = run_cli(["model.gate=maybe"], cwd=tmp_path, check=False, timeout=60)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [f"error: {BAD[1][1]}"]


def test_annealed_gate_trains_on_the_slope_the_runner_sets_and_evaluates_hard(tmp_path):
    """The runner tells the model its progress before each step: at the last step of 4 the slope is
    gate_slope (1 + (slope - 1) * 4/4); the checkpointed model then evaluates with 0/1 activations."""
    cfg = compose_config([*TINY, "task.seq_len=8", "model.activation=event", "model.gate=annealed",
                          "model.gate_slope=9", "trainer.steps=4", "trainer.eval_every=2"])
    seen = []
    original = EventGate.set_progress
    def spy(self, fraction):
        original(self, fraction)
        seen.append(self.slope)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EventGate, "set_progress", spy)
        train(cfg, tmp_path)
    assert seen == pytest.approx([1 + 8 * k / 4 for k in (1, 2, 3, 4)])
    history = read_metrics(tmp_path)["history"]
    assert all(0 <= entry["val_update_fraction"] <= 1 for entry in history)


def test_a_learned_phase_on_the_coarse_basis_trains_and_is_reported(tmp_path):
    """basis=logcos basis.learn_phase=true through the runner: the shifts move from 0 and metrics.json holds them."""
    run_dir = tmp_path / "run"
    train(compose_config(["task=timescales", "task.periods=[2,6]", "task.seq_len=24", "basis=logcos",
                          "basis.learn_phase=true", "model.activation=clock", "trainer.steps=3",
                          "trainer.eval_every=3", *TINY]), run_dir)
    metrics = read_metrics(run_dir)
    assert metrics["basis"] == "logcos" and len(metrics["phases"]) == 4
    assert any(shift != 0 for shift in metrics["phases"])
    assert len(metrics["periods"]) == 4 and set(metrics["periods"]) <= {1.0, *(2 ** ((j + 1) / 2) for j in range(1, 8))}


def test_the_truncated_threshold_warms_up_from_zero_in_training_and_evaluates_at_its_value():
    gate = EventGate(2, 8, 2, "truncated", bias=-0.5, threshold=0.3, update_weight=0.1, slope=1.0, threshold_warmup=0.5)
    like = torch.zeros(1)
    seen = []
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        gate.set_progress(fraction)
        seen.append(gate.thresholds(1, 1, 2, like))
    assert seen == pytest.approx([0.0, 0.15, 0.3, 0.3, 0.3])
    gate.set_progress(0.25)
    gate.eval()
    assert gate.thresholds(1, 1, 2, like) == 0.3  # a checkpoint evaluates the same wherever it is read


def test_at_the_start_of_its_warm_up_the_truncated_gate_trains_as_the_soft_gate():
    """Threshold 0: every gate is open (g > 0), so values and gradients are the soft gate's."""
    nets, grads = [], []
    for gate in (["model.gate=truncated", "model.gate_threshold_warmup=0.5"], ["model.gate=soft"]):
        cfg = validate(compose_config(["task=adding", "task.seq_len=30", "model.activation=event", *gate, *TINY]))
        torch.manual_seed(0)
        task = build_task(cfg.task, cfg.data_dir, seed=0)
        net = build_model(cfg, task.spec)
        net.set_progress(0.0)
        x, y = task.train_batch(4)
        output = net(x)
        (task.loss(output, y) + net.penalty()).backward()
        nets.append(output.detach())
        grads.append({name: p.grad.clone() for name, p in net.named_parameters()})
    torch.testing.assert_close(nets[0], nets[1], rtol=1e-6, atol=1e-7)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_open_fraction_counts_the_updates_a_kernel_computes():
    """update_fraction is the mean activation; open_fraction the share of (sample, step, module) with a > 0.
    A truncated gate's open activations all exceed its threshold, so open <= update / threshold; a soft gate's is 1."""
    fractions = {}
    for gate in ("truncated", "soft"):
        cfg = validate(compose_config(["task=adding", "task.seq_len=40", "model.activation=event", f"model.gate={gate}",
                                       "model.gate_threshold=0.3", "model.gate_bias=-0.8", *TINY]))
        torch.manual_seed(0)
        task = build_task(cfg.task, cfg.data_dir, seed=0)
        net = build_model(cfg, task.spec).eval()
        x, _ = task.train_batch(16)
        with torch.no_grad():
            net(x)
        a = net.backbone.activations
        stats = net.statistics()
        assert stats["update_fraction"] == pytest.approx(float(a.mean()))
        assert stats["open_fraction"] == pytest.approx(float((a > 0).float().mean()))
        fractions[gate] = stats
    truncated = fractions["truncated"]
    assert 0 < truncated["open_fraction"] < 1 and truncated["open_fraction"] <= truncated["update_fraction"] / 0.3
    assert fractions["soft"]["open_fraction"] == 1.0


@pytest.mark.parametrize("per_module", [False, True])
def test_the_threshold_moves_by_the_rate_times_the_open_share_minus_the_target(per_module):
    """One training pass: tau' = tau + rate (the share of (b, t, m) with a > 0 - target), one share over all
    modules, or per module each module's own (mean over (b, t) of 1[a_btm > 0]); evaluation and passes
    without a gradient leave the thresholds as they are and read them."""
    cfg = validate(compose_config(["task=adding", "task.seq_len=20", "model.activation=event", "model.gate=truncated",
                                   "model.gate_bias=0", "model.gate_threshold=0.5", "model.gate_open_target=0.2",
                                   "model.gate_open_rate=0.1", f"model.gate_open_per_module={per_module}", *TINY]))
    torch.manual_seed(0)
    task = build_task(cfg.task, cfg.data_dir, seed=0)
    backbone = build_model(cfg, task.spec).backbone
    gate = backbone.event
    x, _ = task.train_batch(6)
    before = gate.module_thresholds.clone()
    backbone(x)
    opened = (backbone.activations > 0).float()
    assert 0 < opened.mean(dim=(0, 1)).min() and opened.mean(dim=(0, 1)).max() < 1  # some open, some shut in each
    open_share = opened.mean(dim=(0, 1)) if per_module else opened.mean().expand(4)
    torch.testing.assert_close(gate.module_thresholds, before + 0.1 * (open_share - 0.2))
    assert (len(set(gate.module_thresholds.tolist())) > 1) == per_module
    moved = gate.module_thresholds.clone()
    with torch.no_grad():
        backbone(x)
    backbone.eval()
    backbone(x)
    torch.testing.assert_close(gate.module_thresholds, moved)
    with torch.no_grad():
        first_gates = torch.sigmoid(gate.input(x[:, 0]))  # step 0: h0 = 0, so g = sigmoid(W_g x_0 + b_g)
    assert torch.equal(backbone.activations[:, 0] > 0, first_gates > moved)  # each module at its own threshold


@pytest.mark.parametrize("per_module", [False, True])
def test_the_thresholds_settle_where_the_open_share_is_the_target(per_module):
    """Training passes over one batch without an optimizer step: the threshold climbs from 0.05 (nearly
    every gate open) until about the target share of the updates is open (per module: of each module's),
    and stays there."""
    cfg = validate(compose_config(["task=adding", "task.seq_len=30", "model.activation=event", "model.gate=truncated",
                                   "model.gate_threshold=0.05", "model.gate_open_target=0.1",
                                   "model.gate_open_rate=0.02", f"model.gate_open_per_module={per_module}", *TINY]))
    torch.manual_seed(0)
    task = build_task(cfg.task, cfg.data_dir, seed=0)
    backbone = build_model(cfg, task.spec).backbone
    with torch.no_grad():  # gates spread over (0, 1), so that a threshold meets them one by one
        backbone.event.input.weight.normal_(0.0, 2.0)
        backbone.event.input.bias.zero_()
    x, _ = task.train_batch(32)
    shares = []
    for _ in range(400):
        backbone(x)
        shares.append((backbone.activations > 0).float().mean(dim=(0, 1)))
    assert float(shares[0].min()) > 0.8
    late = torch.stack(shares[-100:])
    if not per_module:  # one share over the modules; each module's may differ
        late = late.mean(dim=1, keepdim=True)
    torch.testing.assert_close(late.mean(dim=0), torch.full((late.shape[1],), 0.1), atol=0.02, rtol=0)
    assert float((late - 0.1).abs().max()) < 0.05


def test_with_a_warm_up_the_open_target_falls_from_one_and_then_holds():
    gate = EventGate(2, 8, 2, "truncated", bias=-0.5, threshold=0.3, update_weight=0.0, slope=1.0,
                     threshold_warmup=0.5, open_target=0.1, open_rate=0.01)
    seen = []
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        gate.set_progress(fraction)
        seen.append(gate.current_open_target())
    assert seen == pytest.approx([1.0, 0.55, 0.1, 0.1, 0.1])
    assert gate.thresholds(1, 1, 2, torch.zeros(1)) is gate.module_thresholds  # the warm-up moves the target only


def test_the_module_thresholds_travel_with_the_checkpoint(tmp_path):
    """Trained with gate_open_target, the thresholds the run ended with are in its checkpoint, and
    evaluating the checkpoint reproduces the recorded validation metric and open fraction."""
    from hrnn.cli.eval import evaluate_run
    from hrnn.train.resume import load_checkpoint

    run = tmp_path / "run"
    cfg = validate(compose_config(["task=adding", "task.seq_len=30", "model.activation=event", "model.gate=truncated",
                                   "model.gate_bias=0", "model.gate_threshold=0.5", "model.gate_open_target=0.1",
                                   "model.gate_open_rate=0.02", *TINY, "trainer.steps=20", "trainer.eval_every=20"]))
    train(cfg, run)
    thresholds = load_checkpoint(run / "checkpoints" / "best.pt")["model"]["backbone.event.module_thresholds"]
    assert thresholds.shape == (4,) and float((thresholds - 0.5).abs().min()) > 0
    metrics = read_metrics(run)
    assert metrics["history"][-1]["gate_thresholds"] == pytest.approx(thresholds.tolist())  # also in TensorBoard
    events = EventAccumulator(str(run)).Reload()
    assert [e.value for e in events.Scalars("gate/threshold/0")] == pytest.approx([float(thresholds[0])])
    evaluated = evaluate_run(run, "val", "best", {})
    assert evaluated["value"] == metrics["val_metric"]
    assert evaluated["metrics"]["open_fraction"] == metrics["val"]["open_fraction"] < 0.5


def test_a_run_with_an_open_target_resumes_to_the_uninterrupted_thresholds_and_metrics(tmp_path):
    """The thresholds move every training step, so resuming must restore them (they are in the model's
    state): stopped at step 6 and resumed to 12, the run ends as the uninterrupted one, bit for bit."""
    from hrnn.train.resume import load_checkpoint

    common = ["task=adding", "task.seq_len=20", "model.activation=event", "model.gate=truncated",
              "model.gate_bias=0", "model.gate_threshold=0.5", "model.gate_open_target=0.1",
              "model.gate_open_rate=0.05", "trainer.eval_every=3", *TINY]
    run_cli([*common, "trainer.steps=12", f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path)
    run_cli([*common, "trainer.steps=6", f"hydra.run.dir={tmp_path / 'part'}"], cwd=tmp_path)
    assert "resuming after step 6" in run_cli([f"resume={tmp_path / 'part'}", "trainer.steps=12"], cwd=tmp_path).stdout
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    for key in ("val_metric", "test_metric", "best_step", "val", "test"):
        assert part[key] == full[key], key
    assert [e["gate_thresholds"] for e in part["history"]] == [e["gate_thresholds"] for e in full["history"]]
    key = "backbone.event.module_thresholds"
    assert torch.equal(load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["model"][key],
                       load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"][key])
