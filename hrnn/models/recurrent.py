"""Recurrent backbones: the clocked modular RNN (hrnn, cwrnn) and torch.nn baselines.

Every backbone maps x (B, T, I) to states (B, T, H), or with last_only=True to the final
state (B, H); the task's head reads them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hrnn.models.clock import Clock
from hrnn.ops import chunker_leaky_rnn, gated_leaky_rnn, leaky_rnn

EVALUATION_DRAWS_SEED = 0  # a stochastic gate's draws in evaluation: the same every evaluation
MAX_THRESHOLD = 0.999  # the highest a module's threshold follows its open target to: a sigmoid reaches 1 in float32


def slow_to_fast_modules(periods: list[float]) -> Tensor:
    """(M, M) 0/1: module i reads module j iff j is at least as slow as i, ordering modules by
    (period, index), so that equal periods are ordered by index and every order gives the
    Clockwork RNN's M (M + 1) / 2 blocks (Koutnik et al. 2014)."""
    n_modules = len(periods)
    rank = torch.empty(n_modules, dtype=torch.long)
    rank[sorted(range(n_modules), key=lambda m: (periods[m], m))] = torch.arange(n_modules)
    return (rank.unsqueeze(0) >= rank.unsqueeze(1)).float()


def expand_blocks(matrix: Tensor, hidden_size: int) -> Tensor:
    """(M, M) per module pair -> (H, H) per unit pair: entry (i, j) fills block (module i, module j)."""
    units = hidden_size // matrix.shape[0]
    return matrix.repeat_interleave(units, dim=0).repeat_interleave(units, dim=1)


def slow_to_fast_mask(hidden_size: int, n_modules: int, periods: list[float] | None = None) -> Tensor:
    """(H, H) mask for W_h: rows read, columns are read; module order by `periods` (index order if None).

    With modules numbered fast to slow (module 0 the fastest) this is the block
    upper-triangular W_h of the Clockwork RNN: a module reads itself and every slower module.
    """
    return expand_blocks(slow_to_fast_modules(periods or list(range(n_modules))), hidden_size)


class Backbone(nn.Module):
    """What the runner may ask any backbone besides its states; these defaults mean 'nothing to say'."""

    def penalty(self) -> Tensor:
        """Regularization added to the training loss (after the forward pass it regularizes)."""
        return torch.zeros(())

    def connectivity(self) -> Tensor | None:
        """(M, M) how much module i reads module j (row i, column j), for logging; None if not modular."""
        return None

    def update_fraction(self) -> float | None:
        """Mean activation a over the last forward pass's samples, steps and modules (the
        fraction of module updates when a is 0/1); None if the model has no activations."""
        return None

    def open_fraction(self) -> float | None:
        """The fraction of (sample, step, module) with a > 0: the updates a kernel must compute (a soft
        gate's is 1; a truncated gate's at most its update fraction / threshold); None without activations."""
        return None

    def set_progress(self, fraction: float) -> None:
        """The fraction of training done, before each training step: for schedules inside the model."""

    def recurrence(self) -> str:
        """What runs the time loop on a CPU: "fused" (hrnn's C++ cores, where built), "pytorch loop",
        or the torch.nn module; the run header names it."""
        return "fused"

    def forward_carried(self, x: Tensor, state: tuple[Tensor, ...] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """States (B, T, H) from the initial `state` (None: zeros), and the final state: for a long stream read
        window by window with the state carried (task=text). A state is a tuple of tensors, each with the batch
        first, so that the runner can zero the rows that start a new stream (hrnn/train/stream.py)."""
        raise NotImplementedError(f"{type(self).__name__} does not carry its state from one window to the next")


class ConnectivityGates(nn.Module):
    """Learned connectivity: block (i, j) of W_h is scaled by s_ij = sigmoid(L_ij).

    Training uses the soft gates s and adds weight * mean(s) to the loss (all s are positive, so
    this is their L1 norm over M^2). Evaluation gates hard: a block with s_ij < threshold is
    exactly zero, so a kernel can skip it; the others keep their s_ij.
    """

    def __init__(self, n_modules: int, init_logit: float, weight: float, threshold: float) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((n_modules, n_modules), float(init_logit)))
        self.weight, self.threshold = weight, threshold

    def gates(self) -> Tensor:
        """(M, M) the gates in use: soft in training, with blocks below the threshold zeroed in evaluation."""
        soft = torch.sigmoid(self.logits)
        return soft if self.training else torch.where(soft >= self.threshold, soft, torch.zeros_like(soft))

    def penalty(self) -> Tensor:
        return self.weight * torch.sigmoid(self.logits).mean()


