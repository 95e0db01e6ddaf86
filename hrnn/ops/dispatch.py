"""The ops models call, and the one choice of what runs them: for each call, CUDA tensors go to the
Triton kernels (hrnn/ops/gpu.py), CPU tensors to the C++ kernels (hrnn/ops/cpu.py), and whatever
those do not take (a backend not installed or hidden, another dtype, a size the kernels refuse) to
the op's reference loop (hrnn/ops/reference.py), with the same results. One log line says which
path ran and why: on CUDA once per process for each distinct line, the CPU's fallback once per
process. The backends are imported on first use: the CPU one loads the compiled extension, the
CUDA one Triton.

    leaky_scan(u, w_h, waves, h0)                   the clock op for a precomputed u = W_x x_t + b
    leaky_rnn(x, w_x, b, w_h, waves, h0)            the same with the projection part of the op
    gated_leaky_rnn(x, w_x, b, w_h, h0, waves, ...) per-sample activations and an event gate
    chunker_leaky_rnn(...)                          the Chunker's gate (the reference loop everywhere)

Models call these and never loop over time themselves, so the kernels replace the loop, and
compute the projection inside it, behind one function each.

The CUDA kernels' per-step products run in the precision set_matmul_precision sets (a run sets
trainer.matmul_precision, conf/trainer/default.yaml); until one is set they are exact fp32
(ieee). CPU tensors always run exact fp32/fp64.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import Tensor

from hrnn.ops import reference

log = logging.getLogger(__name__)

MATMUL_PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16x3", "bf16")
_precision: str | None = None  # None: exact fp32 (ieee); set_matmul_precision sets the run's

# The path lines already logged, by key (the line itself; "cpu" for the CPU's fallback, said once
# per process whatever the reason). Clear it to hear them again.
said: set[str] = set()

GPU, CPU, REFERENCE = "gpu", "cpu", "reference"
_CUDA_PATHS = {"clock": ("the Triton kernels", "the pure PyTorch loop"),
               "gated": ("the gated Triton kernels", "the gated recurrence's PyTorch loop")}


class Availability:
    """Whether a backend's kernels can run: why they did not load, and why they are hidden for now."""

    def __init__(self, load_reason: str | None) -> None:
        self.load_reason = load_reason
        self.hidden: str | None = None

    def unavailable_reason(self) -> str | None:
        """Why the kernels are not used at all (None when they are)."""
        return self.hidden or self.load_reason

    def hide(self, reason: str | None) -> str | None:
        """Count the kernels as missing, for `reason`, until hide(None); returns the reason hidden before."""
        before, self.hidden = self.hidden, reason
        return before


def set_matmul_precision(name: str | None) -> None:
    """Precision of the recurrent products on CUDA (the Triton kernels): ieee (fp32 FMA), tf32,
    tf32x3 (three tf32 products, about fp32 accuracy), bf16x3 (three bf16 products of operands split
    into bf16 halves, within about 2^-16) or bf16 operands; None: exact fp32, as
    ieee. The state and every accumulation stay fp32 in all of them; CPU tensors always run exact
    fp32/fp64."""
    if name is not None and name not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision {name!r} is not allowed; allowed: {', '.join(MATMUL_PRECISIONS)}")
    global _precision
    _precision = name


def matmul_precision() -> str | None:
    """The precision set_matmul_precision set (None: none set, exact fp32)."""
    return _precision


def _kernel_precision() -> str:
    return _precision or "ieee"


def _backend(device: str):
    if device == "cuda":
        from hrnn.ops import gpu
        return gpu
    if device == "cpu":
        from hrnn.ops import cpu
        return cpu
    raise ValueError(f"device {device!r}: the kernels are for 'cpu' or 'cuda'")


@contextlib.contextmanager
def kernels_hidden(device: str, reason: str) -> Iterator[None]:
    """Within the block, `device`'s kernels ("cpu": the C++ ones, "cuda": Triton's) count as
    missing, for `reason` (said in the fallback's log line): the reference loop runs, as where
    they are not installed (a benchmark's baseline, a test of the fallback)."""
    backend = _backend(device)
    before = backend.hide(reason)
    try:
        yield
    finally:
        backend.hide(before)


def kernel_path(device: str = "cpu") -> str:
    """What the ops' tensors on `device` run when the kernels take them: on "cpu" the C++ kernels'
    capability (default, avx2, avx512), on "cuda" "triton"; "pytorch loop" where they are missing."""
    if device == "cpu":
        return _backend("cpu").kernel_path()
    return "triton" if _backend(device).unavailable_reason() is None else "pytorch loop"


def _say(key: str, line: str, level: int) -> None:
    if key not in said:
        said.add(key)
        log.log(level, line)


def cuda_path(op: str, reason: str | None) -> bool:
    """Logs, once per process and line, which path CUDA tensors of `op` ("clock" or "gated") take:
    the kernels when `reason` is None, else the loop and why. True for the kernels."""
    kernels, loop = _CUDA_PATHS[op]
    if reason is None:
        _say(f"hrnn: CUDA tensors run {kernels}", f"hrnn: CUDA tensors run {kernels}", logging.INFO)
    else:
        line = f"hrnn: CUDA tensors run {loop} (same results, slower): {reason}"
        _say(line, line, logging.WARNING)
    return reason is None


def cpu_path(reason: str | None) -> bool:
    """Logs, once per process, that CPU tensors run the reference loop and why (when `reason` is
    not None). True for the kernels."""
    if reason is not None:
        _say("cpu", f"hrnn: leaky_scan is using the pure PyTorch loop (same results, slower): {reason}",
             logging.WARNING)
    return reason is None


