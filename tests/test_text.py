"""The character-level text task (hrnn.tasks.text) and its corpus script (scripts/data/fetch_text.py),
on a small text each test writes itself with its own checksum file."""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hrnn.errors import UserError
from hrnn.tasks.text import IGNORE, TextTask, checksum_path, load_text, split_bounds

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "data" / "fetch_text.py"
RARE = b"#"  # occurs only in the test split: must map to UNK


def make_text(n_words: int = 900, seed: int = 3) -> bytes:
    """A few KB of pseudo-English, with one byte that only the test split contains."""
    rng = random.Random(seed)
    words = ["and", "the", "lord", "said", "unto", "him", "behold", "light", "waters", "earth", "God", "day."]
    lines, written = [], 0
    while written < n_words:
        length = rng.randint(6, 12)
        lines.append(" ".join(rng.choice(words) for _ in range(length)))
        written += length
    text = ("\n".join(lines) + "\n").encode()
    cut = len(text) - len(text) // 40  # inside the last 5%
    return text[:cut] + RARE + text[cut:]


def write_corpus(directory: Path, text: bytes, name: str = "small.txt") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(text)
    checksum_path(path).write_text(f"{hashlib.sha256(text).hexdigest()}  {name}\n")
    return path


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, bytes]:
    text = make_text()
    write_corpus(tmp_path, text)
    return tmp_path, text


def task_for(corpus, **kwargs) -> TextTask:
    directory, _ = corpus
    return TextTask(directory, file="small.txt", **{"seq_len": 16, "batch_size": 4, **kwargs})


# --- splits and vocabulary -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [40, 41, 59, 1000, 4_298_239, 100_000_000])
def test_splits_contiguous_disjoint_and_cover_the_file(n):
    bounds = split_bounds(n)
    assert bounds["train"][0] == 0 and bounds["test"][1] == n
    assert bounds["train"][1] == bounds["val"][0] and bounds["val"][1] == bounds["test"][0]
    assert bounds["val"][1] - bounds["val"][0] == bounds["test"][1] - bounds["test"][0] == n // 20
    assert sum(end - start for start, end in bounds.values()) == n
    if n == 100_000_000:  # enwik8's usual 90M / 5M / 5M
        assert bounds == {"train": (0, 90_000_000), "val": (90_000_000, 95_000_000), "test": (95_000_000, n)}


def test_task_split_is_the_file_by_position(corpus):
    _, text = corpus
    task = task_for(corpus)
    assert task.bounds == split_bounds(len(text))
    assert task.count("train") == task.bounds["train"][1] - 1  # all but position 0
    for split in ("val", "test"):
        assert task.count(split) == task.bounds[split][1] - task.bounds[split][0]


def test_vocabulary_from_training_split_with_unk(corpus):
    _, text = corpus
    task = task_for(corpus)
    train = text[: task.bounds["train"][1]]
    assert task.vocab == bytes(sorted(set(train)))
    assert task.vocab_size == len(set(train)) + 1 and task.unk == task.vocab_size - 1
    assert task.spec.input_size == task.spec.output_size == task.vocab_size and task.spec.readout == "all"
    assert RARE[0] not in task.vocab and task.unknown == {"train": 0, "val": 0, "test": 1}
    ids = task.encode(b"the#")
    assert ids[-1] == task.unk and task.decode(ids) == b"the?"
    assert task.decode(task.encode(train)) == train


def test_baseline_is_unigram_entropy_of_training_split(corpus):
    _, text = corpus
    task = task_for(corpus)
    counts = collections.Counter(text[: task.bounds["train"][1]])
    total = sum(counts.values())
    assert task.baseline == pytest.approx(-sum(c / total * math.log2(c / total) for c in counts.values()), rel=1e-12)
    assert task.metric_name == "bpc" and not task.higher_is_better