class UpdateGate(nn.Module):
    """What decides, per module and per sample, whether a module updates (`hrnn.ops.gated_leaky_rnn`).

    mode: "soft" uses the gate g itself; "hard" uses 1[g > threshold] with a straight-through
    gradient; "stochastic" uses 1[g > U], U ~ uniform(0, 1) (an update with probability g), in
    evaluation too, from a fixed seed so that an evaluation is repeatable: the model trained with
    draws, and the threshold shut every gate it had learned to open with g < 0.5 (docs/models.md).
    "annealed" (the event gate only) trains soft on sigmoid(s z), the slope s rising over training
    (`set_progress`), and evaluates hard at z > 0, which is sigmoid(s z) > 1/2 for every s: no
    straight-through estimate, and an evaluation that skips closed modules (HM-RNN's slope annealing).
    "truncated" uses g where g > threshold and exactly 0 elsewhere, with its true gradient (0 where
    shut): no estimator, and training as well as evaluation skips the shut modules' candidates.
    `update_weight` * the mean activation is added to the loss (Skip RNN's budget).
    """

    fused = True  # hrnn.ops's fused core runs it where built

    def __init__(self, n_modules: int, mode: str, threshold: float, update_weight: float) -> None:
        super().__init__()
        self.n_modules, self.mode, self.threshold, self.update_weight = n_modules, mode, threshold, update_weight

    def set_progress(self, fraction: float) -> None:
        """The fraction of training done; the annealed gate's slope and the truncated gate's warm-up read it."""

    def op_mode(self) -> str:
        if self.mode == "truncated":
            return "truncated"
        return "soft" if self.mode == "soft" or (self.mode == "annealed" and self.training) else "hard"

    def thresholds(self, batch: int, steps: int, n_gates: int, like: Tensor) -> Tensor | float:
        if self.mode == "annealed":
            return 0.5  # read in evaluation only: z > 0
        if self.mode == "stochastic":
            generator = None if self.training else torch.Generator(device=like.device).manual_seed(EVALUATION_DRAWS_SEED)
            return torch.rand(batch, steps, n_gates, dtype=like.dtype, device=like.device, generator=generator)
        return self.threshold

    def run(self, rnn: "ClockedRNN", x: Tensor, waves: Tensor | None, h0: Tensor,
            last_only: bool) -> tuple[Tensor, Tensor]:
        """States (or the last state) and activations (B, T, M) of `rnn` on x under this gate."""
        raise NotImplementedError

    def penalty(self, activations: Tensor) -> Tensor:
        return self.update_weight * activations.mean()


