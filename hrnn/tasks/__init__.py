"""Tasks: data, loss, metric and memoryless baseline; built from the `task` config group."""
from __future__ import annotations

from omegaconf import DictConfig

from hrnn.tasks.base import Task, TaskSpec
from hrnn.tasks.mnist import MnistTask, load_mnist
from hrnn.tasks.synthetic import AddingTask, CopyTask, TimescalesTask

TASKS = ("copy", "adding", "smnist", "pmnist", "timescales")


def build_task(task_cfg: DictConfig, data_dir: str, seed: int) -> Task:
    """The task named by `task_cfg.name`; `seed` drives the training stream only."""
    name = task_cfg.name
    if name in ("smnist", "pmnist"):
        return MnistTask(data_dir, seed=seed, permute=name == "pmnist", permutation_seed=task_cfg.permutation_seed)
    eval_sets = dict(seed=seed, data_seed=task_cfg.data_seed, n_val=task_cfg.n_val, n_test=task_cfg.n_test)
    if name == "copy":
        return CopyTask(seq_len=task_cfg.seq_len, **eval_sets)
    if name == "adding":
        return AddingTask(seq_len=task_cfg.seq_len, **eval_sets)
    if name == "timescales":
        return TimescalesTask(seq_len=task_cfg.seq_len, periods=list(task_cfg.periods), **eval_sets)
    raise ValueError(f"unknown task {name!r}")  # config validation rejects this earlier


__all__ = ["Task", "TaskSpec", "TASKS", "build_task", "load_mnist"]
