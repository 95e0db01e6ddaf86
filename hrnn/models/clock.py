"""Clocks: where each module's activation wave a_m(t) in [0, 1] comes from.

A learned clock holds coefficients c (K x M) over a fixed T x K basis B and maps
B @ c (or B @ softmax(c)) into [0, 1]. Learning happens in this coefficient
("frequency") domain because a period learned directly sits in local minima
wherever periods share multiples. Every clock can say each module's dominant
period in time steps: that list is the learned hierarchy.

Bases
  binary  column p-1 is 1 exactly where t % p == 0, periods p = 1..K.
  dct     column k is cos(2 pi k t / N), k = 0..K-1, N = the task's sequence length:
          the cosine half of the DFT. Unlike the common DCT-II it has no half-sample
          shift, so a column's peaks fall on ticks t = 0, N/k, 2N/k, ... Columns are
          orthogonal on t = 0..N-1 (squared norm N for k = 0 and k = N/2, else N/2).
          Column k has period N/k steps; k = 0 is the constant wave, active at every
          step, so its period is reported as 1. Beyond N the waves repeat (period N).
  logcos  column 0 is the constant; column j >= 1 is cos(2 pi t / 2^((j + 1) / 2)): periods 2, 2.83,
          4, 5.66, ... half an octave apart up to T. A coarse grid: about 2 log2 T columns where dct has
          T/2 + 1, each a distinct timescale rather than one of many neighbouring harmonics.

A cosine basis can also learn each module's phase (learn_phase): column k of module m becomes
cos(2 pi f_k (t - shift_m)), so the module's ticks move to t = shift_m + n * period.

Maps into [0, 1] (softmax weights w are non-negative and sum to 1)
  binary + softmax  a = B @ w           a convex mix of 0/1 columns
  dct + softmax     a = (1 + B @ w) / 2 a convex mix of cosines lies in [-1, 1]
  l1 or none        a = clip(B @ c, 0, 1)
then, for every map, clamp to [0, 1] (softmax mixes round just past 1) and raise to
`sharpness` (>= 1), which narrows peaks around ticks and leaves 0 and 1 where they are.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def binary_basis(steps: int, size: int) -> Tensor:
    """(steps, size): column p-1 is 1 exactly where t % p == 0."""
    t = torch.arange(steps).unsqueeze(1)
    p = torch.arange(1, size + 1).unsqueeze(0)
    return (t % p == 0).float()


def cosine_basis(steps: int, size: int, length: int) -> Tensor:
    """(steps, size): column k is cos(2 pi k t / length)."""
    t = torch.arange(steps, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    return torch.cos(2 * math.pi * k * t / length).float()


def log_cosine_size(steps: int) -> int:
    """The logcos columns up to period `steps`: the constant and every 2^((j + 1) / 2) <= steps, j >= 1."""
    return max(1, math.floor(2 * math.log2(steps) + 1e-9))


def spread_periods(n_modules: int, max_period: float) -> list[float]:
    """Clockwork-style starting hierarchy 1, 2, 4, ... capped at max_period."""
    return [min(2.0**m, max_period) for m in range(n_modules)]


def given_periods(start_periods, n_modules: int) -> list[float]:
    """basis.start_periods (any sequence, e.g. the config's list) as floats, one per module."""
    if len(start_periods) != n_modules:
        raise ValueError(f"{len(start_periods)} start periods for {n_modules} modules")
    return [float(p) for p in start_periods]


def random_periods(n_modules: int, max_period: float) -> list[float]:
    """Log-uniform on [1, max_period], sorted fast to slow; drawn from torch's global RNG (seeded)."""
    draws = torch.rand(n_modules).mul(math.log(max_period)).exp()
    return sorted(draws.tolist())


class Clock(nn.Module):
    """Interface shared by all clocks (learned or fixed)."""

    n_modules: int

    def waves(self, steps: int) -> Tensor:
        """(steps, M) activations in [0, 1]; computed once per forward pass."""
        raise NotImplementedError

    def periods(self) -> list[float]:
        """Each module's dominant period in time steps, in module order."""
        raise NotImplementedError

    def wave_periods(self) -> list[float]:
        """Each module's wave's own period: differs from `periods` only where a wave is a mix of harmonics."""
        return self.periods()

    def phases(self) -> list[float] | None:
        """Each module's learned shift in time steps; None for a clock without a learned phase."""
        return None

    def penalty(self) -> Tensor:
        """Regularization added to the training loss."""
        return torch.zeros(())

    def spectrum(self) -> Tensor | None:
        """(M, K) non-negative weight of each basis component, for display; None if not a spectrum."""
        return None

    def entropy(self) -> Tensor | None:
        """(M,) entropy of each module's normalised spectrum: 0 when one component dominates."""
        spectrum = self.spectrum()
        if spectrum is None:
            return None
        p = spectrum / spectrum.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return -(p * p.clamp_min(1e-12).log()).sum(dim=1)


class BasisClock(Clock):
    """Learned coefficients over a fixed basis (binary or cosine)."""

    def __init__(
        self,
        basis: str,
        size: int,
        n_modules: int,
        seq_len: int,
        regularizer: str,
        *,
        init: str,
        init_weight: float,
        sharpness: float,
        learn_phase: bool,
        start_periods: list[float] | None,
        temperature: float | None = None,
        entropy_weight: float | None = None,
        l1_weight: float | None = None,
    ) -> None:
        """start_periods (one per module, or None) replaces `init`'s starting hierarchy, each period going to
        its nearest basis component. The last three belong to one regularizer each (softmax: temperature and
        entropy_weight; l1: l1_weight); each is required by its regularizer and ignored by the others."""
        if regularizer == "softmax" and (temperature is None or entropy_weight is None):
            raise ValueError("the softmax regularizer needs temperature and entropy_weight")
        if regularizer == "l1" and l1_weight is None:
            raise ValueError("the l1 regularizer needs l1_weight")
        if learn_phase and basis == "binary":
            raise ValueError("a learned phase needs a cosine basis (dct or logcos)")
        super().__init__()
        self.basis, self.size, self.n_modules, self.length = basis, size, n_modules, seq_len
        self.sharpness = sharpness
        self.regularizer, self.temperature = regularizer, temperature
        self.entropy_weight, self.l1_weight = entropy_weight, l1_weight
        self.register_buffer("frequencies", self._frequencies(), persistent=False)  # unused by binary
        self.register_buffer("component_periods", self._component_periods(), persistent=False)
        self.register_buffer("matrix", self._matrix(seq_len), persistent=False)
        self.coefficients = nn.Parameter(self._init_coefficients(init, init_weight, start_periods))
        # Each module's shift in time steps; trained with the coefficients (optim.clock_lr).
        self.phase = nn.Parameter(torch.zeros(n_modules)) if learn_phase else None
        if learn_phase:
            self.register_buffer("sine_matrix", self._matrix(seq_len, sine=True), persistent=False)

    def _frequencies(self) -> Tensor:
        """(K,) float64 cycles per step of the cosine columns (0 for the constant)."""
        k = torch.arange(self.size, dtype=torch.float64)
        if self.basis == "dct":
            return k / self.length
        return torch.where(k == 0, torch.zeros_like(k), 2 ** (-(k + 1) / 2))

    def _matrix(self, steps: int, sine: bool = False) -> Tensor:
        if self.basis == "binary":
            return binary_basis(steps, self.size)
        if self.basis == "dct" and not sine:
            return cosine_basis(steps, self.size, self.length)
        angle = 2 * math.pi * torch.arange(steps, dtype=torch.float64).unsqueeze(1) * self.frequencies.double().cpu().unsqueeze(0)
        return (torch.sin(angle) if sine else torch.cos(angle)).float()

    def _component_periods(self) -> Tensor:
        k = torch.arange(self.size, dtype=torch.float64)
        if self.basis == "binary":
            return k + 1
        if self.basis == "dct":
            return torch.where(k == 0, torch.ones_like(k), self.length / k.clamp_min(1))
        return torch.where(k == 0, torch.ones_like(k), 2 ** ((k + 1) / 2))

    def _component_for_period(self, period: float) -> int:
        """The basis component whose period is nearest (in log scale) to `period`."""
        distance = (self.component_periods.log() - math.log(period)).abs()
        return int(distance.argmin())

    def _init_coefficients(self, init: str, init_weight: float, start_periods: list[float] | None) -> Tensor:
        coefficients = torch.zeros(self.size, self.n_modules)
        max_period = float(self.component_periods.max())
        if start_periods is not None:
            periods = given_periods(start_periods, self.n_modules)
        elif init == "uniform":
            return coefficients
        else:
            periods = spread_periods(self.n_modules, max_period) if init == "spread" else random_periods(self.n_modules, max_period)
        for module, period in enumerate(periods):
            k = self._component_for_period(period)
            if self.regularizer == "softmax":
                # Logit margin that gives component k softmax weight init_weight; a
                # uniform start would leave binary waves near zero (modules frozen).
                margin = math.log(init_weight / (1 - init_weight) * (self.size - 1)) if self.size > 1 else 0.0
                coefficients[k, module] = margin * self.temperature
            else:
                coefficients[k, module] = 1.0
        return coefficients

    def weights(self) -> Tensor:
        """(K, M) the mixing weights applied to the basis."""
        if self.regularizer == "softmax":
            return torch.softmax(self.coefficients / self.temperature, dim=0)
        return self.coefficients

    def waves(self, steps: int) -> Tensor:
        matrix = self.matrix if steps == self.matrix.shape[0] else self._matrix(steps).to(self.matrix)
        weights = self.weights()
        if self.phase is None:
            mixed = matrix @ weights
        else:  # cos(a - b) = cos a cos b + sin a sin b, with a = 2 pi f t and b = 2 pi f shift
            shift = 2 * math.pi * self.frequencies.to(weights).unsqueeze(1) * self.phase.unsqueeze(0)  # (K, M)
            sine = self.sine_matrix if steps == self.sine_matrix.shape[0] else self._matrix(steps, sine=True).to(matrix)
            mixed = matrix @ (weights * torch.cos(shift)) + sine @ (weights * torch.sin(shift))
        if self.regularizer == "softmax" and self.basis != "binary":
            mixed = (1 + mixed) / 2
        # Softmax mixes are in [0, 1] already, up to rounding; the clamp makes it exact.
        wave = mixed.clamp(0.0, 1.0)
        return wave if self.sharpness == 1 else wave**self.sharpness

    def penalty(self) -> Tensor:
        if self.regularizer == "l1":
            return self.l1_weight * self.coefficients.abs().sum()
        if self.regularizer == "softmax" and self.entropy_weight:
            p = self.weights()
            return self.entropy_weight * -(p * torch.log(p.clamp_min(1e-30))).sum(dim=0).mean()
        return torch.zeros((), device=self.coefficients.device)

    def phases(self) -> list[float] | None:
        return None if self.phase is None else self.phase.detach().tolist()

    def spectrum(self) -> Tensor:
        w = self.weights().detach()
        return (w if self.regularizer == "softmax" else w.abs()).t()

    def periods(self) -> list[float]:
        dominant = self.spectrum().argmax(dim=1)
        return [float(self.component_periods[k]) for k in dominant]

    def wave_periods(self, share: float = 0.5) -> list[float]:
        """Cosine basis: the fundamental period N / gcd(k) of the frequencies k holding at least
        `share` of the module's largest weight (k = 0, the constant, excepted; period 1 if it is alone).

        A cosine clock can build a pulse train of period P from P's harmonics N/P, 2N/P, ... with
        similar weights; its dominant component is then a harmonic (P/2, P/3) although the wave
        ticks every P steps. Binary: the dominant period (a union of tick sets has no one period).
        """
        if self.basis != "dct":
            return self.periods()
        spectrum = self.spectrum()
        result = []
        for weights in spectrum:
            significant = (weights >= share * weights.max()).nonzero().flatten().tolist()
            frequencies = [k for k in significant if k > 0]
            result.append(self.length / math.gcd(*frequencies) if frequencies else 1.0)
        return result


class PeriodClock(Clock):
    """The ablation: learn each module's period and phase directly (Phased LSTM style).

    Each module opens in a window of width open_ratio * period centred on its ticks
    t = shift + n * period (a triangle peaking at 1 on the tick) and leaks
    `leak` * (phase distance) when closed, so the period gets gradient (Neil et al. 2016).
    """

    def __init__(self, n_modules: int, seq_len: int, *, init: str, start_periods: list[float] | None, open_ratio: float,
                 leak: float) -> None:
        super().__init__()
        self.n_modules, self.open_ratio, self.leak = n_modules, open_ratio, leak
        max_period = float(seq_len)
        if start_periods is not None:
            periods = given_periods(start_periods, n_modules)
        elif init == "random":
            periods = random_periods(n_modules, max_period)
        elif init == "uniform":
            periods = [max_period ** 0.5] * n_modules
        else:
            periods = spread_periods(n_modules, max_period)
        self.log_period = nn.Parameter(torch.tensor(periods).log())
        self.shift = nn.Parameter(torch.zeros(n_modules))

    def waves(self, steps: int) -> Tensor:
        period = self.log_period.exp()
        t = torch.arange(steps, dtype=period.dtype, device=period.device).unsqueeze(1)
        phase = torch.remainder(t - self.shift, period) / period  # in [0, 1)
        distance = torch.minimum(phase, 1 - phase)  # to the nearest tick, in periods
        opening = (1 - 2 * distance / self.open_ratio).clamp(0.0, 1.0)
        return torch.where(opening > 0, opening, self.leak * distance)

    def periods(self) -> list[float]:
        return self.log_period.detach().exp().tolist()


class FixedClock(Clock):
    """Hard-set periods (the Clockwork RNN): module m is active exactly when t % period_m == 0."""

    def __init__(self, periods: list[int]) -> None:
        super().__init__()
        self.n_modules = len(periods)
        self.register_buffer("period_tensor", torch.tensor(periods), persistent=False)

    def waves(self, steps: int) -> Tensor:
        t = torch.arange(steps, device=self.period_tensor.device).unsqueeze(1)
        return (t % self.period_tensor == 0).float()

    def periods(self) -> list[float]:
        return [float(p) for p in self.period_tensor]