class EventGate(UpdateGate):
    """g_t = sigmoid(W_g x_t + U_g h_{t-1} + b_g), one per module and sample; `bias` starts b_g
    negative, so that modules start mostly closed and hold their memory. Annealed, training uses
    sigmoid(s z_t) with s = 1 + (slope - 1) * the fraction of training done, soft until the
    fraction `hard_from`, then hard (z > 0) with the straight-through gradient of sigmoid(s z):
    HM-RNN's slope annealing, so that the last part of training sees the gate it is evaluated with.
    Truncated, the threshold can rise linearly from 0 over the first `threshold_warmup` of training: a gate
    shut from the start gets no gradient and stays shut, so the gates first learn where to open as soft
    gates. Evaluation always uses the threshold itself, so a checkpoint evaluates the same wherever it is read.
    Truncated with `support` > 0, a shut gate within `support` below the threshold still gets the open
    gate's gradient in training (a pseudo-derivative of bounded support, as EGRU's), so a gate pushed just
    below its threshold can learn to open again; only those shut modules' candidates are computed.
    Truncated with `open_target` > 0, the threshold follows a set share of open updates: it starts at
    `threshold` and after every training pass moves by `open_rate` times the share of (sample, step,
    module) open in that pass minus the target, so the share is set, not learned, and gates that all
    fell below the threshold open again as it comes down to them. The share is over all modules
    together, so that modules can differ in how often they open (one module per threshold with
    `open_per_module`, which measured worse). The thresholds are a buffer, saved with the model. With
    `threshold_warmup` too, the target falls linearly from 1 (every gate open) over that fraction of
    training: a budget that tightens, so that the gates learn where to open before most must shut."""

    def __init__(self, input_size: int, hidden_size: int, n_modules: int, mode: str, bias: float,
                 threshold: float, update_weight: float, slope: float, hard_from: float = 1.0,
                 threshold_warmup: float = 0.0, support: float = 0.0, open_target: float = 0.0,
                 open_rate: float = 0.0, open_per_module: bool = False) -> None:
        super().__init__(n_modules, mode, threshold, update_weight)
        self.threshold_warmup, self.support = threshold_warmup, support
        self.open_target, self.open_rate, self.open_per_module = open_target, open_rate, open_per_module
        if open_target > 0:  # only then, so that a model without it has the state_dict it always had
            self.register_buffer("module_thresholds", torch.full((n_modules,), float(threshold)))
        self.input = nn.Linear(input_size, n_modules)  # W_g and b_g
        self.recurrent = nn.Linear(hidden_size, n_modules, bias=False)  # U_g
        nn.init.constant_(self.input.bias, bias)
        self.final_slope, self.slope = slope, 1.0
        self.hard_from, self.progress = hard_from, 0.0

    def set_progress(self, fraction: float) -> None:
        self.progress = min(max(fraction, 0.0), 1.0)
        if self.mode == "annealed":
            self.slope = 1.0 + (self.final_slope - 1.0) * self.progress

    def op_mode(self) -> str:
        if self.mode == "annealed" and self.training:
            return "hard" if self.hard_from < 1 and self.progress >= self.hard_from else "soft"
        return super().op_mode()

    def thresholds(self, batch: int, steps: int, n_gates: int, like: Tensor) -> Tensor | float:
        if self.open_target > 0:
            return self.module_thresholds.to(like.dtype)
        if self.mode == "truncated" and self.training and self.progress < self.threshold_warmup:
            return self.threshold * self.progress / self.threshold_warmup
        return super().thresholds(batch, steps, n_gates, like)

    def run(self, rnn, x, waves, h0, last_only):
        batch, steps, _ = x.shape
        gate_x, gate_bias, gate_h = self.input.weight, self.input.bias, self.recurrent.weight
        if self.mode == "annealed" and self.training:  # sigmoid(s z): z's weights scaled by s
            gate_x, gate_bias, gate_h = self.slope * gate_x, self.slope * gate_bias, self.slope * gate_h
        states, activations = gated_leaky_rnn(x, rnn.input.weight, rnn.input.bias, rnn.recurrent_weight(), h0, waves,
                                              gate_x, gate_bias, gate_h, self.op_mode(),
                                              self.thresholds(batch, steps, self.n_modules, x), last_only=last_only,
                                              support=self.support if self.mode == "truncated" else 0.0)
        if self.open_target > 0 and self.training and torch.is_grad_enabled():
            self.follow_open_target(activations)
        return states, activations

    def current_open_target(self) -> float:
        """open_target, or during the warm-up the value on the line from 1 down to it."""
        if self.progress < self.threshold_warmup:
            return 1.0 - (1.0 - self.open_target) * self.progress / self.threshold_warmup
        return self.open_target

    @torch.no_grad()
    def follow_open_target(self, activations: Tensor) -> None:
        """tau += open_rate * (open share in this pass - the target), kept in [0, 1); per module, each
        module's threshold by its own share."""
        opened = (activations > 0).to(self.module_thresholds.dtype)
        open_fraction = opened.mean(dim=(0, 1)) if self.open_per_module else opened.mean()
        moved = self.module_thresholds + self.open_rate * (open_fraction - self.current_open_target())
        self.module_thresholds.copy_(moved.clamp(0.0, MAX_THRESHOLD))


