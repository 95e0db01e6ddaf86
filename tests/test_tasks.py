"""Each task generator against its published definition, and the MNIST loaders on real files."""
from __future__ import annotations

import gzip
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import compose_config
from hrnn.config.schema import validate
from hrnn.errors import UserError
from hrnn.seeds import STREAMS, generator, stream_seed
from hrnn.tasks import build_task, load_mnist
from hrnn.tasks.checksums import sums_text
from hrnn.tasks.mnist import MnistTask, record_idx_checksums, save_mnist
from hrnn.tasks.synthetic import AddingTask, CopyTask, TimescalesTask

EVAL = dict(seed=0, data_seed=1, n_val=20, n_test=20)


def test_copy_matches_definition():
    T = 30
    task = CopyTask(seq_len=T, **EVAL)
    x, y = task.train_batch(64)
    assert x.shape == (64, T + 20, 10) and y.shape == (64, T + 20)
    tokens = x.argmax(-1)
    assert torch.all(x.sum(-1) == 1)  # one-hot
    symbols = tokens[:, :10]
    assert symbols.min() >= 1 and symbols.max() <= 8
    assert torch.all(tokens[:, 10 : 10 + T - 1] == 0)  # T-1 blanks
    assert torch.all(tokens[:, 10 + T - 1] == 9)  # the delimiter
    assert torch.all(tokens[:, 10 + T :] == 0)  # 10 trailing blanks
    assert torch.all(y[:, :-10] == 0)
    assert torch.equal(y[:, -10:], symbols)


def test_copy_baseline_is_memoryless_optimum_measured_on_data():
    T = 50
    task = CopyTask(seq_len=T, **EVAL)
    x, y = task.train_batch(2000)
    # Best memoryless predictor: blank with certainty outside the recall window, uniform over 1..8 inside it.
    logits = torch.full((2000, T + 20, 10), -1e9)
    logits[:, :-10, 0] = 0.0
    logits[:, -10:, 1:9] = 0.0
    measured = task.loss(logits, y).item()
    assert measured == pytest.approx(10 * math.log(8) / (T + 20), rel=1e-6)
    assert task.baseline == pytest.approx(10 * math.log(8) / (T + 20))


