"""What the benchmarks share: the sizes and configurations, the model builder and the timing loop.

bench.py (the CPU) and bench_cuda.py (a GPU) time the same configurations; bench_gates.py uses the
timing loop; scripts/gpu/cuda_check.py reads bench_cuda.py. The models are the real model classes
(hrnn.models) as hrnn-train builds them from conf/, with a 10-way linear head reading the last state
(like sequential MNIST).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

BATCH, HIDDEN, MODULES, INPUTS, CLASSES = 100, 128, 8, 1, 10
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # hrnn from this checkout

# name -> (description, model, basis, env, force dense[, config overrides])
CONFIGS = {
    "hrnn-dct": ("learned clock, DCT basis (soft waves, learned)", "hrnn", "dct", {}, False),
    "hrnn-binary": ("learned clock, binary basis (softmax mix of 0/1 columns, learned)", "hrnn", "binary", {}, False),
    "cwrnn": ("Clockwork RNN, periods 2^i, hard waves: inactive modules skipped on the CPU, dense on a GPU", "cwrnn", None, {}, False),
    "cwrnn-dense": ("the same Clockwork RNN run densely (skip_inactive=False)", "cwrnn", None, {}, True),
    "lstm": ("torch.nn.LSTM", "lstm", None, {}, False),
    "gru": ("torch.nn.GRU", "gru", None, {}, False),
    "rnn": ("torch.nn.RNN (tanh)", "rnn", None, {}, False),
    "hrnn-dct-loop": ("hrnn-dct through the pure PyTorch loop (the fallback)", "hrnn", "dct",
                      {"HRNN_DISABLE_FUSED": "1"}, False),
}
# The model's other options (docs/models.md), for the step time of each: `--only` names them.
VARIANTS = {
    "hrnn-clock_event": ("the default model: DCT clock times soft event gates", "hrnn", "dct", {}, False,
                         ["model.activation=clock_event"]),
    "hrnn-event": ("soft event gates, no clock", "hrnn", "dct", {}, False, ["model.activation=event"]),
    "hrnn-chunker": ("Chunker gates, soft (reference loop: no fused core)", "hrnn", "dct", {}, False,
                     ["model.activation=chunker"]),
    "hrnn-connectivity": ("learned clock with learned connectivity (soft block gates)", "hrnn", "dct", {}, False,
                          ["model.connectivity=learned"]),
    "hrnn-event-connectivity": ("soft event gates with learned connectivity", "hrnn", "dct", {}, False,
                                ["model.activation=event", "model.connectivity=learned"]),
}
# The text table: the experiment=text presets (conf/experiment/text*.yaml) at their own sizes, batch and T, on
# random windows of the KJV's TEXT_VOCAB symbols, each training step starting from the state the last one
# ended in, as hrnn-train runs task=text (hrnn/train/stream.py): name -> (description, preset).
TEXT_CONFIGS = {
    "text-hrnn": ("experiment=text: hrnn 8 x 23, clock times event gates", "text"),
    "text-lstm": ("experiment=text_lstm: LSTM 88, equal parameters", "text_lstm"),
    "text-lstm2": ("experiment=text_lstm2: 2 x LSTM 59, equal parameters", "text_lstm2"),
    "text-gru": ("experiment=text_gru: GRU 104, equal parameters", "text_gru"),
    "text-gru2": ("experiment=text_gru2: 2 x GRU 69, equal parameters", "text_gru2"),
}
TEXT_VOCAB = 74  # the KJV's 73 bytes and <unk>
DEFAULT_ONLY = ",".join([*CONFIGS, *TEXT_CONFIGS])
CONFIGS.update(VARIANTS)


def compose_config(overrides: list[str]):
    """conf/ composed with these overrides, as hrnn-train composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def build(model_name: str, basis: str | None, steps: int, extra: list[str] = ()):
    """The model as hrnn-train builds it from conf/ (its defaults, e.g. the DCT clock's start),
    with this benchmark's sizes and a 10-way head on the last state."""
    import torch

    from hrnn.models import build_model
    from hrnn.tasks import TaskSpec

    overrides = [f"model={model_name}", f"model.hidden_size={HIDDEN}", f"model.n_modules={MODULES}",
                 f"task.seq_len={steps}", *([f"basis={basis}"] if basis else []),
                 *(["model.activation=clock"] if model_name == "hrnn" else []),  # the clock core unless extra says
                 *extra]
    cfg = compose_config(overrides)
    torch.manual_seed(0)
    return build_model(cfg, TaskSpec(input_size=INPUTS, output_size=CLASSES, seq_len=steps, readout="last"))


def text_training_step(name: str, steps: int | None = None) -> tuple[Callable[[], None], int, int]:
    """A text config's training step (seeded model, Adam) on one random window with the state carried through
    hrnn's own feed, and the window's batch and length (T: the preset's task.seq_len unless `steps` says)."""
    import torch
    import torch.nn.functional as F

    from hrnn.models import build_model
    from hrnn.tasks import TaskSpec
    from hrnn.train.stream import CarriedStream

    cfg = compose_config([f"experiment={TEXT_CONFIGS[name][1]}", *([f"task.seq_len={steps}"] if steps else [])])
    batch, steps = cfg.trainer.batch_size, cfg.task.seq_len
    torch.manual_seed(0)
    model = build_model(cfg, TaskSpec(TEXT_VOCAB, TEXT_VOCAB, steps, readout="all"))
    ids = torch.randint(0, TEXT_VOCAB, (batch, steps + 1))
    x, y = F.one_hot(ids[:, :-1], TEXT_VOCAB).float(), ids[:, 1:].reshape(-1)
    feed = CarriedStream(task=None)  # its forward only: the state carried in, the last one kept, detached
    feed.reset = torch.zeros(batch, dtype=torch.bool)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(feed.forward(model, x).reshape(len(y), TEXT_VOCAB), y).backward()
        opt.step()

    return step, batch, steps


def model_and_batch(name: str, batch: int, steps: int, device: str = "cpu"):
    """A config's model (seeded) on `device` and a random batch for its 10-way head."""
    import torch

    _, model_name, basis, _, _, *extra = CONFIGS[name]
    model = build(model_name, basis, steps, extra[0] if extra else []).to(device)
    x = torch.randn(batch, steps, INPUTS, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    return model, x, y


def training_step(model, x, y) -> Callable[[], None]:
    """The step every benchmark times: zero_grad + forward + cross-entropy backward + Adam step."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(fn: Callable[[], object], warmup: int, repeat: int, clock: Callable[[], float] = time.perf_counter,
          sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each of `repeat` calls of fn by `clock`, after `warmup` untimed ones; `sync`
    (e.g. torch.cuda.synchronize) runs before each clock reading."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return times


def summary(times: list[float]) -> dict:
    """The median, min and max of timed's seconds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}