class ChunkerGate(UpdateGate):
    """Module m >= 1 wakes when module m - 1 mispredicts the input x_t (Schmidhuber 1992's Chunker),
    against a learned threshold theta_m that starts at `threshold_init`; module 0 always updates.
    `prediction_weight` * the mean prediction error is added to the loss: it trains the predictions."""

    fused = False  # no fused core: the predictions and thresholds run in a PyTorch loop

    def __init__(self, input_size: int, hidden_size: int, n_modules: int, mode: str, threshold_init: float,
                 threshold: float, update_weight: float, prediction_weight: float) -> None:
        super().__init__(n_modules, mode, threshold, update_weight)
        units = hidden_size // n_modules
        bound = units ** -0.5  # nn.Linear's default range for a (units -> inputs) map
        self.predict_w = nn.Parameter(torch.empty(n_modules - 1, input_size, units).uniform_(-bound, bound))
        self.predict_b = nn.Parameter(torch.zeros(n_modules - 1, input_size))
        self.log_threshold = nn.Parameter(torch.full((n_modules - 1,), math.log(threshold_init)))
        self.prediction_weight = prediction_weight
        self.errors: Tensor | None = None  # (B, T, M-1) of the last forward pass

    def run(self, rnn, x, waves, h0, last_only):
        batch, steps, _ = x.shape
        states, activations, self.errors = chunker_leaky_rnn(
            x, rnn.input.weight, rnn.input.bias, rnn.recurrent_weight(), h0, self.predict_w, self.predict_b,
            self.log_threshold, self.op_mode(), self.thresholds(batch, steps, self.n_modules - 1, x), last_only)
        return states, activations

    def penalty(self, activations: Tensor) -> Tensor:
        return super().penalty(activations) + self.prediction_weight * self.errors.mean()


