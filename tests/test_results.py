"""The results study's tables (scripts/results.py): counts and steps computed from metrics.json files on disk."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from conftest import load_script

results = load_script("results")
first_step_below, main, model_label = results.first_step_below, results.main, results.model_label
read_study, task_rows, timescales_rows = results.read_study, results.task_rows, results.timescales_rows


def write_job(sweep: Path, name: str, config: dict, metrics: dict | None) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"trainer.seed={config['trainer']['seed']}"]), job / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps({"status": "finished", **metrics}))


def timescales_metrics(seed: int, val: float, recovered: int, curve: list[float]) -> dict:
    return {"metric": "mse", "val_metric": val, "test_metric": val, "baseline": 0.8333, "seed": seed,
            "periods": [4.0, 12.0], "true_periods": [4, 12], "recovered": recovered, "train_step_s": 0.02,
            "wall_s": 30.0 + seed, "params": 100, "steps": 1500,
            "history": [{"step": 100 * (i + 1), "val_mse": v} for i, v in enumerate(curve)]}


def config(model: str, basis: str, task: dict, seed: int) -> dict:
    return {"model": {"name": model}, "basis": {"name": basis}, "task": task, "trainer": {"seed": seed}}


def test_timescales_counts_seeds_that_reach_the_threshold_and_recover_every_period(tmp_path):
    sweep = tmp_path / "study" / "timescales"
    task = {"name": "timescales", "periods": [4, 12], "seq_len": 240}
    write_job(sweep, "0_seed0", config("hrnn", "binary", task, 0), timescales_metrics(0, 0.004, 2, [0.5, 0.02, 0.008]))
    write_job(sweep, "1_seed1", config("hrnn", "binary", task, 1), timescales_metrics(1, 0.003, 1, [0.5, 0.009, 0.003]))
    write_job(sweep, "2_seed2", config("hrnn", "binary", task, 2), timescales_metrics(2, 0.02, 2, [0.5, 0.3, 0.02]))
    write_job(sweep, "3_seed3", config("hrnn", "binary", task, 3), None)  # never finished
    lstm = timescales_metrics(0, 0.5, 0, [0.6, 0.5])
    del lstm["recovered"], lstm["periods"], lstm["true_periods"]
    write_job(sweep, "4_lstm", config("lstm", "dct", task, 0), lstm)

    jobs = read_study(tmp_path / "study")
    rows = {row["model"]: row for row in timescales_rows(jobs)}
    binary = rows["hrnn-binary"]
    assert (binary["seeds"], binary["finished"]) == (4, 3)
    assert binary["reached"] == 2  # seeds 0 and 1 end below 0.01
    assert binary["recovered_all"] == 2  # seeds 0 and 2 recovered both periods
    assert binary["solved"] == 1  # only seed 0 did both
    assert binary["recovered_counts"] == [2, 1, 2]
    assert binary["first_step_median"] == 250  # first below 0.01 at steps 300 and 200
    assert abs(binary["val_mean"] - (0.004 + 0.003 + 0.02) / 3) < 1e-12
    assert rows["lstm"]["recovered_all"] is None and rows["lstm"]["solved"] is None


def test_other_tasks_one_row_per_finished_job_with_the_ratio_to_baseline(tmp_path, capsys):
    sweep = tmp_path / "study" / "copy"
    metrics = {"metric": "xent", "val_metric": 0.1, "test_metric": 0.12, "baseline": 0.24, "seed": 0,
               "test": {"xent": 0.12, "recall_acc": 0.5}, "steps": 1000, "train_step_s": 0.01, "wall_s": 12.0,
               "params": 1000, "periods": [1.0, 2.0]}
    write_job(sweep, "0_copy", config("cwrnn", "dct", {"name": "copy", "seq_len": 100}, 0), metrics)
    rows = task_rows(read_study(tmp_path / "study"))
    assert len(rows) == 1 and rows[0]["model"] == "cwrnn" and rows[0]["T"] == 100
    assert main([str(tmp_path / "study")]) == 0
    out = capsys.readouterr().out
    assert "| copy | 100 | cwrnn | 0 | 1000 | xent 0.1000 | 0.1200 | 0.2400 | 0.500 | 0.500 |" in out
    assert "Every job finished." in out


def test_labels_name_the_clock_and_its_settings_off_default():
    assert model_label({"model": {"name": "lstm"}, "basis": {"name": "dct"}}) == "lstm"
    assert model_label({"model": {"name": "hrnn"}, "basis": {"name": "dct", "sharpness": 1.0},
                        "regularizer": {"name": "softmax", "entropy_weight": 0.0}}) == "hrnn-dct"
    assert model_label({"model": {"name": "hrnn"}, "basis": {"name": "dct", "sharpness": 4.0},
                        "regularizer": {"name": "softmax", "entropy_weight": 0.01}}) == "hrnn-dct sharpness 4 entropy 0.01"
    assert model_label({"model": {"name": "hrnn"}, "basis": {"name": "binary"}, "regularizer": {"name": "l1"}}) == "hrnn-binary l1"
    assert model_label({"model": {"name": "hrnn"}, "basis": {"name": "period", "init": "random", "open_ratio": 0.3},
                        "regularizer": {"name": "softmax", "entropy_weight": 0.01}}) == "hrnn-period init random open 0.3"


def test_first_step_below_and_missing_study_dir(tmp_path, capsys):
    history = [{"step": 100, "val_mse": 0.5}, {"step": 200, "val_mse": 0.005}, {"step": 300, "val_mse": 0.001}]
    assert first_step_below(history, "val_mse", 0.01) == 200
    assert first_step_below(history, "val_mse", 0.0001) is None
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "run scripts/study.sh first" in capsys.readouterr().err