def test_adding_matches_definition_and_baseline():
    T = 40
    task = AddingTask(seq_len=T, **EVAL)
    x, y = task.train_batch(5000)
    values, markers = x[..., 0], x[..., 1]
    assert x.shape == (5000, T, 2) and y.shape == (5000, 1)
    assert values.min() >= 0 and values.max() <= 1
    assert torch.all(markers.sum(1) == 2)
    assert torch.all(markers[:, : T // 2].sum(1) == 1) and torch.all(markers[:, T // 2 :].sum(1) == 1)
    assert torch.allclose((values * markers).sum(1, keepdim=True), y)
    measured = task.loss(torch.ones_like(y), y).item()  # predicting 1 always
    assert measured == pytest.approx(1 / 6, abs=0.01)
    assert task.baseline == pytest.approx(1 / 6)


def test_timescales_sample_and_hold():
    task = TimescalesTask(seq_len=24, periods=[3, 8], **EVAL)
    x, y = task.train_batch(4)
    for i, period in enumerate([3, 8]):
        for t in range(24):
            assert torch.equal(y[:, t, i], x[:, period * (t // period), i])
    expected = np.mean([[t % p != 0 for t in range(24)] for p in (3, 8)])
    assert task.baseline == pytest.approx(expected)


def test_eval_sets_fixed_and_training_stream_seeded():
    a, b = AddingTask(seq_len=10, **EVAL), AddingTask(seq_len=10, **{**EVAL, "seed": 7})
    assert torch.equal(next(a.eval_batches("val", 100))[0], next(b.eval_batches("val", 100))[0])
    assert not torch.equal(a.train_batch(5)[0], b.train_batch(5)[0])
    state = a.state_dict()
    first = a.train_batch(5)
    a.load_state_dict(state)
    assert torch.equal(a.train_batch(5)[0], first[0])


def test_no_choice_of_seeds_lets_training_replay_the_validation_set():
    """trainer.seed == task.data_seed (1234): the first training batch of copy shares no row with the validation set."""
    cfg = validate(compose_config(["task=copy"]))
    task = build_task(cfg.task, cfg.data_dir, seed=cfg.task.data_seed)
    x_train, _ = task.train_batch(100)
    x_val, _ = next(task.eval_batches("val", cfg.task.n_val))
    x_test, _ = next(task.eval_batches("test", cfg.task.n_test))
    rows = lambda x: {tuple(row.argmax(-1).tolist()) for row in x}  # each sequence as its symbols
    assert len(x_val) == 1000 and len(rows(x_val)) > 990
    assert rows(x_train).isdisjoint(rows(x_val)) and rows(x_train).isdisjoint(rows(x_test))
    assert rows(x_val).isdisjoint(rows(x_test))


def test_streams_are_distinct_for_every_seed_and_name():
    seeds = [stream_seed(name, seed) for name in STREAMS for seed in range(300)]
    assert len(set(seeds)) == len(seeds)


def test_a_streams_seed_is_its_definition_in_every_process():
    """numpy's SeedSequence of the user seed, spawned by the CRC-32 of the stream's name (docs/resume.md):
    the same number in a process with another str-hash salt, so resumed runs and reruns draw the same data."""
    crc32_of_train = 0x5C66E4A3  # the CRC-32 of the bytes b"train", as gzip writes it
    definition = int(np.random.SeedSequence(entropy=7, spawn_key=(crc32_of_train,)).generate_state(1, np.uint64)[0])
    assert stream_seed("train", 7) == definition == 13933171922931938614
    assert torch.equal(torch.rand(3, generator=generator("train", 7)),
                       torch.rand(3, generator=torch.Generator().manual_seed(definition)))
    code = "from hrnn.seeds import stream_seed; print(stream_seed('train', 7))"
    other = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "12345"},
                           capture_output=True, text=True, check=True)
    assert int(other.stdout) == definition


def _tiny_mnist(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64)


def _tiny_splits(rng: np.random.Generator, *sizes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return dict(zip(("train", "val", "test"), (_tiny_mnist(rng, n) for n in sizes)))


def test_mnist_npz_format(tmp_path):
    splits = _tiny_splits(np.random.default_rng(0), 30, 10, 12)
    save_mnist(tmp_path, splits)
    assert (tmp_path / "mnist.sha256").read_text().endswith("  mnist.npz\n")
    data = load_mnist(tmp_path)
    assert [len(data[s][0]) for s in ("train", "val", "test")] == [30, 10, 12]
    assert np.array_equal(data["val"][0], splits["val"][0]) and np.array_equal(data["test"][1], splits["test"][1])


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_format(tmp_path, compress):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (60, 28, 28))
    test = rng.integers(0, 256, (7, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte", train, compress)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 60), compress)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test, compress)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 7), compress)
    record_idx_checksums(tmp_path)
    data = load_mnist(tmp_path)
    assert data["train"][0].shape == (50, 784) and data["val"][0].shape == (10, 784)
    assert np.allclose(data["val"][0][0], train[50].reshape(-1) / 255.0)
    assert np.allclose(data["test"][0], test.reshape(7, -1) / 255.0)


def test_mnist_idx_at_full_size_splits_50k_train_10k_validation_in_order(tmp_path):
    """The real IDX files hold 60,000 training images: the first 50,000 train, the last 10,000 validate."""
    n = 60_000
    index = np.arange(n)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = index // 256, index % 256  # each image carries its index
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", index % 10, compress=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:3], compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", index[:3] % 10, compress=True)
    record_idx_checksums(tmp_path)
    data = load_mnist(tmp_path)
    position = lambda x: np.rint(x[:, 0] * 255).astype(int) * 256 + np.rint(x[:, 1] * 255).astype(int)
    assert np.array_equal(position(data["train"][0]), index[:50_000])
    assert np.array_equal(position(data["val"][0]), index[50_000:])
    assert np.array_equal(data["val"][1], index[50_000:] % 10) and len(data["test"][0]) == 3


def test_mnist_missing_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="make data"):
        load_mnist(tmp_path)


def test_mnist_corrupt_names_the_fix(tmp_path):
    save_mnist(tmp_path, _tiny_splits(np.random.default_rng(0), 4, 2, 2))
    npz = tmp_path / "mnist.npz"
    npz.write_bytes(npz.read_bytes()[:-10])
    with pytest.raises(UserError, match=f"^{npz} has sha256 .* but {tmp_path / 'mnist.sha256'} records .*make data"):
        load_mnist(tmp_path)
    npz.write_bytes(b"not a zip file")  # and its checksum recorded, as a crafted directory would
    (tmp_path / "mnist.sha256").write_text(sums_text({"mnist.npz": npz.read_bytes()}))
    with pytest.raises(UserError, match=f"^cannot read {npz}: .*make data"):
        load_mnist(tmp_path)


def test_mnist_without_a_checksum_is_not_read(tmp_path):
    save_mnist(tmp_path, _tiny_splits(np.random.default_rng(0), 4, 2, 2))
    (tmp_path / "mnist.sha256").unlink()
    with pytest.raises(UserError, match=f"^checksum file {tmp_path / 'mnist.sha256'} not found.*make data"):
        load_mnist(tmp_path)


def test_a_legacy_pickle_is_never_read(tmp_path):
    (tmp_path / "mnist.pkl.gz").write_bytes(b"anything")
    with pytest.raises(UserError, match="its mnist.pkl.gz is not read \\(a pickle can run code\\); run `make data`"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("damage,problem", [
    (lambda s: s["train"][1].__setitem__(0, 10), "holds labels of type int64 outside 0..9"),
    (lambda s: s["val"][0].__setitem__((0, 0), np.nan), "holds pixels of type float32 outside"),
    (lambda s: s.__setitem__("test", (s["test"][0][:, :5], s["test"][1])), "has 5 pixels per image"),
])
def test_mnist_values_are_checked_before_training_sees_them(tmp_path, damage, problem):
    splits = _tiny_splits(np.random.default_rng(0), 4, 2, 2)
    damage(splits)
    with pytest.raises(UserError, match=problem):
        save_mnist(tmp_path, splits)


def test_pmnist_applies_one_fixed_permutation(tmp_path):
    rng = np.random.default_rng(2)
    save_mnist(tmp_path, _tiny_splits(rng, 20, 5, 5))
    plain = MnistTask(str(tmp_path), seed=0, permute=False, permutation_seed=0)
    permuted = MnistTask(str(tmp_path), seed=0, permute=True, permutation_seed=3)
    again = MnistTask(str(tmp_path), seed=5, permute=True, permutation_seed=3)
    assert torch.equal(permuted.permutation, again.permutation)
    assert sorted(permuted.permutation.tolist()) == list(range(784))
    xs, _ = next(plain.eval_batches("test", 5))
    xp, _ = next(permuted.eval_batches("test", 5))
    assert torch.equal(xp[:, :, 0], xs[:, permuted.permutation, 0])
    assert xs.shape == (5, 784, 1)


def test_timescales_recovery_score():
    task = TimescalesTask(seq_len=240, periods=[4, 12, 30], **EVAL)
    assert task.recovered([1, 2, 4, 8, 12.5, 64]) == [4, 12]  # 12.5 is within 5% of 12
    assert task.recovered([3, 13, 29]) == [30]  # 29 is 3.3% off 30; 13 is 8% off 12
    assert task.recovered([]) == []