def choose(op: str, inputs: Tensor, w_h: Tensor, *others: Tensor | None, gate_h: Tensor | None = None) -> str:
    """GPU, CPU or REFERENCE: what runs `op` ("clock" or "gated") on these tensors (x or u first,
    W_h second, then the others; None entries are absent inputs), said in one log line (above)."""
    tensors = [t for t in (inputs, w_h, *others) if t is not None]
    if inputs.is_cuda:
        gpu = _backend("cuda")
        reason = gpu.gated_supports(*tensors[:2], gate_h, *tensors[2:]) if op == "gated" else gpu.supports(*tensors)
        return GPU if cuda_path(op, reason) else REFERENCE
    return CPU if cpu_path(_backend("cpu").supports(*tensors)) else REFERENCE


def leaky_scan(u: Tensor, w_h: Tensor, waves: Tensor, h0: Tensor, skip_inactive: bool | None = None,
               last_only: bool = False) -> Tensor:
    """All states of the clock op, (B, T, H); see reference.leaky_scan_reference for the arguments.

    skip_inactive (CPU kernels): compute only the modules active at each step (exact for any
    waves); None: for hard 0/1 waves that need no gradient; False forces the dense path.
    last_only: return only the final state, (B, H): the same values (and gradients) as
    `leaky_scan(...)[:, -1]`, but the backward never builds a (B, T, H) gradient that is
    zero everywhere except the last step (a 40 MB allocation per step at T = 784).
    """
    reference.check_scan(u.shape, w_h, waves, h0)
    path = choose("clock", u, w_h, waves, h0)
    if path == GPU:
        return _backend("cuda").leaky_scan(u, w_h, waves, h0, last_only, _kernel_precision())
    if path == CPU:
        cpu = _backend("cpu")
        skip = cpu.skips_by_default(waves) if skip_inactive is None else skip_inactive
        return cpu.leaky_scan(u, w_h, waves, h0, skip, last_only)
    return reference.leaky_scan_reference(u, w_h, waves, h0, last_only)


def leaky_rnn(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, waves: Tensor, h0: Tensor,
              skip_inactive: bool | None = None, last_only: bool = False) -> Tensor:
    """`leaky_scan(F.linear(x, w_x, bias), w_h, waves, h0, ...)`: the layer models call.

    x: (B, T, I) inputs, w_x: (H, I), bias: (H,) or None. The CPU kernels compute the projection
    inside the time loop (only for active modules on a hard clock) and its weight gradients inside
    the backward loop, so no (B, T, H) input projection is materialized; the CUDA kernels and the
    reference loop make it one product before the loop. Same values either way.
    """
    reference.check_projection(x, w_x, bias, w_h)
    reference.check_scan((x.shape[0], x.shape[1], w_h.shape[0]), w_h, waves, h0)
    path = choose("clock", x, w_h, w_x, waves, h0, bias)
    if path == GPU:
        return _backend("cuda").leaky_rnn(x, w_x, bias, w_h, waves, h0, last_only, _kernel_precision())
    if path == CPU:
        cpu = _backend("cpu")
        skip = cpu.skips_by_default(waves) if skip_inactive is None else skip_inactive
        return cpu.leaky_rnn(x, w_x, bias, w_h, waves, h0, skip, last_only)
    return reference.leaky_rnn_reference(x, w_x, bias, w_h, waves, h0, last_only)


def gated_leaky_rnn(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, h0: Tensor, waves: Tensor | None,
                    gate_x: Tensor | None, gate_bias: Tensor | None, gate_h: Tensor | None, gate_mode: str,
                    thresholds: Tensor | float, last_only: bool = False, support: float = 0.0) -> tuple[Tensor, Tensor]:
    """States (B, T, H), or the last (B, H) with last_only, and the activations (B, T, M) of the
    event-gated op; the arguments are reference.gated_leaky_rnn_reference's.

    The CPU kernels take x and the weights, and form x_t W_x^T + b (and the gate's x_t G_x^T + g_b)
    per step inside the loop, for the open pairs only; blocks of W_h that are all zero (learned
    connectivity's hard gates in evaluation, the slow-to-fast mask) are skipped in the forward's
    candidate products. The CUDA kernels need an event gate (waves alone run the clock op's).
    """
    reference.check_gated(x, w_h, h0, waves, gate_x, gate_bias, gate_h, gate_mode, support)
    args = (x, w_x, bias, w_h, h0, waves, gate_x, gate_bias, gate_h, gate_mode, thresholds, last_only)
    path = choose("gated", x, w_h, w_x, bias, h0, waves, gate_x, gate_bias, gate_h, gate_h=gate_h)
    if path == GPU:
        return _backend("cuda").gated_leaky_rnn(*args, _kernel_precision(), support=support)
    if path == CPU:
        return _backend("cpu").gated_leaky_rnn(*args, support=support)
    return reference.gated_leaky_rnn_reference(*args, support=support)


def chunker_leaky_rnn(x: Tensor, w_x: Tensor, bias: Tensor | None, w_h: Tensor, h0: Tensor, predict_w: Tensor,
                      predict_b: Tensor, log_threshold: Tensor, gate_mode: str, thresholds: Tensor | float,
                      last_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The Chunker's recurrence (reference.chunker_leaky_rnn_reference, with the last state only
    (B, H) if last_only). No kernel takes it yet: it is the reference loop on every device."""
    return reference.chunker_leaky_rnn_reference(x, w_x, bias, w_h, h0, predict_w, predict_b, log_threshold,
                                                 gate_mode, thresholds, last_only)
