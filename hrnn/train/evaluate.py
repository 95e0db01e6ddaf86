"""Evaluate a model on one of a task's fixed splits: the loop's validation and test, and hrnn-eval.

A streaming task (text) is read as one long stream per row with the state carried (hrnn/train/stream.py);
every other task's split is a set of independent sequences."""
from __future__ import annotations

import torch

from hrnn.tasks import Task
from hrnn.train.stream import evaluate_stream


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, split: str, batch_size: int, device: torch.device) -> dict[str, float]:
    """Sample-weighted means of the task's metrics (and loss) over a fixed split; a stream's full-split figures."""
    if task.streams:
        return evaluate_stream(model, task, split, batch_size, device)
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    for x, y in task.eval_batches(split, batch_size):
        x, y = x.to(device), y.to(device)
        output = model(x)
        values = {"loss": task.loss(output, y).item(), **task.metrics(output, y), **model.statistics()}
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value * len(x)
        count += len(x)
    return {name: total / count for name, total in totals.items()}
