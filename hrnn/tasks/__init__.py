"""Tasks: data, loss, metric and memoryless baseline; built from the `task` config group."""
from __future__ import annotations

from omegaconf import DictConfig

from hrnn.errors import UserError
from hrnn.tasks.base import Task, TaskSpec
from hrnn.tasks.mnist import MnistTask, load_mnist
from hrnn.tasks.synthetic import AddingTask, CopyTask, TimescalesTask
from hrnn.tasks.text import TextTask


def build_task(task_cfg: DictConfig, data_dir: str, seed: int, batch_size: int = 1) -> Task:
    """The task named by `task_cfg.name`; `seed` drives the training stream only. `batch_size` (trainer.batch_size)
    lays out the text task's training stream, one row per stream; the other tasks draw any size per call."""
    name = task_cfg.name
    if name == "text":
        return TextTask(data_dir, file=task_cfg.file, seq_len=task_cfg.seq_len, batch_size=batch_size)
    if name in ("smnist", "pmnist"):
        return _check_pixels(MnistTask(data_dir, seed=seed, permute=name == "pmnist",
                                       permutation_seed=task_cfg.permutation_seed), task_cfg, data_dir)
    eval_sets = dict(seed=seed, data_seed=task_cfg.data_seed, n_val=task_cfg.n_val, n_test=task_cfg.n_test)
    if name == "copy":
        return CopyTask(seq_len=task_cfg.seq_len, **eval_sets)
    if name == "adding":
        return AddingTask(seq_len=task_cfg.seq_len, **eval_sets)
    if name == "timescales":
        return TimescalesTask(seq_len=task_cfg.seq_len, periods=list(task_cfg.periods), **eval_sets)
    raise ValueError(f"unknown task {name!r}")  # config validation rejects this earlier


def sequence_length(task_cfg: DictConfig) -> int:
    """The length of the sequences a model reads for this task: task.seq_len, and for copy its full length."""
    return CopyTask.total_length(task_cfg.seq_len) if task_cfg.name == "copy" else task_cfg.seq_len


def _check_pixels(task: MnistTask, task_cfg: DictConfig, data_dir: str) -> MnistTask:
    """task.seq_len of MNIST is the data's pixel count (conf/task/common/mnist.yaml): no other length reads it."""
    if task.spec.seq_len != task_cfg.seq_len:
        raise UserError(f"task.seq_len={task_cfg.seq_len} does not fit {task.name}: the images in data_dir={data_dir} "
                        f"have {task.spec.seq_len} pixels, read one per step; drop the override")
    return task


__all__ = ["Task", "TaskSpec", "build_task", "load_mnist", "sequence_length"]
