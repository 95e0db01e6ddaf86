"""What every task provides: data, a loss, a metric and the memoryless baseline.

Tasks know data and metrics only; they never see the model. The runner asks a task
for batches, feeds them to the model, and hands the outputs back to the task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import Tensor


@dataclass(frozen=True)
class TaskSpec:
    """What a model needs to know to be built for a task."""

    input_size: int
    output_size: int
    seq_len: int
    readout: str  # "last": predict from the final state; "all": predict at every step


class Task:
    """Base class; subclasses set the attributes below and implement the methods."""

    name: str
    spec: TaskSpec
    metric_name: str
    higher_is_better: bool
    baseline: float  # the metric of the best memoryless predictor
    baseline_note: str
    # True for a task whose batches are windows of long streams (hrnn.tasks.text): the runner then carries
    # each row's state from one window to the next (hrnn/train/stream.py); False: every sequence starts at zero.
    streams: bool = False

    def train_batch(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """A fresh training batch (x of shape (B, T, input_size), target)."""
        raise NotImplementedError

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The fixed `val` or `test` set, in batches."""
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """`metric_name` and any extra metrics, each a mean over the batch's samples (batches combine by size)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """State of the training stream (generators, epoch order) so resume is exact."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def is_better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


def iterate(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]
