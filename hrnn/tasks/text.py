"""Character-level language modelling on one text file, with the state carried across windows.

As in char-rnn and truncated backpropagation through time: the text is read in windows of
`seq_len` characters, each row of a batch reading its own contiguous stretch, and the model's
hidden state at the end of one window is the start of the next window of the same row
(detached in training). The task provides the windows, where each row starts a new stream
(`reset`), and the global position of every window (`offsets`); the runner keeps the state.

Corpus
  One file in the data directory, `data/kjv.txt` by default: the King James Bible as printed
  by Debian's bible-kjv 4.38 (4,298,239 bytes, ASCII, sha256 82fa5f37...b033ea), made by
  `make data` (scripts/data/fetch_text.py, which also takes your own text with --text FILE).
  Next to it, `<stem>.sha256` (`sha256sum` format) records its checksum; the file is
  verified before use, and a missing file, a missing checksum or a mismatch is a UserError.

Characters
  A character is a byte: the KJV (and tinyshakespeare) are ASCII, so byte = character; for
  UTF-8 text such as enwik8 the figures are per byte, that corpus's usual convention. The
  vocabulary is the sorted set of byte values occurring in the training split, ids 0..V-2 in
  byte order, plus one more id, UNK = V-1, for any byte of the validation or test split that
  never occurs in training (the KJV has none: all 73 of its bytes occur in training). UNK
  is always in the vocabulary, so V depends on the training split alone. Inputs are one-hot
  over V (TaskSpec.input_size = V), outputs V logits per step (output_size = V).

Split (fixed and deterministic; by position, the enwik8 convention of 90/5/5)
  n = file length, k = n // 20:  train = [0, n-2k),  val = [n-2k, n-k),  test = [n-k, n).
  The character at position p is predicted from the bytes before it (the input at that
  step is byte p-1); a split predicts the characters it contains. For the first character
  of val and test, the input is the last byte of the split before (conditioning only: the
  state still starts at zero there). Position 0 has no predecessor and is never predicted.
  So val and test predict every one of their characters, train all but its first.
  KJV: train = 3,868,417 bytes (Genesis 1:1 into Acts 22:13), val = 214,911 (from Acts
  22:13 into Colossians 1:16), test = 214,911 (from Colossians 1:16 to Revelation 22:21);
  V = 74 (73 bytes and UNK).

Windows (TextWindow)
  ids[b, t] = the byte at position offsets[b] + t (the input), y[b, t] = the byte at
  offsets[b] + t + 1 (its target), or IGNORE (-100) where a target lies outside what the
  row predicts (before its region in its first window, past its end in its last).
  `offsets[b]` is the global file position of the window's first input character, always
  a multiple of seq_len (see Clock). reset[b] says row b starts a new stream here: its
  state must be zeroed before this window, not carried.

Clock (the time axis of a learned clock on a stream)
  A character's time is its global position p in the file, and a clock's wave of length
  T = seq_len is read at p mod T: the character at position p is read at wave index
  p mod T, whatever row or window reads it. Every window starts at a multiple of T, so
  step t of every window is phase t, and a model's one shared (T, M) wave applies to
  every row unchanged (TextWindow.clock_index(T) is then arange(T) in every row). The
  price is a fixed window grid: the training stream has no random shift per epoch, and
  an evaluation row whose region starts off the grid reads the characters from the grid
  point before it as context, without predicting them.

Training stream
  The training inputs are cut into the J = (n_train - 1) // seq_len full windows of the
  grid, window j reading inputs [j T, (j + 1) T) and predicting [j T + 1, (j + 1) T + 1);
  row b of `batch_size` rows owns the W = J // batch_size consecutive windows
  [b W, (b + 1) W) and reads them front to back, the state carried. An epoch is W
  windows; then every row wraps to its region's start (reset True for every row on an
  epoch's first window). The J - W * batch_size windows left over and the last
  < seq_len characters are never read. No randomness: the stream's state is four ints,
  {"epoch", "window", "batch_size", "seq_len"}; restoring it gives the same next windows.

Evaluation
  A split's predicted characters (`count(split)`) are cut into B = min(eval_batch_size,
  count) contiguous regions (lengths differing by at most one), each read front to back in
  windows of seq_len on the grid with the state carried, from the grid point at or before
  its first input, with IGNORE outside the region: every character is predicted exactly
  once. B = 1 is the exact figure; each further row starts from a zero state mid-text,
  which costs a little. Bits per character is the full-split figure, total cross-entropy
  in nats / (ln 2 * predicted characters); perplexity is per character, 2 ** bpc.
  `evaluate_split` runs a step function over the split and sums them.

Baseline
  The unigram entropy of the training split in bits, -sum p log2 p over its byte
  frequencies: the bits per character of the best predictor that ignores context (KJV:
  4.4349; the training frequencies score 4.4591 on val and 4.4143 on test).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hrnn.errors import UserError
from hrnn.tasks.base import Task, TaskSpec
from hrnn.tasks.checksums import verified_bytes

FETCH_COMMAND = "make data"
DEFAULT_FILE = "kjv.txt"
IGNORE = -100  # target id of padded steps; F.cross_entropy(ignore_index=IGNORE) skips them
SPLITS = ("train", "val", "test")
HELD_OUT_PARTS = 20  # val and test are each n // 20 characters (5%)


def checksum_path(path: str | Path) -> Path:
    """Where a text's recorded SHA-256 lives: data/kjv.txt -> data/kjv.sha256."""
    return Path(path).with_suffix(".sha256")


