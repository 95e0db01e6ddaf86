"""Sequential and permuted MNIST: 784 pixels read one per step, classified from the last state.

Data come from `data_dir`: the classic `mnist.pkl.gz` (50k train / 10k validation /
10k test) or the four standard IDX files (the 60k training images split 50k/10k in
the same order). Nothing is downloaded at run time; `make data` provides the file.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hrnn.errors import UserError
from hrnn.seeds import generator
from hrnn.tasks.base import Task, TaskSpec, iterate

PIXELS = 784
FETCH_COMMAND = "make data"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def load_mnist(data_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Splits `train`, `val`, `test` as (float32 pixels in [0, 1] of shape (n, 784), int64 labels)."""
    data_dir = Path(data_dir)
    pickled = data_dir / "mnist.pkl.gz"
    if pickled.exists():
        return _load_pickle(pickled)
    idx = {key: _find_idx(data_dir, stem) for key, stem in IDX_FILES.items()}
    if all(path is not None for path in idx.values()):
        return _load_idx(idx)
    found = [p.name for p in idx.values() if p is not None]
    extra = f" (found only {', '.join(found)} of the four IDX files)" if found else ""
    raise UserError(
        f"MNIST not found in data_dir={data_dir}: expected mnist.pkl.gz or the four IDX files{extra}; "
        f"run `{FETCH_COMMAND}` to provide mnist.pkl.gz"
    )


def _load_pickle(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        with gzip.open(path, "rb") as f:
            train, val, test = pickle.load(f, encoding="latin1")
        splits = {"train": train, "val": val, "test": test}
        out = {}
        for name, (images, labels) in splits.items():
            images = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
            labels = np.asarray(labels, dtype=np.int64)
            if images.shape[1] != PIXELS or len(images) != len(labels):
                raise ValueError(f"{name} split has shape {images.shape} with {len(labels)} labels")
            out[name] = (images, labels)
        return out
    except Exception as exc:  # any failure here means the file is not what we need
        raise UserError(
            f"cannot read {path}: {type(exc).__name__}: {exc}; delete it and run `{FETCH_COMMAND}` to fetch it again"
        ) from exc


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    # Both the dotted spelling (train-images.idx3-ubyte) and gzip are common.
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            path = data_dir / (name + suffix)
            if path.exists():
                return path
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the format of the original MNIST distribution), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"bad magic number {data[:4].hex()} (expected unsigned-byte IDX)")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != int(np.prod(shape)):
            raise ValueError(f"holds {body.size} values, header says {shape}")
        return body.reshape(shape)
    except Exception as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}; replace it, or run `{FETCH_COMMAND}` for mnist.pkl.gz") from exc


def _load_idx(paths: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    arrays = {key: read_idx(path) for key, path in paths.items()}
    train_x = arrays["train_images"].reshape(len(arrays["train_images"]), -1).astype(np.float32) / 255.0
    test_x = arrays["test_images"].reshape(len(arrays["test_images"]), -1).astype(np.float32) / 255.0
    train_y = arrays["train_labels"].astype(np.int64)
    test_y = arrays["test_labels"].astype(np.int64)
    if train_x.shape[1] != PIXELS or len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise UserError(f"MNIST IDX files in {paths['train_images'].parent} have inconsistent shapes")
    # The classic split: the last sixth of the training images (10,000 of 60,000) is the validation set.
    n_train = len(train_x) * 5 // 6
    return {
        "train": (train_x[:n_train], train_y[:n_train]),
        "val": (train_x[n_train:], train_y[n_train:]),
        "test": (test_x, test_y),
    }


class MnistTask(Task):
    """Pixel-by-pixel MNIST; `permute=True` applies one fixed permutation drawn from `permutation_seed`."""

    metric_name = "acc"
    higher_is_better = True

    def __init__(self, data_dir: str, seed: int, permute: bool, permutation_seed: int) -> None:
        self.name = "pmnist" if permute else "smnist"
        self.spec = TaskSpec(input_size=1, output_size=10, seq_len=PIXELS, readout="last")
        splits = load_mnist(data_dir)
        self.permutation = torch.randperm(PIXELS, generator=generator("permutation", permutation_seed)) if permute else None
        self._data = {name: self._prepare(*arrays) for name, arrays in splits.items()}
        counts = torch.bincount(self._data["train"][1], minlength=10).float()
        self.baseline = (counts.max() / counts.sum()).item()
        self.baseline_note = "accuracy of always predicting the most frequent training class"
        self._gen = generator("train", seed)
        self._order = torch.randperm(len(self._data["train"][0]), generator=self._gen)
        self._position = 0

    def _prepare(self, images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(images)
        if self.permutation is not None:
            x = x[:, self.permutation]
        return x.unsqueeze(-1).contiguous(), torch.from_numpy(labels)

    def train_batch(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Epochs of shuffled, non-repeating batches; a short final batch starts a new epoch."""
        x, y = self._data["train"]
        if self._position + batch_size > len(x):
            self._order = torch.randperm(len(x), generator=self._gen)
            self._position = 0
        index = self._order[self._position : self._position + batch_size]
        self._position += batch_size
        return x[index], y[index]

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        return iterate(*self._data[split], batch_size)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {"acc": (output.argmax(-1) == target).float().mean().item(), "xent": self.loss(output, target).item()}

    def state_dict(self) -> dict:
        return {"generator": self._gen.get_state(), "order": self._order.clone(), "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self._gen.set_state(state["generator"])
        self._order = state["order"].clone()
        self._position = int(state["position"])
