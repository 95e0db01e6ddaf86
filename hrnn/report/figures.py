"""Figures of the learned hierarchy a reader can read: labelled axes, module rows, periods in time steps.

Built on matplotlib's object API (no pyplot state), which is the optional `figures` extra
(`pip install -e .[figures]`); `available()` says whether it is installed. The same figures go to
TensorBoard at every evaluation (hrnn/report/tensorboard.py) and to PNG/PDF files
(`hrnn-eval <run dir> --figures`).
- waves: each module's activation a_m(t) as a heat map over time steps, rows labelled with the period;
- spectrum: each module's weight on every basis component against the component's period;
- hierarchy: each module's learned period at every evaluation so far, against the training step;
- excerpt (task=text): each module's activation at each character of a stretch of text, the characters
  on the time axis (hrnn/report/text.py), for the clock, the event gates or both.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

NAMES = ("waves", "spectrum", "hierarchy")


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def period_label(period: float) -> str:
    """`4` where the period is whole, `4.3` otherwise."""
    return f"{period:.0f}" if abs(period - round(period)) < 0.05 else f"{period:.1f}"


def module_labels(periods: list[float]) -> list[str]:
    return [f"module {m}: P={period_label(p)}" for m, p in enumerate(periods)]


def waves_figure(waves: np.ndarray, periods: list[float]):
    """(M, T) activations as a heat map: time step across, one labelled row per module, colour scale."""
    from matplotlib.figure import Figure

    n_modules, steps = waves.shape
    height = 1.2 + 0.35 * n_modules
    fig = Figure(figsize=(9, height))  # fixed margins throughout: a constrained layout doubles the drawing time
    fig.subplots_adjust(left=0.2, right=0.93, top=1 - 0.4 / height, bottom=0.6 / height)
    ax = fig.add_subplot()
    image = ax.imshow(waves, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0,
                      extent=(-0.5, steps - 0.5, n_modules - 0.5, -0.5))
    ax.set_yticks(range(n_modules), module_labels(periods))
    ax.set_xlabel("time step t")
    ax.set_ylabel("module (learned period)")
    ax.set_title("clock waves: activation of each module over the sequence")
    fig.colorbar(image, ax=ax, label="activation a_m(t)", fraction=0.05, pad=0.02)
    return fig


def spectrum_figure(spectrum: np.ndarray, component_periods: np.ndarray, periods: list[float]):
    """(M, K) weights against each component's period (log axis), one row per module labelled with its period."""
    from matplotlib.figure import Figure

    n_modules = spectrum.shape[0]
    height = 1.0 + 0.7 * n_modules
    fig = Figure(figsize=(9, height))
    fig.subplots_adjust(left=0.12, right=0.98, top=1 - 0.45 / height, bottom=0.55 / height, hspace=0.25)
    axes = fig.subplots(n_modules, 1, sharex=True, squeeze=False)[:, 0]
    for m, ax in enumerate(axes):
        ax.vlines(component_periods, 0.0, spectrum[m], color="tab:blue", linewidth=1.5)
        ax.plot(component_periods, spectrum[m], "o", color="tab:blue", markersize=2.5)
        ax.axvline(periods[m], color="tab:red", linestyle="--", linewidth=1)
        ax.set_ylabel(f"m{m}\nP={period_label(periods[m])}", rotation=0, ha="right", va="center")
        ax.set_ylim(bottom=0.0)
        ax.tick_params(axis="y", labelsize=7)
    _log2_axis(axes[0], "x")
    axes[0].set_title("clock spectrum: weight of each basis period per module (dashed: learned period)")
    axes[-1].set_xlabel("period (time steps)")
    return fig


def hierarchy_figure(steps: list[int], periods: list[list[float]]):
    """Each module's learned period (log axis) at every evaluation, against the training step."""
    from matplotlib.figure import Figure

    table = np.asarray(periods, dtype=float)  # (evaluations, M)
    fig = Figure(figsize=(8, 4.5))
    fig.subplots_adjust(left=0.1, right=0.82, top=0.92, bottom=0.12)
    ax = fig.add_subplot()
    for m in range(table.shape[1]):
        ax.plot(steps, table[:, m], marker="o", markersize=3, label=f"module {m}")
    _log2_axis(ax, "y")
    ax.set_xlabel("training step")
    ax.set_ylabel("learned period (time steps)")
    ax.set_title("learned hierarchy over training")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return fig


VISIBLE = {ord("\n"): "\u21b5", ord(" "): "\u00b7", ord("\t"): "\u2192"}  # newline, space, tab as marks


def excerpt_figure(activations: np.ndarray, characters: bytes, periods: list[float] | None, per_line: int = 100):
    """(M, L) activations over L characters of text as heat maps of `per_line` characters each, the characters
    themselves on the time axis (a space as a middle dot, a newline as a return arrow), one row per module."""
    from matplotlib.figure import Figure

    n_modules, length = activations.shape
    lines = max(1, -(-length // per_line))
    panel = 0.7 + 0.22 * n_modules
    fig = Figure(figsize=(0.12 * per_line + 1.8, panel * lines + 0.5))
    fig.subplots_adjust(left=1.5 / (0.12 * per_line + 1.8), right=0.98, top=1 - 0.4 / fig.get_figheight(),
                        bottom=0.3 / fig.get_figheight(), hspace=0.55)
    axes = fig.subplots(lines, 1, squeeze=False)[:, 0]
    labels = module_labels(periods) if periods is not None else [f"module {m}" for m in range(n_modules)]
    for line, ax in enumerate(axes):
        part = slice(line * per_line, min(length, (line + 1) * per_line))
        chunk = characters[part]
        ax.imshow(activations[:, part], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(chunk)), [VISIBLE.get(c, chr(c)) for c in chunk], fontsize=7, fontfamily="monospace")
        ax.tick_params(axis="x", length=0)
        ax.set_yticks(range(n_modules), labels, fontsize=7)
    axes[0].set_title("activation a_m of each module at each character (yellow 1: updates, purple 0: holds)")
    return fig


def _log2_axis(ax, which: str) -> None:
    """Log scale with ticks at 1, 2, 4, 8, ... written as plain numbers: periods read as time steps."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log", base=2)
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LogLocator(base=2))
    axis.set_major_formatter(FuncFormatter(lambda value, _: period_label(value)))
    axis.set_minor_formatter(NullFormatter())


def clock_figures(summary: dict[str, Any], hierarchy: list[tuple[int, list[float]]]) -> dict[str, Any]:
    """The figures of one clock summary (hrnn.report.tensorboard.clock_summary) and its period history."""
    figures = {"waves": waves_figure(summary["waves"], summary["periods"])}
    if summary["spectrum"] is not None:
        components = summary["component_periods"]
        if components is None:
            components = np.arange(1, summary["spectrum"].shape[1] + 1)
        figures["spectrum"] = spectrum_figure(summary["spectrum"], components, summary["periods"])
    if hierarchy:
        figures["hierarchy"] = hierarchy_figure([s for s, _ in hierarchy], [p for _, p in hierarchy])
    return figures


def save_figures(figures: dict[str, Any], out_dir: Path) -> list[Path]:
    """Each figure as <name>.png (150 dpi) and <name>.pdf in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        for suffix, options in ((".png", {"dpi": 150}), (".pdf", {})):
            path = out_dir / f"{name}{suffix}"
            fig.savefig(path, **options)
            written.append(path)
    return written