def load_text(path: str | Path) -> bytes:
    """The file's bytes, verified against the SHA-256 recorded next to it (hrnn.tasks.checksums)."""
    path = Path(path)
    fix = f"run `{FETCH_COMMAND}` (or scripts/data/fetch_text.py --text FILE for your own text)"
    if not path.is_file():
        raise UserError(f"text corpus {path} not found; {fix}")
    return verified_bytes(path, checksum_path(path), fix)


def split_bounds(n: int) -> dict[str, tuple[int, int]]:
    """[start, end) of each split of a text of n characters: the last 5% test, the 5% before it validation."""
    k = n // HELD_OUT_PARTS
    return {"train": (0, n - 2 * k), "val": (n - 2 * k, n - k), "test": (n - k, n)}


def regions(first: int, end: int, rows: int) -> tuple[Tensor, Tensor]:
    """Cut [first, end) into `rows` contiguous pieces (starts, lengths); lengths differ by at most one, longer first."""
    quotient, remainder = divmod(end - first, rows)
    b = torch.arange(rows)
    return first + b * quotient + b.clamp(max=remainder), quotient + (b < remainder).long()


def unigram_entropy_bits(counts: Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log2()).sum())


@dataclass(frozen=True)
class TextWindow:
    """One window of every row: inputs, shifted targets, global positions and stream starts."""

    ids: Tensor  # (B, T) int64 input ids
    y: Tensor  # (B, T) int64 target ids; IGNORE where the row predicts nothing
    offsets: Tensor  # (B,) int64 global file position of ids[:, 0], a multiple of seq_len
    reset: Tensor  # (B,) bool: the row starts a new stream here (zero its state)
    vocab_size: int

    @property
    def x(self) -> Tensor:
        """(B, T, V) one-hot float inputs, the form the models read."""
        return F.one_hot(self.ids, self.vocab_size).float()

    @property
    def n_predicted(self) -> int:
        return int((self.y != IGNORE).sum())

    def times(self) -> Tensor:
        """(B, T) global position of each step's input character: offsets[b] + t."""
        return self.offsets.unsqueeze(1) + torch.arange(self.ids.shape[1])

    def clock_index(self, length: int) -> Tensor:
        """(B, T) where a wave of `length` steps is read: (offsets[b] + t) mod length, the input's global
        position; with length = seq_len, t in every row, as every window starts on the grid."""
        return self.times() % length


class CharTotals:
    """Sums cross-entropy (nats) and predicted characters over windows; IGNORE targets do not count."""

    def __init__(self) -> None:
        self.nats = 0.0
        self.count = 0

    def add(self, output: Tensor, target: Tensor) -> None:
        nats, count = char_nats(output, target)
        self.nats += nats
        self.count += count

    def result(self) -> dict[str, float]:
        return {**char_metrics(self.nats, self.count), "chars": self.count}


