"""Does the hierarchy find the text's events? Each module's update rate at word and verse boundaries.

A module's activation a_m at a step is how much it updates there (h = a tanh(...) + (1 - a) h_prev):
1 rewrites it, 0 holds it. The step that reads the character at position p is "at p". Classes of steps:

  word_start   c[p] is a letter and c[p-1] whitespace or punctuation: the step after a space or
               punctuation mark, where a word begins (an apostrophe counts as punctuation)
  inside_word  c[p] and c[p-1] are both letters
  verse_start  c[p] is the first digit of a verse number: the KJV prints each verse on a new line as
               two spaces, the number and a space ("\\n  14 And he said"); other texts have none
  overall      every step

A module's rate for a class is its mean activation over the class's steps; `ratio` is that rate over its
overall rate (above 1: it updates more often there than elsewhere). A hierarchy that found words would
show a slow module with word_start well above 1 and inside_word below; one that found verses, verse_start.
The steps are those of a split read as evaluation reads it (state carried, every input character once):
the validation split at the end of a run (boundary_rates.json), the split asked for by `hrnn-eval --figures`.

The excerpt figure shows every module's activation over EXCERPT_LENGTH characters of the validation split,
the characters on the time axis: from its first verse start after EXCERPT_CONTEXT windows (the start of
the split plus that context when it has none), read from the split's start with the state carried. It goes
to TensorBoard at every evaluation (text/excerpt) and to excerpt.png at the end of a run.

Works for every ClockedRNN: the learned clock (its (T, M) waves are the same for every row), the event
gates and their product (per sample); an LSTM or GRU has no modules, so there is no report.
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hrnn.report import figures
from hrnn.tasks.text import IGNORE
from hrnn.train.stream import carried_step, evaluate_stream

CLASSES = ("overall", "word_start", "inside_word", "verse_start")
VERSE = re.compile(rb"\n  (\d)")  # the first digit of a verse number at a line start
EXCERPT_LENGTH = 200
EXCERPT_CONTEXT = 4  # windows of seq_len read before the excerpt, at least


def _byte_table(characters: str) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(characters.encode())] = True
    return table


LETTERS = _byte_table(string.ascii_letters)
SEPARATORS = _byte_table(string.whitespace + string.punctuation)


def step_classes(text: bytes, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks over `positions` (the global positions of the steps' input characters), one per class."""
    data = np.frombuffer(text, dtype=np.uint8)
    current, before = data[positions], data[np.maximum(positions - 1, 0)]
    first = positions == 0  # no character before it: neither a word start nor inside a word
    verse = np.zeros(len(data), dtype=bool)
    verse[[match.start(1) for match in VERSE.finditer(text)]] = True
    return {"overall": np.ones(len(positions), dtype=bool),
            "word_start": LETTERS[current] & SEPARATORS[before] & ~first,
            "inside_word": LETTERS[current] & LETTERS[before] & ~first,
            "verse_start": verse[positions]}


def boundary_rates(text: bytes, positions: Tensor, activations: Tensor) -> dict[str, Any]:
    """Each module's mean activation per class of steps (module docstring), the steps each class has, and
    each rate over the module's overall rate; a class without steps has rates and ratios None."""
    activations = activations.double()
    masks = step_classes(text, positions.numpy())
    rates, steps = {}, {}
    for name, mask in masks.items():
        selected = activations[torch.from_numpy(mask)]
        steps[name] = len(selected)
        rates[name] = selected.mean(dim=0).tolist() if len(selected) else None
    overall = rates["overall"]
    ratio = {name: None if rates[name] is None else [r / o if o > 0 else None for r, o in zip(rates[name], overall)]
             for name in CLASSES if name != "overall"}
    return {"modules": activations.shape[1], "rates": rates, "ratio": ratio, "steps": steps}


def has_modules(model: torch.nn.Module) -> bool:
    """Whether the model has per-module activations to report (a ClockedRNN, not an LSTM or GRU)."""
    return hasattr(model.backbone, "activations")


def _per_row(model: torch.nn.Module, rows: int) -> Tensor:
    """The last pass's activations as (B, T, M) on the CPU: a clock's (T, M) waves are every row's."""
    activations = model.activations().detach().float().cpu()
    return activations.expand(rows, *activations.shape) if activations.dim() == 2 else activations


def split_activations(model: torch.nn.Module, task: Any, split: str, batch_size: int,
                      device: torch.device) -> tuple[Tensor, Tensor, dict[str, float]]:
    """(positions (N,), activations (N, M)) of every step of `split` that predicts a character of it, read as
    evaluation reads it, so each input character once; and the evaluation's metrics."""
    positions, activations = [], []

    def collect(window: Any, output: Tensor) -> None:
        predicts = window.y != IGNORE
        positions.append(window.times()[predicts])
        activations.append(_per_row(model, len(window.ids))[predicts])

    metrics = evaluate_stream(model, task, split, batch_size, device, collect)
    return torch.cat(positions), torch.cat(activations), metrics


def excerpt_span(task: Any) -> tuple[int, int]:
    """(first, length): the excerpt reads the characters [first, first + length) of the validation split."""
    start, end = task.bounds["val"]
    length = min(EXCERPT_LENGTH, end - start)
    earliest = max(start, min(start + EXCERPT_CONTEXT * task.seq_len, end - length))
    match = VERSE.search(task.characters(earliest, end))
    verse = earliest + match.start(1) if match is not None else end
    return (verse if verse + length <= end else earliest), length


@torch.no_grad()
def excerpt_activations(model: torch.nn.Module, task: Any, device: torch.device) -> tuple[bytes, Tensor]:
    """The excerpt's characters and each module's activation at them, (M, length), read from the start of
    the validation split with the state carried."""
    model.eval()
    first, length = excerpt_span(task)
    step, state, kept = carried_step(model, device), None, []
    for window in task.span_windows(torch.tensor([task.bounds["val"][0]]), torch.tensor([first + length + 1])):
        _, state = step(window, state)
        times = window.times()[0]
        kept.append(_per_row(model, 1)[0][(times >= first) & (times < first + length)])
    return task.characters(first, first + length), torch.cat(kept).t()


def excerpt_figure(model: torch.nn.Module, task: Any, device: torch.device) -> Any:
    """The excerpt as a matplotlib figure, module rows labelled with their periods where there is a clock."""
    characters, activations = excerpt_activations(model, task, device)
    periods = model.clock.periods() if model.clock is not None else None
    return figures.excerpt_figure(activations.numpy(), characters, periods)


def write_text_report(model: torch.nn.Module, task: Any, out_dir: Path, split: str, batch_size: int,
                      device: torch.device) -> dict[str, Any]:
    """boundary_rates.json (of `split`) and excerpt.png (matplotlib) in out_dir, for a text task and a model
    with modules; returns the rates and the files' names for metrics.json, {} when there is nothing to report."""
    if not (task.streams and has_modules(model)):
        return {}
    positions, activations, _ = split_activations(model, task, split, batch_size, device)
    rates = {"split": split, **boundary_rates(task.characters(), positions, activations)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "boundary_rates.json").write_text(json.dumps(rates, indent=2) + "\n")
    written = ["boundary_rates.json"]
    if figures.available():
        excerpt_figure(model, task, device).savefig(out_dir / "excerpt.png", dpi=150)
        written.append("excerpt.png")
    return {"boundary_rates": rates, "text_report": written}