class ClockedRNN(Backbone):
    """M equal modules updated leakily by their activations a_t (one per module, or per module and sample):

    h_t = a_t * tanh(W_x x_t + W_h h_{t-1} + b) + (1 - a_t) * h_{t-1},

    a_t = the clock's wave (activation "clock"), an update gate (no clock: "event", "chunker"),
    or their product ("clock_event"). W_h is full, masked slow to fast, or gated block by block (learned).
    """

    def __init__(self, input_size: int, hidden_size: int, clock: Clock | None, connectivity: str,
                 gates: ConnectivityGates | None = None, event: UpdateGate | None = None) -> None:
        super().__init__()
        if clock is None and event is None:
            raise ValueError("a ClockedRNN needs a clock, an event gate, or both")
        if (connectivity == "learned") != (gates is not None):
            raise ValueError(f"connectivity={connectivity!r} with gates={gates}: learned connectivity, and only it, takes gates")
        n_modules = clock.n_modules if clock is not None else event.n_modules
        if hidden_size % n_modules:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by n_modules={n_modules}")
        self.hidden_size, self.n_modules, self.connectivity_kind = hidden_size, n_modules, connectivity
        self.clock, self.gates, self.event = clock, gates, event
        self.input = nn.Linear(input_size, hidden_size)  # W_x and b
        self.recurrent = nn.Parameter(torch.empty(hidden_size, hidden_size))  # W_h
        nn.init.xavier_uniform_(self.input.weight)
        nn.init.zeros_(self.input.bias)
        nn.init.orthogonal_(self.recurrent)
        if connectivity == "slow_to_fast":
            with torch.no_grad():
                self.recurrent.mul_(self.recurrent_weight_mask())
        self.activations: Tensor | None = None  # a of the last forward pass, for the penalty and logging

    def module_periods(self) -> list[float]:
        """The order slow_to_fast follows: the clock's current periods (index order without a clock)."""
        return self.clock.periods() if self.clock is not None else [float(m) for m in range(self.n_modules)]

    def recurrent_weight_mask(self) -> Tensor:
        return slow_to_fast_mask(self.hidden_size, self.n_modules, self.module_periods()).to(self.recurrent)

    def recurrent_weight(self) -> Tensor:
        if self.connectivity_kind == "slow_to_fast":
            return self.recurrent * self.recurrent_weight_mask()
        if self.gates is not None:
            return self.recurrent * expand_blocks(self.gates.gates(), self.hidden_size)
        return self.recurrent

    def forward(self, x: Tensor, h0: Tensor | None = None, last_only: bool = False) -> Tensor:
        batch, steps, _ = x.shape
        waves = self.clock.waves(steps).to(x.dtype) if self.clock is not None else None  # (T, M), once per pass
        if h0 is None:
            h0 = x.new_zeros(batch, self.hidden_size)
        if self.event is None:
            self.activations = waves
            # u_t = W_x x_t + b and the recurrence in one op (the projection fused into the kernels' loop).
            return leaky_rnn(x, self.input.weight, self.input.bias, self.recurrent_weight(), waves, h0,
                             last_only=last_only)
        states, self.activations = self.event.run(self, x, waves, h0, last_only)
        return states

    def forward_carried(self, x: Tensor, state: tuple[Tensor, ...] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The ops' h0 in, the last state out; the clock's waves start at phase 0 in every window, which is
        the stream's phase because windows start at multiples of T (hrnn/tasks/text.py, "Clock")."""
        states = self(x, h0=None if state is None else state[0])
        return states, (states[:, -1],)

    def penalty(self) -> Tensor:
        total = self.clock.penalty() if self.clock is not None else torch.zeros(())
        if self.gates is not None:
            total = total + self.gates.penalty()
        if self.event is not None and self.activations is not None:
            total = total + self.event.penalty(self.activations)
        return total

    def connectivity(self) -> Tensor | None:
        if self.gates is not None:
            return torch.sigmoid(self.gates.logits).detach().cpu()  # soft; evaluation zeroes those < threshold
        if self.connectivity_kind == "slow_to_fast":
            return slow_to_fast_modules(self.module_periods())
        return None

    def update_fraction(self) -> float | None:
        return None if self.activations is None else float(self.activations.detach().mean())

    def open_fraction(self) -> float | None:
        return None if self.activations is None else float((self.activations.detach() > 0).float().mean())

    def set_progress(self, fraction: float) -> None:
        if self.event is not None:
            self.event.set_progress(fraction)

    def recurrence(self) -> str:
        return "pytorch loop" if self.event is not None and not self.event.fused else "fused"


class TorchRNN(Backbone):
    """torch.nn.LSTM / GRU / RNN (tanh): the fused baselines people would otherwise use."""

    LAYERS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

    def __init__(self, kind: str, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        self.rnn = self.LAYERS[kind](input_size, hidden_size, num_layers=num_layers, batch_first=True)

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        states = self.rnn(x)[0]
        return states[:, -1] if last_only else states

    def forward_carried(self, x: Tensor, state: tuple[Tensor, ...] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """torch.nn's final (h, c) of an LSTM, h of a GRU or RNN, each (layers, B, H), carried batch first."""
        hx = None if state is None else tuple(s.transpose(0, 1).contiguous() for s in state)
        states, final = self.rnn(x, hx if hx is None or len(hx) == 2 else hx[0])
        return states, tuple(s.transpose(0, 1) for s in (final if isinstance(final, tuple) else (final,)))

    def recurrence(self) -> str:
        return f"torch.nn.{type(self.rnn).__name__}"


class SequenceModel(nn.Module):
    """Backbone plus a linear head, read at the last step or at every step as the task says."""

    def __init__(self, backbone: nn.Module, hidden_size: int, output_size: int, readout: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, output_size)
        self.readout = readout

    @property
    def clock(self) -> Clock | None:
        return getattr(self.backbone, "clock", None)

    def gate_thresholds(self) -> list[float] | None:
        """Each module's truncated-gate threshold where it follows an open target (gate_open_target), else None."""
        thresholds = getattr(getattr(self.backbone, "event", None), "module_thresholds", None)
        return None if thresholds is None else [float(t) for t in thresholds]

    @property
    def connectivity_logits(self) -> nn.Parameter | None:
        """Learned connectivity's (M, M) block-gate logits, which train at their own rate."""
        gates = getattr(self.backbone, "gates", None)
        return None if gates is None else gates.logits

    def forward(self, x: Tensor) -> Tensor:
        # "last": ask for the final state only, so no (B, T, H) gradient is built for it.
        return self.head(self.backbone(x, last_only=self.readout == "last"))

    def forward_carried(self, x: Tensor, state: tuple[Tensor, ...] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Outputs at every step from the initial `state`, and the final state (Backbone.forward_carried)."""
        states, state = self.backbone.forward_carried(x, state)
        return self.head(states), state

    def activations(self) -> Tensor | None:
        """Each module's activation a in the last forward pass, (T, M) for a clock alone, (B, T, M) with
        gates; None for a backbone without modules (the text report reads it, hrnn/report/text.py)."""
        return getattr(self.backbone, "activations", None)

    def penalty(self) -> Tensor:
        return self.backbone.penalty()

    def set_progress(self, fraction: float) -> None:
        self.backbone.set_progress(fraction)

    def connectivity(self) -> Tensor | None:
        return self.backbone.connectivity()

    def recurrence(self) -> str:
        return self.backbone.recurrence()

    def statistics(self) -> dict[str, float]:
        """Numbers about the last forward pass the runner averages like a task's metrics."""
        fraction = self.backbone.update_fraction()
        if fraction is None:
            return {}
        return {"update_fraction": fraction, "open_fraction": self.backbone.open_fraction()}
