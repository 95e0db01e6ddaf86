"""The results study's tables (scripts/study/results.py): counts and steps computed from metrics.json files on disk."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from conftest import load_script

results = load_script("results", "study")
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
    model_cfg = {"name": model, "activation": "clock"} if model == "hrnn" else {"name": model}
    return {"model": model_cfg, "basis": {"name": basis}, "task": task, "trainer": {"seed": seed}}


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
    binary = rows["hrnn-binary clock"]
    assert (binary["seeds"], binary["finished"]) == (4, 3)
    assert binary["reached"] == 2  # seeds 0 and 1 end below 0.01
    assert binary["recovered_all"] == 2  # seeds 0 and 2 recovered both periods
    assert binary["solved"] == 1  # only seed 0 did both
    assert binary["recovered_counts"] == [2, 1, 2]
    assert binary["first_step_median"] == 250  # first below 0.01 at steps 300 and 200
    assert abs(binary["val_mean"] - (0.004 + 0.003 + 0.02) / 3) < 1e-12
    assert rows["lstm"]["recovered_all"] is None and rows["lstm"]["solved"] is None


def test_other_tasks_pool_seeds_and_time_the_threshold(tmp_path, capsys):
    """Seeds of one configuration make one row: mean ± std, how many reached the task's threshold,
    at which evaluation, and the wall time to it (recorded, or estimated from the run's mean rate)."""
    sweep = tmp_path / "study" / "adding"
    task = {"name": "adding", "seq_len": 200}

    def metrics(seed, test, history):
        return {"metric": "mse", "val_metric": test, "test_metric": test, "baseline": 1 / 6, "seed": seed,
                "test": {"mse": test, "update_fraction": 0.1 * (seed + 1)}, "steps": 1000, "train_step_s": 0.01,
                "wall_s": 20.0, "params": 1000, "history": history}

    event = {**config("hrnn", "dct", task, 0), "model": {"name": "hrnn", "activation": "event"}}
    write_job(sweep, "0_event", event, metrics(0, 0.004, [{"step": 500, "val_mse": 0.1, "wall_s": 9.0},
                                                          {"step": 1000, "val_mse": 0.004, "wall_s": 19.0}]))
    write_job(sweep, "1_event", {**event, "trainer": {"seed": 1}},
              metrics(1, 0.008, [{"step": 500, "val_mse": 0.008}, {"step": 1000, "val_mse": 0.009}]))
    lstm = {**config("lstm", "dct", task, 0), "model": {"name": "lstm", "hidden_size": 64}}
    write_job(sweep, "2_lstm", lstm, metrics(0, 0.16, [{"step": 1000, "val_mse": 0.16, "wall_s": 30.0}]))
    rows = {row["model"]: row for row in task_rows(read_study(tmp_path / "study"))}
    assert set(rows) == {"hrnn event", "lstm hidden 64"}
    row = rows["hrnn event"]
    assert row["seeds"] == [0, 1] and abs(row["test"][0] - 0.006) < 1e-12
    assert row["solved"] == 2 and row["first_steps"] == [1000, 500]
    assert row["wall_to_threshold"] == (19.0 + 500 * 20.0 / 1000) / 2  # recorded 19 s; estimated 10 s
    assert abs(row["update_fraction"] - 0.15) < 1e-12
    assert rows["lstm hidden 64"]["solved"] == 0 and rows["lstm hidden 64"]["wall_to_threshold"] is None
    assert main([str(tmp_path / "study")]) == 0
    out = capsys.readouterr().out
    assert "| adding | 200 | hrnn event | 0,1 | 1000 | mse 0.0060 ± 0.0028 | 0.0060 ± 0.0028 | 0.036 | 2/2 (mse < 0.01) | 1000, 500 | 14 |" in out
    assert "| adding | 200 | lstm hidden 64 | 0 | 1000 | mse 0.1600 | 0.1600 | 0.960 | 0/1 (mse < 0.01) | never | - |" in out
    assert "Every job finished." in out


def test_seeds_ended_by_a_wall_clock_budget_pool_into_one_row_with_their_step_range(tmp_path):
    sweep = tmp_path / "study" / "budget"
    task = {"name": "adding", "seq_len": 500}
    for seed, steps in ((0, 475), (1, 450), (2, 702)):
        cfg = {**config("lstm", "dct", task, seed), "trainer": {"seed": seed, "steps": 100000, "max_wall_s": 300.0}}
        write_job(sweep, f"{seed}_lstm", cfg, {"metric": "mse", "val_metric": 0.17, "test_metric": 0.15, "baseline": 1 / 6,
                                                "seed": seed, "steps": steps, "train_step_s": 0.6, "wall_s": 300.0,
                                                "params": 1000, "history": [{"step": 250, "val_mse": 0.17}]})
    (row,) = task_rows(read_study(tmp_path / "study"))
    assert row["model"] == "lstm wall budget s 300" and row["seeds"] == [0, 1, 2] and row["steps"] == "450-702"


def test_nested_sweeps_are_read(tmp_path):
    """clock_recipe/<change>/ sweeps (a multirun.yaml marks each) are found below the study's top level."""
    sweep = tmp_path / "study" / "clock_recipe" / "basis"
    metrics = {"metric": "mse", "val_metric": 0.1, "test_metric": 0.1, "baseline": 1 / 6, "seed": 0, "test": {},
               "steps": 10, "train_step_s": 0.01, "wall_s": 1.0, "params": 10}
    write_job(sweep, "0_binary", config("hrnn", "binary", {"name": "adding", "seq_len": 200}, 0), metrics)
    (sweep / "multirun.yaml").write_text("{}\n")
    jobs = read_study(tmp_path / "study")
    assert [(j["sweep"], j["name"]) for j in jobs] == [("clock_recipe/basis", "0_binary")]


def test_labels_name_the_clock_and_its_settings_off_default():
    assert model_label({"model": {"name": "lstm"}, "basis": {"name": "dct"}}) == "lstm"
    assert model_label({"model": {"name": "hrnn", "activation": "clock"}, "basis": {"name": "dct", "sharpness": 1.0},
                        "regularizer": {"name": "softmax", "entropy_weight": 0.0}}) == "hrnn-dct clock"
    assert model_label({"model": {"name": "hrnn"}, "basis": {"name": "dct"}}) == "hrnn-dct clock_event"  # the default, named
    clock = {"name": "hrnn", "activation": "clock"}
    assert model_label({"model": clock, "basis": {"name": "dct", "sharpness": 4.0},
                        "regularizer": {"name": "softmax", "entropy_weight": 0.01}}) == "hrnn-dct sharpness 4 entropy 0.01 clock"
    assert model_label({"model": clock, "basis": {"name": "binary"}, "regularizer": {"name": "l1"}}) == "hrnn-binary l1 clock"
    assert model_label({"model": clock, "basis": {"name": "period", "init": "random", "open_ratio": 0.3},
                        "regularizer": {"name": "softmax", "entropy_weight": 0.01}}) == "hrnn-period init random open 0.3 clock"
    assert model_label({"model": {"name": "hrnn", "activation": "clock", "connectivity": "learned"},
                        "basis": {"name": "dct"}, "optim": {"clock_lr": 0.0}}) == "hrnn-dct clock connectivity learned frozen clock connectivity_lr = lr"
    # the key's own default is not named; a run from before the key existed trained its gates at optim.lr
    assert model_label({"model": {"name": "hrnn", "activation": "event", "connectivity": "learned"}, "basis": {"name": "dct"},
                        "optim": {"connectivity_lr": 0.01}}) == "hrnn event connectivity learned"
    assert model_label({"model": {"name": "hrnn", "activation": "event"}, "basis": {"name": "dct"},
                        "optim": {"schedule": "cosine"}, "trainer": {"max_wall_s": 300.0}}) == "hrnn event lr cosine wall budget s 300"
    assert model_label({"model": {"name": "hrnn", "activation": "event", "gate": "hard"}, "basis": {"name": "dct", "sharpness": 4.0},
                        "optim": {"clock_lr": 0.0}}) == "hrnn event gate hard"  # no clock: basis and clock_lr unnamed
    assert model_label({"model": {"name": "hrnn", "activation": "event", "gate": "annealed", "gate_slope": 100.0},
                        "basis": {"name": "dct"}}) == "hrnn event gate annealed slope 100"
    assert model_label({"model": {"name": "hrnn", "activation": "event", "gate": "annealed", "gate_slope": 25.0},
                        "basis": {"name": "dct"}}) == "hrnn event gate annealed"  # the default slope


def test_first_step_below_and_missing_study_dir(tmp_path, capsys):
    history = [{"step": 100, "val_mse": 0.5}, {"step": 200, "val_mse": 0.005}, {"step": 300, "val_mse": 0.001}]
    assert first_step_below(history, "val_mse", 0.01) == 200
    assert first_step_below(history, "val_mse", 0.0001) is None
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "run scripts/study/study.sh first" in capsys.readouterr().err
