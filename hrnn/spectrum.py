"""The learned hierarchy in TensorBoard: spectrum and wave images, per-module clock scalars.

Images are built as arrays here (a small viridis-like colour map, rows scaled up
by repetition), so no plotting library is needed.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from hrnn.models.clock import Clock

# Anchor colours of viridis, interpolated linearly.
_VIRIDIS = np.array(
    [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
     [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]],
    dtype=np.float64,
)


def heatmap(matrix: np.ndarray, row_height: int = 8, max_width: int = 1024) -> np.ndarray:
    """(3, H, W) uint8 image of a 2-D array, each row `row_height` pixels tall, min-max scaled."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape[1] > max_width:  # keep images small: average columns into max_width bins
        edges = np.linspace(0, matrix.shape[1], max_width + 1).astype(int)
        matrix = np.stack([matrix[:, a:b].mean(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
    low, high = np.nanmin(matrix), np.nanmax(matrix)
    scaled = (matrix - low) / (high - low) if high > low else np.zeros_like(matrix)
    position = scaled * (len(_VIRIDIS) - 1)
    index = np.clip(np.floor(position).astype(int), 0, len(_VIRIDIS) - 2)
    frac = (position - index)[..., None]
    rgb = _VIRIDIS[index] * (1 - frac) + _VIRIDIS[index + 1] * frac  # (rows, cols, 3)
    rgb = np.repeat(rgb, row_height, axis=0)
    width_scale = max(1, 256 // rgb.shape[1])
    rgb = np.repeat(rgb, width_scale, axis=1)
    return rgb.round().astype(np.uint8).transpose(2, 0, 1)


def clock_summary(clock: Clock, steps: int) -> dict:
    """Plain numbers describing the hierarchy now: periods, duty, entropy, waves, spectrum."""
    with torch.no_grad():
        waves = clock.waves(steps).float().cpu()
        spectrum = clock.spectrum()
        entropy = clock.entropy()
    return {
        "periods": clock.periods(),
        "duty": waves.mean(dim=0).tolist(),
        "entropy": entropy.tolist() if entropy is not None else None,
        "waves": waves.t().numpy(),  # (M, T)
        "spectrum": spectrum.float().cpu().numpy() if spectrum is not None else None,  # (M, K)
    }


def log_clock(writer: SummaryWriter, clock: Clock, steps: int, global_step: int) -> dict:
    """Write images, histograms and clock/ scalars; return the summary for the console line."""
    summary = clock_summary(clock, steps)
    writer.add_image("clock/waves", heatmap(summary["waves"]), global_step)
    if summary["spectrum"] is not None:
        writer.add_image("clock/spectrum", heatmap(summary["spectrum"]), global_step)
    for name, param in clock.named_parameters():
        writer.add_histogram(f"clock/{name}", param.detach().float().cpu(), global_step)
    for module, period in enumerate(summary["periods"]):
        writer.add_scalar(f"clock/period/{module}", period, global_step)
        writer.add_scalar(f"clock/duty/{module}", summary["duty"][module], global_step)
        if summary["entropy"] is not None:
            writer.add_scalar(f"clock/entropy/{module}", summary["entropy"][module], global_step)
    return summary


def format_periods(periods: list[float]) -> str:
    """`1 2 4 8 17`: integers where the period is whole, one decimal otherwise."""
    return " ".join(f"{p:.0f}" if abs(p - round(p)) < 0.05 else f"{p:.1f}" for p in periods)