# --- evaluation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("rows", [1, 3, 7, 10_000])
def test_evaluation_predicts_every_character_exactly_once(corpus, split, rows):
    _, text = corpus
    task = task_for(corpus, seq_len=13)
    ids = task.encode(text)
    start, end = task.bounds[split]
    predicted = []
    windows = list(task.eval_windows(split, rows))
    for k, window in enumerate(windows):
        times = window.times()
        assert torch.equal(window.ids, ids[times.clamp(max=len(text) - 1)])  # input at t is the byte at offsets + t
        valid = window.y != IGNORE
        assert torch.equal(window.y[valid], ids[(times + 1).clamp(max=len(text) - 1)][valid])  # the next byte
        assert torch.all(window.reset == (k == 0))
        assert torch.all(window.offsets % 13 == 0)  # on the clock's grid
        predicted += (times + 1)[valid].tolist()
    flags = torch.cat([w.y != IGNORE for w in windows], dim=1).int()  # (rows, steps read)
    assert torch.all((flags[:, 1:] - flags[:, :-1]).abs().sum(dim=1) <= 2)  # each row predicts one run: its region
    assert sorted(predicted) == list(range(max(start, 1), end)) and len(predicted) == task.count(split)
    assert windows[0].ids.shape[0] == min(rows, task.count(split))
    # Rows are contiguous: row b's window k+1 continues where window k stopped.
    for before, after in zip(windows, windows[1:]):
        assert torch.equal(after.offsets, before.offsets + 13)


def test_clock_index_continues_with_global_position(corpus):
    task = task_for(corpus, seq_len=5)
    window = next(iter(task.eval_windows("val", 2)))
    start = task.bounds["val"][0]
    assert window.offsets[0] == (start - 1) // 5 * 5  # read from the grid point at or before the byte before the split
    assert torch.all(window.y[0, : start - 1 - window.offsets[0]] == IGNORE)  # the context is not predicted
    assert torch.equal(window.clock_index(7), (window.offsets.unsqueeze(1) + torch.arange(5)) % 7)


def test_bits_per_character_of_uniform_predictions_is_log2_v(corpus):
    task = task_for(corpus)
    V = task.vocab_size
    result = task.evaluate_split("val", 3, lambda w, state: (torch.zeros(*w.ids.shape, V), state))
    assert result["chars"] == task.count("val")
    assert result["bpc"] == pytest.approx(math.log2(V), rel=1e-6)
    assert result["ppl"] == pytest.approx(V, rel=1e-6) and result["xent"] == pytest.approx(math.log(V), rel=1e-6)
    x, y = next(task.eval_batches("val", 3))
    assert x.shape == (3, 16, V) and torch.all(x.sum(-1) == 1)
    assert task.metrics(torch.zeros(*y.shape, V), y)["bpc"] == pytest.approx(math.log2(V), rel=1e-6)


def test_bits_per_character_of_a_known_distribution_is_its_definition(corpus):
    """Predictions from a fixed distribution p: bpc = total nats / (ln 2 * characters) = mean -log2 p(y)."""
    _, text = corpus
    task = task_for(corpus)
    V = task.vocab_size
    p = torch.linspace(1, 3, V)  # a fixed, non-uniform distribution over the vocabulary
    p = p / p.sum()
    seen = []

    def step(window, state):
        assert (state is None) == bool(window.reset.all())  # the state is carried from the second window on
        seen.append(window.n_predicted)
        return p.log().expand(*window.ids.shape, V), "carried"

    result = task.evaluate_split("test", 4, step)
    start, end = task.bounds["test"]
    targets = task.encode(text)[start:end].numpy()
    expected_nats = float(-np.log(p.double().numpy())[targets].sum())
    assert sum(seen) == result["chars"] == end - start
    assert result["bpc"] == pytest.approx(expected_nats / (math.log(2) * (end - start)), rel=1e-6)
    assert result["ppl"] == pytest.approx(2 ** result["bpc"], rel=1e-9)


