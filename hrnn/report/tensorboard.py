"""Everything a run writes to TensorBoard.

- `log_scalars`: a group of scalars (train/, val/, test/) at a step.
- `log_structure`, at every evaluation: the clock (`log_clock`: the learned hierarchy as figures,
  hrnn/report/figures.py: waves, spectrum, hierarchy over training; matplotlib, the optional `figures`
  extra, or as plain heat-map images built here when matplotlib is missing; per-module clock
  scalars, histograms), the periods a timescales task's clock recovered, learned connectivity, and on a
  text task each module's activation over an excerpt of the text (`log_excerpt`, hrnn/report/text.py).
- `log_hparams`, at the end of every run: its hyperparameters and final metrics for the HPARAMS tab.
"""
from __future__ import annotations

import math
import typing
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from hrnn.config import registry
from hrnn.models.clock import Clock
from hrnn.report import figures, text

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
    """Plain numbers describing the hierarchy now: periods, duty, entropy, waves, spectrum and its components' periods."""
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
        "component_periods": (clock.component_periods.cpu().numpy() if hasattr(clock, "component_periods") else None),
    }


def log_clock(writer: SummaryWriter, clock: Clock, steps: int, global_step: int,
              history: list[dict[str, Any]]) -> dict:
    """Write figures (or plain images), histograms and clock/ scalars; return the summary for the console line.
    `history` holds the earlier evaluations' entries (with "step" and "periods") for the hierarchy figure."""
    summary = clock_summary(clock, steps)
    if figures.available():
        hierarchy = [(e["step"], e["periods"]) for e in history if "periods" in e]
        for name, fig in figures.clock_figures(summary, [*hierarchy, (global_step, summary["periods"])]).items():
            writer.add_figure(f"clock/{name}", fig, global_step)
    else:
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


def log_scalars(writer: SummaryWriter, prefix: str, values: dict[str, float], step: int) -> None:
    for name, value in values.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)


def log_structure(writer: SummaryWriter, model: Any, task: Any, step: int, history: list[dict[str, Any]],
                  entry: dict[str, Any]) -> str:
    """At an evaluation: the clock, the periods it recovered and learned connectivity, to TensorBoard
    and into the history `entry`; returns the console line's tail (the periods last)."""
    line = ""
    if model.clock is not None:
        summary = log_clock(writer, model.clock, task.spec.seq_len, step, history)
        entry["periods"] = [float(p) for p in summary["periods"]]
        entry["wave_periods"] = [float(p) for p in model.clock.wave_periods()]
        if hasattr(task, "recovered"):
            found, found_wave = log_recovery(writer, task, entry["periods"], entry["wave_periods"], step)
            entry["recovered"], entry["recovered_wave"] = len(found), len(found_wave)
            line += f" | recovered {len(found)}/{len(task.periods)} (wave {len(found_wave)})"
        line += f" | periods {format_periods(summary['periods'])}"
    connectivity = model.connectivity()
    if connectivity is not None:  # (M, M), row i reads column j: a square image and a matrix
        writer.add_image("model/connectivity", heatmap(connectivity, row_height=max(1, 256 // len(connectivity))), step)
        entry["connectivity"] = connectivity.tolist()
    thresholds = model.gate_thresholds()
    if thresholds is not None:
        for module, threshold in enumerate(thresholds):
            writer.add_scalar(f"gate/threshold/{module}", threshold, step)
        entry["gate_thresholds"] = thresholds
    if task.streams and text.has_modules(model):
        log_excerpt(writer, model, task, step)
    return line


def log_excerpt(writer: SummaryWriter, model: Any, task: Any, step: int) -> None:
    """Each module's activation over the text excerpt: the figure, or a plain heat map without matplotlib."""
    device = next(model.parameters()).device
    if figures.available():
        writer.add_figure("text/excerpt", text.excerpt_figure(model, task, device), step)
    else:
        writer.add_image("text/excerpt", heatmap(text.excerpt_activations(model, task, device)[1].numpy()), step)


def log_recovery(writer: SummaryWriter, task: Any, periods: list[float], wave_periods: list[float],
                 step: int) -> tuple[list[int], list[int]]:
    """The true periods found by the dominant and by the wave reading, logged under clock/."""
    found, found_wave = task.recovered(periods), task.recovered(wave_periods)
    writer.add_scalar("clock/recovered", len(found), step)
    writer.add_scalar("clock/recovered_wave", len(found_wave), step)
    return found, found_wave


def format_periods(periods: list[float]) -> str:
    """`1 2 4 8 17`: integers where the period is whole, one decimal otherwise."""
    return " ".join(figures.period_label(p) for p in periods)


# ----------------------------------------------------------------------------- HPARAMS tab

HPARAM_METRICS = ("val_metric", "test_metric", "baseline", "wall_s", "train_step_s", "params")


def hparam_types() -> dict[str, type]:
    """Every key any option of a group can have, with one type each (float or str), so every
    job of any sweep writes the same keys with the same types (TensorBoard takes the list of
    hyperparameters from one run's summary, so runs with other keys would lose columns)."""
    from hrnn.config.schema import schemas

    out: dict[str, type] = {}
    for group in registry.RUN_GROUPS:
        options = schemas(group)
        hints = [typing.get_type_hints(schema) for schema in options]
        names = dict.fromkeys(f.name for schema in options for f in fields(schema))
        for name in names:
            kinds = {h.get(name) for h in hints}
            if kinds and kinds <= {int, float}:
                out[f"{group}.{name}"] = float
            else:  # bool, optional, list, str, or absent from some option
                out[f"{group}.{name}"] = str
    return out


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The config as {"group.key": float | str}, the same keys and types for every run."""
    values = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, Any] = {}
    for key, kind in hparam_types().items():
        group, name = key.split(".", 1)
        present = isinstance(values.get(group), dict) and name in values[group]
        value = values[group][name] if present else None
        if kind is str:
            out[key] = "-" if not present else "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        else:
            out[key] = kind(value)
    return out


def log_hparams(writer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Write the hparams summary into this run's own event file (no sub-run), with the final metrics."""
    from torch.utils.tensorboard.summary import hparams

    values = {f"hparams/{k}": _number(metrics.get(k)) for k in HPARAM_METRICS}
    for summary in hparams(flat_hparams(cfg), values):
        writer.file_writer.add_summary(summary)
    for tag, value in values.items():
        writer.add_scalar(tag, value, metrics.get("steps", 0))
    writer.flush()


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
