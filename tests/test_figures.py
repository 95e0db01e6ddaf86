"""The clock's figures: read back from a real event file and from hrnn-eval's PNG/PDF files, with
labelled axes, module rows labelled with their periods, and the plain images when matplotlib is missing."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, read_metrics, run_cli
from hrnn.report import figures
from hrnn.train.resume import load_checkpoint
from hrnn.cli.eval import evaluate_run
from hrnn.models import build_model
from hrnn.models.clock import BasisClock
from hrnn.tasks import build_task
from hrnn.report.tensorboard import clock_summary, log_clock
from torch.utils.tensorboard._utils import figure_to_image as render  # what SummaryWriter.add_figure draws with

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def clock_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("figures")
    run_cli(["task=adding", "task.seq_len=20", "basis=dct", "trainer.steps=6", "trainer.eval_every=3", *TINY,
             f"hydra.run.dir={cwd / 'run'}"], cwd=cwd)
    return cwd / "run"


def read_images(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    return events


def decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def model_at(state: dict):
    cfg = OmegaConf.create(state["config"])
    model = build_model(cfg, build_task(cfg.task, cfg.data_dir, cfg.trainer.seed).spec)
    model.load_state_dict(state["model"])
    return model, cfg


def test_event_file_holds_the_labelled_figures_at_every_evaluation(clock_run: Path) -> None:
    """clock/waves, clock/spectrum and clock/hierarchy at steps 3 and 6; the step-6 images are exactly
    the figures built from the step-6 checkpoint, whose axes and rows carry the labels."""
    events = read_images(clock_run)
    for tag in ("clock/waves", "clock/spectrum", "clock/hierarchy"):
        assert [e.step for e in events.Images(tag)] == [3, 6], tag
    state = load_checkpoint(clock_run / "checkpoints" / "last.pt")
    assert state["step"] == 6
    model, cfg = model_at(state)
    history = [(e["step"], e["periods"]) for e in state["history"]]
    assert [s for s, _ in history] == [3, 6]
    built = figures.clock_figures(clock_summary(model.clock, cfg.task.seq_len), history)
    for name, fig in built.items():
        logged = decode(events.Images(f"clock/{name}")[-1].encoded_image_string)
        assert np.array_equal(logged, render(fig).transpose(1, 2, 0)[..., :3]), name

    periods = model.clock.periods()
    labels = [f"module {m}: P={figures.period_label(p)}" for m, p in enumerate(periods)]
    waves = built["waves"].axes[0]
    assert waves.get_xlabel() == "time step t" and waves.get_ylabel() == "module (learned period)"
    assert [t.get_text() for t in waves.get_yticklabels()] == labels
    assert waves.images[0].get_array().shape == (4, 20)  # 4 modules x T = 20 time steps
    assert built["waves"].axes[1].get_ylabel() == "activation a_m(t)"  # the colour scale

    spectrum_axes = built["spectrum"].axes
    assert len(spectrum_axes) == 4
    assert [ax.get_ylabel() for ax in spectrum_axes] == [f"m{m}\nP={figures.period_label(p)}" for m, p in enumerate(periods)]
    assert spectrum_axes[-1].get_xlabel() == "period (time steps)" and spectrum_axes[0].get_xscale() == "log"
    components = model.clock.component_periods.numpy()
    for m, ax in enumerate(spectrum_axes):  # the stems stand at the components' periods, as tall as their weights
        x, y = ax.lines[0].get_data()
        assert np.array_equal(x, components) and np.allclose(y, model.clock.spectrum()[m].numpy())

    hierarchy = built["hierarchy"].axes[0]
    assert hierarchy.get_xlabel() == "training step" and hierarchy.get_ylabel() == "learned period (time steps)"
    assert [line.get_label() for line in hierarchy.lines] == [f"module {m}" for m in range(4)]
    for m, line in enumerate(hierarchy.lines):
        assert list(line.get_xdata()) == [3, 6] and list(line.get_ydata()) == [p[m] for _, p in history]


def test_hrnn_eval_figures_are_png_and_pdf(clock_run: Path) -> None:
    from matplotlib.image import imread

    result = evaluate_run(clock_run, "test", "best", {}, figures=True)
    out = clock_run / "figures"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{s}" for n in figures.NAMES for s in ("png", "pdf"))
    assert {str(p) for p in out.iterdir()} <= set(result["written"])
    state = load_checkpoint(clock_run / "checkpoints" / "best.pt")
    assert state["step"] == read_metrics(clock_run)["best_step"] == 6
    model, cfg = model_at(state)
    # best.pt is written before its own evaluation joins the history: the hierarchy ends at the checkpoint's step
    history = [(e["step"], e["periods"]) for e in state["history"]] + [(6, model.clock.periods())]
    built = figures.clock_figures(clock_summary(model.clock, cfg.task.seq_len), history)
    assert [list(line.get_xdata()) for line in built["hierarchy"].axes[0].lines][0] == [3, 6]
    for name, fig in built.items():
        image = imread(out / f"{name}.png")
        width, height = fig.get_size_inches() * 150
        assert image.shape[:2] == (round(height), round(width)), name
        expected = io.BytesIO()
        fig.savefig(expected, format="png", dpi=150)
        expected.seek(0)
        assert np.array_equal(image, imread(expected)), name  # the file is this labelled figure
        assert image[..., :3].std() > 0.05  # drawn, not blank
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")


def test_without_matplotlib_the_plain_images_are_logged(tmp_path: Path, monkeypatch) -> None:
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setattr(figures, "available", lambda: False)
    clock = BasisClock("binary", size=20, n_modules=4, seq_len=20, regularizer="softmax", init="spread",
                       init_weight=0.8, sharpness=1.0, temperature=1.0, entropy_weight=0.0, learn_phase=False,
                       start_periods=None)
    writer = SummaryWriter(log_dir=str(tmp_path))
    summary = log_clock(writer, clock, 20, 5, history=[])
    writer.close()
    events = read_images(tmp_path)
    assert set(events.Tags()["images"]) == {"clock/waves", "clock/spectrum"}  # no hierarchy: the scalars show it
    waves, spectrum = events.Images("clock/waves")[0], events.Images("clock/spectrum")[0]
    assert (waves.height, waves.width) == (4 * 8, 20 * (256 // 20))  # rows of 8 pixels, columns widened
    assert (spectrum.height, spectrum.width) == (4 * 8, 20 * (256 // 20))
    assert summary["periods"] == [1.0, 2.0, 4.0, 8.0]


def test_period_labels() -> None:
    assert [figures.period_label(p) for p in (1.0, 4.0, 6.66667, 12.98)] == ["1", "4", "6.7", "13"]
