"""Recurrent backbones: the clocked modular RNN (hrnn, cwrnn) and torch.nn baselines.

Every backbone maps x (B, T, I) to states (B, T, H), or with last_only=True to the final
state (B, H); the task's head reads them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hrnn.core import leaky_rnn
from hrnn.models.clock import Clock

CONNECTIVITY = ("full", "slow_to_fast")


def slow_to_fast_mask(hidden_size: int, n_modules: int) -> Tensor:
    """(H, H) mask for W_h: unit i (module m_i) may read unit j (module m_j) iff m_j >= m_i.

    Modules are ordered fast to slow (module 0 is the fastest), so a module reads
    itself and every slower module, never a faster one (Koutnik et al. 2014):
    the block upper-triangular form of W_h, which rows read, columns are read.
    """
    module = torch.arange(hidden_size) // (hidden_size // n_modules)
    return (module.unsqueeze(0) >= module.unsqueeze(1)).float()


class ClockedRNN(nn.Module):
    """M equal modules updated leakily by their clock's waves:

    h_t = a(t) * tanh(W_x x_t + W_h h_{t-1} + b) + (1 - a(t)) * h_{t-1}.
    """

    def __init__(self, input_size: int, hidden_size: int, clock: Clock, connectivity: str = "full") -> None:
        super().__init__()
        if hidden_size % clock.n_modules:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by n_modules={clock.n_modules}")
        self.hidden_size, self.n_modules, self.connectivity = hidden_size, clock.n_modules, connectivity
        self.clock = clock
        self.input = nn.Linear(input_size, hidden_size)  # W_x and b
        self.recurrent = nn.Parameter(torch.empty(hidden_size, hidden_size))  # W_h
        nn.init.xavier_uniform_(self.input.weight)
        nn.init.zeros_(self.input.bias)
        nn.init.orthogonal_(self.recurrent)
        mask = slow_to_fast_mask(hidden_size, clock.n_modules) if connectivity == "slow_to_fast" else None
        self.register_buffer("mask", mask, persistent=False)
        if mask is not None:
            with torch.no_grad():
                self.recurrent.mul_(mask)

    def recurrent_weight(self) -> Tensor:
        return self.recurrent if self.mask is None else self.recurrent * self.mask

    def forward(self, x: Tensor, h0: Tensor | None = None, last_only: bool = False) -> Tensor:
        batch, steps, _ = x.shape
        waves = self.clock.waves(steps).to(x.dtype)  # (T, M), once per forward pass
        if h0 is None:
            h0 = x.new_zeros(batch, self.hidden_size)
        # u_t = W_x x_t + b and the recurrence in one op (the projection fused into the kernels' loop).
        return leaky_rnn(x, self.input.weight, self.input.bias, self.recurrent_weight(), waves, h0,
                         last_only=last_only)


class TorchRNN(nn.Module):
    """torch.nn.LSTM / GRU / RNN (tanh): the fused baselines people would otherwise use."""

    LAYERS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

    def __init__(self, kind: str, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.rnn = self.LAYERS[kind](input_size, hidden_size, batch_first=True)

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        states = self.rnn(x)[0]
        return states[:, -1] if last_only else states


class SequenceModel(nn.Module):
    """Backbone plus a linear head, read at the last step or at every step as the task says."""

    def __init__(self, backbone: nn.Module, hidden_size: int, output_size: int, readout: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, output_size)
        self.readout = readout

    @property
    def clock(self) -> Clock | None:
        return getattr(self.backbone, "clock", None)

    def forward(self, x: Tensor) -> Tensor:
        # "last": ask for the final state only, so no (B, T, H) gradient is built for it.
        return self.head(self.backbone(x, last_only=self.readout == "last"))

    def penalty(self) -> Tensor:
        clock = self.clock
        return clock.penalty() if clock is not None else torch.zeros(())