def test_loss_skips_padding(corpus):
    task = task_for(corpus)
    windows = list(task.eval_windows("val", 3))
    last = windows[-1]
    assert 0 < last.n_predicted < last.y.numel()
    output = torch.randn(*last.ids.shape, task.vocab_size)
    valid = last.y != IGNORE
    expected = torch.nn.functional.cross_entropy(output[valid], last.y[valid])
    assert task.loss(output, last.y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert task.metrics(output, last.y)["xent"] == pytest.approx(expected.item(), rel=1e-6)


# --- training stream -----------------------------------------------------------------------------------


def test_training_rows_read_their_own_contiguous_regions_and_wrap(corpus):
    _, text = corpus
    T, B = 16, 4
    task = task_for(corpus, seq_len=T, batch_size=B)
    ids = task.encode(text)
    per_epoch = task.windows_per_row
    assert per_epoch == (task.bounds["train"][1] - 1) // T // B  # the grid's full windows, shared out
    starts = torch.arange(B) * per_epoch * T  # row b's first input: region b of the grid
    windows = [task.next_window() for _ in range(per_epoch + 2)]
    for k, window in enumerate(windows[:per_epoch]):
        assert torch.equal(window.offsets, starts + k * T)
        assert torch.all(window.clock_index(T) == torch.arange(T))  # every window starts at phase 0
        assert torch.equal(window.ids, ids[window.times()]) and torch.equal(window.y, ids[window.times() + 1])
        assert bool(window.reset.all()) == (k == 0) and bool(window.reset.any()) == (k == 0)
        assert torch.all(window.times()[:, -1] + 1 < task.bounds["train"][1])  # targets stay in the training split
    assert torch.all(windows[per_epoch - 1].times()[:-1, -1] + 1 == starts[1:])  # regions are contiguous
    wrapped = windows[per_epoch]
    assert wrapped.reset.all() and torch.equal(wrapped.offsets, starts)  # every epoch reads the same windows
    assert torch.equal(windows[per_epoch + 1].offsets, wrapped.offsets + T)
    assert task.state_dict()["epoch"] == 1
    x, y = task.train_batch(B)
    assert x.shape == (B, T, task.vocab_size) and y.shape == (B, T) and torch.all(y != IGNORE)
    with pytest.raises(ValueError):
        task.train_batch(B + 1)


@pytest.mark.parametrize("k", [0, 3, 64, 65, 66, 140])  # an epoch is 65 windows: saved before, at and after a wrap
def test_stream_state_round_trips_exactly(corpus, k):
    task = task_for(corpus)
    assert task.windows_per_row == 65
    for _ in range(k):
        task.next_window()
    state = json.loads(json.dumps(task.state_dict()))  # plain ints, as a checkpoint stores them
    assert all(type(v) is int for v in state.values())
    expected = [task.next_window() for _ in range(140)]  # crosses at least one more wrap
    fresh = task_for(corpus)
    fresh.load_state_dict(state)
    for a, b in zip(expected, (fresh.next_window() for _ in range(140)), strict=True):
        for field in ("ids", "y", "offsets", "reset"):
            assert torch.equal(getattr(a, field), getattr(b, field))


def test_stream_state_refuses_another_layout(corpus):
    state = task_for(corpus, batch_size=4).state_dict()
    with pytest.raises(ValueError):
        task_for(corpus, batch_size=3).load_state_dict(state)


def test_span_windows_predict_their_span_only_and_stay_on_the_grid(corpus):
    task = task_for(corpus, seq_len=10)
    starts, ends = torch.tensor([1, 37, 100]), torch.tensor([5, 61, 101])
    predicted = {b: [] for b in range(3)}
    for window in task.span_windows(starts, ends):
        assert torch.all(window.offsets % 10 == 0)
        for b in range(3):
            predicted[b] += (window.times()[b] + 1)[window.y[b] != IGNORE].tolist()
    assert [predicted[b] for b in range(3)] == [list(range(a, e)) for a, e in zip(starts.tolist(), ends.tolist())]


# --- verification -------------------------------------------------------------------------------


def one_line_user_error(excinfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_wrong_checksum_is_a_user_error(corpus):
    directory, text = corpus
    (directory / "small.txt").write_bytes(text[:-1] + b"!")
    with pytest.raises(UserError) as excinfo:
        task_for(corpus)
    one_line_user_error(excinfo, str(directory / "small.txt"), "make data", "sha256")


def test_missing_file_and_missing_checksum_are_user_errors(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_text(tmp_path / "kjv.txt")
    one_line_user_error(excinfo, str(tmp_path / "kjv.txt"), "make data")
    (tmp_path / "kjv.txt").write_bytes(b"some text")
    with pytest.raises(UserError) as excinfo:
        load_text(tmp_path / "kjv.txt")
    one_line_user_error(excinfo, str(tmp_path / "kjv.sha256"), "make data")
    (tmp_path / "kjv.sha256").write_text("not a checksum\n")
    with pytest.raises(UserError) as excinfo:
        load_text(tmp_path / "kjv.txt")
    one_line_user_error(excinfo, str(tmp_path / "kjv.sha256"), "make data")


def test_too_short_text_is_a_user_error(tmp_path):
    write_corpus(tmp_path, make_text(40), "small.txt")
    with pytest.raises(UserError) as excinfo:
        TextTask(tmp_path, file="small.txt", seq_len=256, batch_size=32)
    one_line_user_error(excinfo, "seq_len=256")


# --- the corpus script -------------------------------------------------------------------------------


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_fetch_script_text_option_writes_file_checksum_and_manifest(tmp_path):
    text = make_text()
    source = tmp_path / "input.txt"
    source.write_bytes(text)
    result = run_script("--text", str(source), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    target = tmp_path / "data" / "input.txt"
    assert target.read_bytes() == text
    digest = hashlib.sha256(text).hexdigest()
    assert (tmp_path / "data" / "input.sha256").read_text() == f"{digest}  input.txt\n"
    manifest = json.loads((tmp_path / "data" / "input.json").read_text())
    assert manifest["bytes"] == len(text) and manifest["sha256"] == digest
    assert set(manifest["reference_bpc"]) == {"gzip -9", "xz -9e", "bzip2 -9"}
    for line in manifest["reference_bpc"].values():
        assert line["bpc"] == pytest.approx(8 * line["bytes"] / len(text), abs=1e-4)
    assert load_text(target) == text  # the task accepts what the script wrote
    assert TextTask(tmp_path / "data", file="input.txt", seq_len=16, batch_size=4).n == len(text)
    renamed = run_script("--text", str(source), "--data-dir", str(tmp_path / "data"), "--out", "mine.txt",
                         "--no-reference")
    assert renamed.returncode == 0 and load_text(tmp_path / "data" / "mine.txt") == text
    assert "reference_bpc" not in json.loads((tmp_path / "data" / "mine.json").read_text())


def test_fetch_script_without_apt_says_so_in_one_line(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_script("--data-dir", str(tmp_path / "data"), env={"PATH": str(empty)})
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert "apt-get" in result.stderr and "--text FILE" in result.stderr
    assert not (tmp_path / "data").exists()


def test_fetch_script_rejects_a_missing_text_file(tmp_path):
    result = run_script("--text", str(tmp_path / "nope.txt"), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


# --- the real corpus, where `make data` made it ------------------------------------------------------


@pytest.mark.skipif(not (ROOT / "data" / "kjv.txt").exists(), reason="data/kjv.txt not fetched")
def test_kjv_corpus_when_present():
    task = TextTask(ROOT / "data", seq_len=256, batch_size=32)
    assert task.n == 4_298_239 and task.vocab_size == 74 and task.unknown == {"train": 0, "val": 0, "test": 0}
    assert task.bounds == {"train": (0, 3_868_417), "val": (3_868_417, 4_083_328), "test": (4_083_328, 4_298_239)}
    assert task.baseline == pytest.approx(4.4349, abs=1e-4)
