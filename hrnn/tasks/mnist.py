"""Sequential and permuted MNIST: an image's pixels read one per step, classified from the last state.

The number of pixels (steps) is the data's; task.seq_len states it (conf/task/common/mnist.yaml) and
build_task checks the two agree. Data come from `data_dir`: `mnist.npz` (50k train / 10k validation /
10k test, which `make data` converts from the classic mnist.pkl.gz) or the four standard IDX files (the
60k training images split 50k/10k in the same order). Nothing is downloaded at run time, and nothing is
unpickled: data_dir may come from the config stored in a run's checkpoint, and a pickle can run code.
Every file is verified against `data_dir/mnist.sha256` before it is parsed.
"""
from __future__ import annotations

import gzip
import io
import os
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
from hrnn.tasks.checksums import read_sums, sums_text, verified_bytes

FETCH_COMMAND = "make data"
FIX = (f"run `{FETCH_COMMAND}` (for your own IDX files: "
       f"`python scripts/data/fetch_mnist.py --data-dir <dir> --record-idx`)")
NPZ_FILE = "mnist.npz"
SUMS_FILE = "mnist.sha256"
LEGACY_PICKLE = "mnist.pkl.gz"  # what `make data` wrote before: never read, only converted by it
SPLITS = ("train", "val", "test")
CLASSES = 10
MAX_BYTES = 1 << 30  # real MNIST's arrays take 220 MB: a larger claim is a damaged or crafted file
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def load_mnist(data_dir: str | Path) -> Splits:
    """Splits `train`, `val`, `test` as (float32 pixels in [0, 1] of shape (n, pixels), int64 labels)."""
    data_dir = Path(data_dir)
    sums = data_dir / SUMS_FILE
    npz = data_dir / NPZ_FILE
    if npz.exists():
        return checked_splits(read_npz(npz, verified_bytes(npz, sums, FIX)), npz)
    idx = {key: find_idx(data_dir, stem) for key, stem in IDX_FILES.items()}
    if all(path is not None for path in idx.values()):
        arrays = {key: read_idx(path, verified_bytes(path, sums, FIX)) for key, path in idx.items()}
        return checked_splits(split_idx(arrays), data_dir)
    found = [p.name for p in idx.values() if p is not None]
    extra = f" (found only {', '.join(found)} of the four IDX files)" if found else ""
    if (data_dir / LEGACY_PICKLE).exists():
        extra += f"; its {LEGACY_PICKLE} is not read (a pickle can run code)"
    raise UserError(f"MNIST not found in data_dir={data_dir}: expected {NPZ_FILE} or the four IDX files{extra}; {FIX}")


