"""How a task's batches meet the model: independent sequences, or windows of long streams with the state carried.

Most tasks draw independent sequences, each read from a zero state (`Sequences`). A streaming task
(Task.streams, hrnn.tasks.text) hands out windows of long texts instead, row b of each batch continuing
row b of the one before. `CarriedStream` starts every window from the final state of the row's last one,
detached: truncated backpropagation through time, where no gradient crosses a window boundary but the
memory does. Rows the task flags `reset` (a new epoch) start from zeros. The carried state is part of the
checkpoint, so a resumed run reads on from the very state it stopped with and ends as the uninterrupted one.

Evaluation of a streaming task (`evaluate_stream`) reads the whole split with the state carried, through
the task's `evaluate_split`: its bits per character is a full-split figure, not a mean over windows.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from hrnn.tasks import Task

State = tuple[Tensor, ...] | None  # a backbone's carried state, each tensor batch first; None: zeros


def start_rows(state: State, reset: Tensor) -> State:
    """The state with the rows flagged in `reset` zeroed; None (zeros everywhere) when every row restarts."""
    if state is None or bool(reset.all()):
        return None
    restart = reset.to(state[0].device)
    return tuple(s.masked_fill(restart.view(-1, *[1] * (s.dim() - 1)), 0.0) for s in state)


def carried_step(model: torch.nn.Module, device: torch.device,
                 observe: Callable[[Any, Tensor], None] | None = None) -> Callable[[Any, State], tuple[Tensor, State]]:
    """A step for TextTask.evaluate_split: the model's outputs on a window (on the CPU, where the targets are)
    from the carried state, and the state to carry; `observe(window, outputs)` sees each window after its pass."""

    def step(window: Any, state: State) -> tuple[Tensor, State]:
        output, state = model.forward_carried(window.x.to(device), start_rows(state, window.reset))
        if observe is not None:
            observe(window, output)
        return output.cpu(), state

    return step


@torch.no_grad()
def evaluate_stream(model: torch.nn.Module, task: Task, split: str, batch_size: int, device: torch.device,
                    observe: Callable[[Any, Tensor], None] | None = None) -> dict[str, float]:
    """The task's full-split metrics with the state carried (bpc, ppl, xent, chars), the loss (nats per
    character, as in training) and the model's statistics (e.g. update_fraction) averaged over windows."""
    model.eval()
    statistics: list[dict[str, float]] = []

    def record(window: Any, output: Tensor) -> None:
        statistics.append(model.statistics())
        if observe is not None:
            observe(window, output)

    result = task.evaluate_split(split, batch_size, carried_step(model, device, record))
    means = {name: sum(s[name] for s in statistics) / len(statistics) for name in statistics[0]}
    return {**result, "loss": result["xent"], **means}


class Sequences:
    """Independent sequences: every batch starts from a zero state, and nothing is carried or checkpointed."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def next_batch(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        x, y = self.task.train_batch(batch_size)
        return x.to(device), y.to(device)

    def forward(self, model: torch.nn.Module, x: Tensor) -> Tensor:
        return model(x)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CarriedStream(Sequences):
    """A streaming task's windows, each row's state carried to its next window, detached (module docstring)."""

    def __init__(self, task: Task) -> None:
        super().__init__(task)
        self.state: State = None
        self.reset: Tensor | None = None  # the rows of the pending window that start a new stream

    def next_batch(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        window = self.task.next_window()  # the stream's rows were laid out for trainer.batch_size
        self.reset = window.reset
        return window.x.to(device), window.y.to(device)

    def forward(self, model: torch.nn.Module, x: Tensor) -> Tensor:
        state = None if self.state is None else tuple(s.to(x.device) for s in self.state)
        output, final = model.forward_carried(x, start_rows(state, self.reset))
        # A copy, not a view: a view would keep the window's whole (B, T, H) states alive, and in a checkpoint.
        self.state = tuple(s.detach().clone() for s in final)
        return output

    def state_dict(self) -> dict[str, Any]:
        return {"carried": None if self.state is None else [s.cpu() for s in self.state]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        carried = state.get("carried")
        self.state = None if carried is None else tuple(carried)


def feed_for(task: Task) -> Sequences:
    """How the loop feeds this task's training batches to the model."""
    return CarriedStream(task) if task.streams else Sequences(task)
