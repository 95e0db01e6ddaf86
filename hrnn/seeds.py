"""Independent random streams: the training data, the validation set, the test set, the model.

Each stream's seed is derived from (stream name, user seed) through numpy's SeedSequence,
so no choice of seeds makes two streams coincide: trainer.seed equal to task.data_seed
still gives a training stream that shares nothing with the validation set.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

STREAMS = ("train", "val", "test", "model", "permutation")


def stream_seed(stream: str, seed: int) -> int:
    """A 64-bit seed for `stream`, a pure function of (stream, seed)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")
    sequence = np.random.SeedSequence(entropy=seed % 2**128, spawn_key=(zlib.crc32(stream.encode()),))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def generator(stream: str, seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(stream_seed(stream, seed))
    return g