def char_nats(output: Tensor, target: Tensor) -> tuple[float, int]:
    """(total cross-entropy in nats, number of predicted characters) of (..., V) logits against (...) targets."""
    flat = target.reshape(-1)
    losses = F.cross_entropy(output.reshape(flat.numel(), -1).float(), flat, ignore_index=IGNORE, reduction="none")
    return float(losses.double().sum()), int((flat != IGNORE).sum())


def char_metrics(nats: float, count: int) -> dict[str, float]:
    """bpc = nats / (ln 2 * count); ppl (per character) = 2 ** bpc = e ** xent; xent in nats per character."""
    if count == 0:
        raise ValueError("no predicted characters")
    xent = nats / count
    return {"bpc": xent / math.log(2), "ppl": math.exp(xent), "xent": xent}


class TextTask(Task):
    """Character-level language modelling on `data_dir/file` (see the module docstring)."""

    metric_name = "bpc"
    higher_is_better = False
    streams = True  # windows of one text: the runner carries the state (hrnn/train/stream.py)

    def __init__(self, data_dir: str | Path, file: str = DEFAULT_FILE, seq_len: int = 256, batch_size: int = 32,
                 name: str = "text") -> None:
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"text task needs seq_len >= 1 and batch_size >= 1, got {seq_len} and {batch_size}")
        self.name = name
        self.path = Path(data_dir) / file
        data = np.frombuffer(load_text(self.path), dtype=np.uint8)
        self.n = len(data)
        self.bounds = split_bounds(self.n)
        train_start, train_end = self.bounds["train"]
        counts = torch.from_numpy(np.bincount(data[train_start:train_end], minlength=256))
        self.vocab = bytes(int(v) for v in torch.nonzero(counts).flatten())  # byte value of each id but UNK
        self.unk = len(self.vocab)
        self.vocab_size = len(self.vocab) + 1
        table = np.full(256, self.unk, dtype=np.int16)
        table[np.frombuffer(self.vocab, dtype=np.uint8)] = np.arange(len(self.vocab), dtype=np.int16)
        self._table = torch.from_numpy(table)
        self._ids = torch.from_numpy(table[data])  # (n,) int16: 2 bytes a character
        self.unknown = {split: int((self._ids[max(a, 1):b] == self.unk).sum()) for split, (a, b) in self.bounds.items()}
        self.spec = TaskSpec(input_size=self.vocab_size, output_size=self.vocab_size, seq_len=seq_len, readout="all")
        self.baseline = unigram_entropy_bits(counts)
        self.baseline_note = "unigram entropy of the training split in bits: the best context-free prediction"
        self.seq_len, self.batch_size = seq_len, batch_size
        self.windows_per_row = (train_end - 1) // seq_len // batch_size  # W: an epoch (see Training stream)
        if self.windows_per_row < 1:
            raise UserError(f"the training split of {self.path} ({train_end - train_start:,} characters) is too short "
                            f"for {batch_size} streams of seq_len={seq_len}; lower the batch size or seq_len")
        for split in ("val", "test"):
            if self.count(split) < 1:
                raise UserError(f"{self.path} ({self.n} characters) is too short for a {split} split; "
                                f"each held-out split is 5% of the file")
        self._epoch = 0
        self._window = 0  # the next window of this epoch

    # --- the text -------------------------------------------------------------------------

    def encode(self, data: bytes) -> Tensor:
        """int64 ids of some bytes (UNK for bytes outside the training vocabulary)."""
        return self._table[torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))].long()

    def decode(self, ids: Tensor) -> bytes:
        """Bytes of ids; UNK becomes '?'."""
        table = np.frombuffer(self.vocab + b"?", dtype=np.uint8)
        return table[ids.reshape(-1).long().numpy()].tobytes()

    def characters(self, start: int = 0, end: int | None = None) -> bytes:
        """The text's bytes [start, end) as the model sees them (a byte outside the vocabulary as '?')."""
        return self.decode(self._ids[start:end])

    def count(self, split: str) -> int:
        """How many characters a split predicts: all of val and test, all of train but position 0."""
        start, end = self.bounds[split]
        return end - max(start, 1)

    def _gather(self, first: Tensor) -> Tensor:
        """(B, T+1) ids from global positions first[b] .. first[b]+T (clamped to the file)."""
        index = (first.unsqueeze(1) + torch.arange(self.seq_len + 1)).clamp(max=self.n - 1)
        return self._ids[index].long()

    # --- training stream --------------------------------------------------------------------

    def next_window(self) -> TextWindow:
        """The training stream's next window of all `batch_size` rows (reset on each epoch's first)."""
        if self._window >= self.windows_per_row:
            self._epoch, self._window = self._epoch + 1, 0
        offsets = (torch.arange(self.batch_size) * self.windows_per_row + self._window) * self.seq_len
        chunk = self._gather(offsets)
        reset = torch.full((self.batch_size,), self._window == 0)
        self._window += 1
        return TextWindow(chunk[:, :-1], chunk[:, 1:], offsets, reset, self.vocab_size)

    def train_batch(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """(one-hot x, targets) of next_window(); the stream's layout fixes batch_size at construction."""
        if batch_size != self.batch_size:
            raise ValueError(f"the text stream was cut into {self.batch_size} rows, asked for {batch_size}")
        window = self.next_window()
        return window.x, window.y

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "window": self._window, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        layout = {key: int(state[key]) for key in ("batch_size", "seq_len")}
        if layout != {"batch_size": self.batch_size, "seq_len": self.seq_len}:
            raise ValueError(f"text stream state for {layout} cannot resume a stream with batch_size="
                             f"{self.batch_size}, seq_len={self.seq_len}")
        self._epoch, self._window = int(state["epoch"]), int(state["window"])

    # --- evaluation ---------------------------------------------------------------------------

    def eval_windows(self, split: str, batch_size: int) -> Iterator[TextWindow]:
        """The whole split in contiguous windows over min(batch_size, count) rows; each character predicted once."""
        start, end = self.bounds[split]
        rows = max(1, min(batch_size, self.count(split)))
        starts, lengths = regions(max(start, 1), end, rows)
        return self.span_windows(starts, starts + lengths)

    def span_windows(self, starts: Tensor, ends: Tensor) -> Iterator[TextWindow]:
        """Windows on the grid in which row b predicts the characters [starts[b], ends[b]) and no other
        (IGNORE elsewhere), read from the grid point at or before its first input, starts[b] - 1."""
        grid = (starts - 1) // self.seq_len * self.seq_len
        targets = torch.arange(1, self.seq_len + 1)
        for k in range(-(-int((ends - 1 - grid).max()) // self.seq_len)):
            offsets = grid + k * self.seq_len
            chunk = self._gather(offsets)
            position = offsets.unsqueeze(1) + targets
            outside = (position < starts.unsqueeze(1)) | (position >= ends.unsqueeze(1))
            reset = torch.full((len(starts),), k == 0)
            yield TextWindow(chunk[:, :-1], chunk[:, 1:].masked_fill(outside, IGNORE), offsets, reset, self.vocab_size)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(one-hot x, targets) of eval_windows, for callers that do not carry state."""
        for window in self.eval_windows(split, batch_size):
            yield window.x, window.y

    def evaluate_split(self, split: str, batch_size: int,
                       step: Callable[[TextWindow, Any], tuple[Tensor, Any]]) -> dict[str, float]:
        """Full-split bpc, ppl, xent and chars over the split's windows with the state carried.

        `step(window, state) -> (logits (B, T, V), state)`; state is None on the first window."""
        totals, state = CharTotals(), None
        for window in self.eval_windows(split, batch_size):
            output, state = step(window, state)
            totals.add(output, window.y)
        if totals.count != self.count(split):
            raise RuntimeError(f"evaluated {totals.count} characters of {split}, expected {self.count(split)}")
        return totals.result()

    # --- loss and metrics -----------------------------------------------------------------------

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy in nats per predicted character."""
        return F.cross_entropy(output.reshape(-1, self.vocab_size), target.reshape(-1), ignore_index=IGNORE)

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """bpc, ppl and xent of one batch (per predicted character; a padded batch's mean is over fewer)."""
        return char_metrics(*char_nats(output, target))