def read_npz(path: Path, data: bytes) -> Splits:
    """The six arrays of mnist.npz (`<split>_images`, `<split>_labels`), with pickles refused."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if sum(info.file_size for info in archive.zip.infolist()) > MAX_BYTES:
                raise ValueError(f"its arrays claim more than {MAX_BYTES >> 20} MB")
            return {name: (archive[f"{name}_images"], archive[f"{name}_labels"]) for name in SPLITS}
    except Exception as exc:  # noqa: BLE001 - whatever fails, the file is not what `make data` wrote
        raise UserError(f"cannot read {path}: {_reason(exc)}; delete it and {FIX}") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def find_idx(data_dir: Path, stem: str) -> Path | None:
    # Both the dotted spelling (train-images.idx3-ubyte) and gzip are common.
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            path = data_dir / (name + suffix)
            if path.exists():
                return path
    return None


def read_idx(path: Path, data: bytes) -> np.ndarray:
    """Parse an IDX file (the format of the original MNIST distribution), gzipped or not."""
    try:
        if path.suffix == ".gz":
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read(MAX_BYTES + 1)
            if len(data) > MAX_BYTES:
                raise ValueError(f"unpacks to more than {MAX_BYTES >> 20} MB")
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"bad magic number {data[:4].hex()} (expected unsigned-byte IDX)")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != int(np.prod(shape)):
            raise ValueError(f"holds {body.size} values, header says {shape}")
        return body.reshape(shape)
    except Exception as exc:  # noqa: BLE001 - whatever fails, the file is not an IDX file
        raise UserError(f"cannot read IDX file {path}: {_reason(exc)}; replace it, or {FIX}") from None


def split_idx(arrays: dict[str, np.ndarray]) -> Splits:
    """The classic split: the last sixth of the training images (10,000 of 60,000) is the validation set."""
    images = {key: arrays[key].reshape(len(arrays[key]), -1) / np.float32(255.0) for key in ("train_images", "test_images")}
    n_train = len(images["train_images"]) * 5 // 6
    train_y = arrays["train_labels"]
    return {"train": (images["train_images"][:n_train], train_y[:n_train]),
            "val": (images["train_images"][n_train:], train_y[n_train:]),
            "test": (images["test_images"], arrays["test_labels"])}


def checked_splits(splits: Splits, source: Path) -> Splits:
    """The splits as float32 images (n, pixels) in [0, 1] and int64 labels in [0, 10); UserError naming
    `source` otherwise, so that a bad file fails here in one line, not inside training."""
    out = {}
    for name in SPLITS:
        images, labels = splits[name]
        pixels = out["train"][0].shape[1] if out else (images.shape[1] if images.ndim == 2 else 0)
        problem = _split_problem(images, labels, pixels)
        if problem:
            raise UserError(f"{source} is not MNIST as hrnn reads it: its {name} split {problem}; {FIX}")
        out[name] = (images.astype(np.float32, copy=False), labels.astype(np.int64))
    return out


def _split_problem(images: np.ndarray, labels: np.ndarray, pixels: int) -> str | None:
    if images.ndim != 2 or labels.ndim != 1 or len(images) != len(labels) or len(images) == 0 or pixels == 0:
        return f"has images of shape {images.shape} and labels of shape {labels.shape}"
    if images.shape[1] != pixels:
        return f"has {images.shape[1]} pixels per image, the training split {pixels}"
    if images.dtype.kind != "f" or not np.all((images >= 0) & (images <= 1)):
        return f"holds pixels of type {images.dtype} outside [0, 1]"
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= CLASSES:
        return f"holds labels of type {labels.dtype} outside 0..{CLASSES - 1}"
    return None


def save_mnist(data_dir: str | Path, splits: Splits) -> Path:
    """Write `splits` as data_dir/mnist.npz and record its checksum in mnist.sha256 (`make data`, tests)."""
    data_dir = Path(data_dir)
    splits = checked_splits(splits, data_dir / NPZ_FILE)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{f"{name}_{part}": array for name, pair in splits.items()
                                   for part, array in zip(("images", "labels"), pair)})
    _write_with_sums(data_dir, {NPZ_FILE: buffer.getvalue()})
    return data_dir / NPZ_FILE


def record_idx_checksums(data_dir: str | Path) -> list[Path]:
    """Record the checksums of the four IDX files in data_dir after checking they parse as MNIST
    (for IDX files from elsewhere: they are then verified like `make data`'s file)."""
    data_dir = Path(data_dir)
    idx = {key: find_idx(data_dir, stem) for key, stem in IDX_FILES.items()}
    missing = [stem for key, stem in IDX_FILES.items() if idx[key] is None]
    if missing:
        raise UserError(f"no {missing[0]} (or .gz) in {data_dir}; nothing recorded")
    blobs = {key: path.read_bytes() for key, path in idx.items()}
    checked_splits(split_idx({key: read_idx(idx[key], blob) for key, blob in blobs.items()}), data_dir)
    _write_with_sums(data_dir, {idx[key].name: blob for key, blob in blobs.items()}, write=False)
    return list(idx.values())


def _write_with_sums(data_dir: Path, files: dict[str, bytes], write: bool = True) -> None:
    """Each file (when `write`), then mnist.sha256 with their lines added, each replaced atomically."""
    sums = data_dir / SUMS_FILE
    recorded = read_sums(sums, FIX) if sums.exists() else {}
    lines = {name: digest for name, digest in recorded.items() if name not in files}
    text = "".join(f"{digest}  {name}\n" for name, digest in sorted(lines.items())) + sums_text(files)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, data in [*(files.items() if write else []), (SUMS_FILE, text.encode())]:
        tmp = data_dir / f".{name}.tmp{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, data_dir / name)


class MnistTask(Task):
    """Pixel-by-pixel MNIST; `permute=True` applies one fixed permutation drawn from `permutation_seed`."""

    metric_name = "acc"
    higher_is_better = True

    def __init__(self, data_dir: str, seed: int, permute: bool, permutation_seed: int) -> None:
        self.name = "pmnist" if permute else "smnist"
        splits = load_mnist(data_dir)
        pixels = splits["train"][0].shape[1]
        self.spec = TaskSpec(input_size=1, output_size=10, seq_len=pixels, readout="last")
        self.permutation = torch.randperm(pixels, generator=generator("permutation", permutation_seed)) if permute else None
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
        """ValueError when the stored epoch order is no order of these training images (another data set)."""
        order, position, n = state["order"], int(state["position"]), len(self._data["train"][0])
        if not (isinstance(order, Tensor) and order.dtype == torch.int64 and 0 <= position <= n
                and torch.equal(order.sort().values, torch.arange(n))):
            raise ValueError(f"its MNIST training order is no order of the {n} training images")
        self._gen.set_state(state["generator"])
        self._order = order.clone()
        self._position = position
