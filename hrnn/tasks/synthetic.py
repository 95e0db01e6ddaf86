"""Synthetic long-memory tasks with their published definitions.

Training batches come fresh from the run seed's training stream; the validation and
test sets are drawn once, each from its own stream of a fixed data seed, so every run
(and every seed of a sweep) is scored on the same sequences, and no choice of seeds
makes the training stream replay an evaluation set (hrnn.seeds).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from hrnn.seeds import generator
from hrnn.tasks.base import Task, TaskSpec, iterate

COPY_SYMBOLS = 10  # alphabet 0..9: 0 blank, 1..8 data, 9 delimiter
COPY_LENGTH = 10  # symbols to remember
# A true period counts as recovered when a learned period is this close to it (relative): it covers
# bases that cannot express a period exactly (cosine periods are T/k); a binary period either equals
# the true one or misses it by >= 1 step.
RECOVERY_TOLERANCE = 0.05
BLANK, DELIMITER = 0, 9


class SyntheticTask(Task):
    """Shared plumbing: fixed evaluation sets, a seeded training stream."""

    def __init__(self, seed: int, data_seed: int, n_val: int, n_test: int) -> None:
        self._train_gen = generator("train", seed)
        self._eval = {"val": self.generate(n_val, generator("val", data_seed)),
                      "test": self.generate(n_test, generator("test", data_seed))}

    def generate(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def train_batch(self, batch_size: int) -> tuple[Tensor, Tensor]:
        return self.generate(batch_size, self._train_gen)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        return iterate(*self._eval[split], batch_size)

    def state_dict(self) -> dict:
        return {"train_generator": self._train_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._train_gen.set_state(state["train_generator"])


class CopyTask(SyntheticTask):
    """Copy memory (Arjovsky, Shah & Bengio 2016).

    Input: 10 symbols from 1..8, T-1 blanks, the delimiter, 10 blanks (length T+20),
    one-hot over 10 symbols. Target: blanks, then the 10 symbols in the last 10 steps.
    """

    name = "copy"
    metric_name = "xent"
    higher_is_better = False

    def __init__(self, seq_len: int, **kwargs) -> None:
        self.delay = seq_len
        total = self.total_length(seq_len)
        self.spec = TaskSpec(input_size=COPY_SYMBOLS, output_size=COPY_SYMBOLS, seq_len=total, readout="all")
        self.baseline = COPY_LENGTH * math.log(8) / total
        self.baseline_note = "10 ln 8 / (T+20): blanks known, recalled symbols guessed uniformly from 8"
        super().__init__(**kwargs)

    @staticmethod
    def total_length(delay: int) -> int:
        """The sequence length for a delay T: the symbols, the delay, the recall."""
        return delay + 2 * COPY_LENGTH

    def generate(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        total = self.spec.seq_len
        symbols = torch.randint(1, 9, (n, COPY_LENGTH), generator=gen)
        tokens = torch.full((n, total), BLANK, dtype=torch.long)
        tokens[:, :COPY_LENGTH] = symbols
        tokens[:, COPY_LENGTH + self.delay - 1] = DELIMITER
        target = torch.full((n, total), BLANK, dtype=torch.long)
        target[:, -COPY_LENGTH:] = symbols
        return F.one_hot(tokens, COPY_SYMBOLS).float(), target

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.reshape(-1, COPY_SYMBOLS), target.reshape(-1))

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        recalled = output[:, -COPY_LENGTH:].argmax(-1) == target[:, -COPY_LENGTH:]
        return {"xent": self.loss(output, target).item(), "recall_acc": recalled.float().mean().item()}


class AddingTask(SyntheticTask):
    """Adding problem (Hochreiter & Schmidhuber 1997, as in Le et al. 2015).

    Two channels of length T: values U[0, 1] and markers with exactly two 1s, one
    in each half. Target: the sum of the two marked values, read from the last state.
    """

    name = "adding"
    metric_name = "mse"
    higher_is_better = False

    def __init__(self, seq_len: int, **kwargs) -> None:
        self.spec = TaskSpec(input_size=2, output_size=1, seq_len=seq_len, readout="last")
        self.baseline = 1 / 6
        self.baseline_note = "Var(U1 + U2) = 1/6: always predicting 1"
        super().__init__(**kwargs)

    def generate(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        steps, half = self.spec.seq_len, self.spec.seq_len // 2
        values = torch.rand(n, steps, generator=gen)
        first = torch.randint(0, half, (n,), generator=gen)
        second = torch.randint(half, steps, (n,), generator=gen)
        markers = torch.zeros(n, steps)
        rows = torch.arange(n)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        target = values[rows, first] + values[rows, second]
        return torch.stack([values, markers], dim=-1), target.unsqueeze(-1)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output, target)

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {"mse": self.loss(output, target).item()}


def recovered_periods(true_periods: list[int], learned_periods: list[float]) -> list[int]:
    """The true periods within RECOVERY_TOLERANCE (relative) of some learned period."""
    return [p for p in true_periods if any(abs(q - p) <= RECOVERY_TOLERANCE * p for q in learned_periods)]


class TimescalesTask(SyntheticTask):
    """Sample and hold with known periods: the ideal clock hierarchy is known.

    C channels of i.i.d. N(0, 1) noise; channel i has period P_i, and its target at
    step t is its input at the latest multiple of P_i: y[t, i] = x[P_i * (t // P_i), i].
    A module ticking exactly at P_i solves channel i.
    """

    name = "timescales"
    metric_name = "mse"
    higher_is_better = False

    def __init__(self, seq_len: int, periods: list[int], **kwargs) -> None:
        self.periods = [int(p) for p in periods]
        self.spec = TaskSpec(input_size=len(self.periods), output_size=len(self.periods), seq_len=seq_len, readout="all")
        t = torch.arange(seq_len)
        # The best memoryless predictor copies the input on ticks and predicts 0 elsewhere.
        off_tick = torch.stack([(t % p != 0).float() for p in self.periods])
        self.baseline = off_tick.mean().item()
        self.baseline_note = "best memoryless predictor: copy the input on ticks, predict 0 between them"
        self._hold_index = torch.stack([(t // p) * p for p in self.periods], dim=1)  # (T, C)
        super().__init__(**kwargs)

    def recovered(self, learned_periods: list[float]) -> list[int]:
        """The true periods that some module's dominant period matches (within RECOVERY_TOLERANCE)."""
        return recovered_periods(self.periods, learned_periods)

    def generate(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, self.spec.seq_len, len(self.periods), generator=gen)
        target = torch.gather(x, 1, self._hold_index.unsqueeze(0).expand(n, -1, -1))
        return x, target

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output, target)

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {"mse": self.loss(output, target).item()}
