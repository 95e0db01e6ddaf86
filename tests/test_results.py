"""The results study's tables (scripts/study/results.py): counts and steps computed from metrics.json files on disk."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def test_a_run_copied_into_a_second_sweep_is_read_once(tmp_path):
    """The same finished run in two sweep directories (copied so that a sweep skips it) is one seed, not two;
    a run with other metrics is not a copy."""
    metrics = {"metric": "mse", "val_metric": 0.1, "test_metric": 0.1, "baseline": 1 / 6, "seed": 0, "test": {},
               "steps": 10, "train_step_s": 0.01, "wall_s": 1.0, "params": 10}
    cfg = config("hrnn", "binary", {"name": "adding", "seq_len": 200}, 0)
    write_job(tmp_path / "study" / "a", "0_x", cfg, metrics)
    write_job(tmp_path / "study" / "b", "0_x", {**cfg, "extra": {"added_key": 0}}, metrics)  # a key added since
    write_job(tmp_path / "study" / "b", "1_x", cfg, {**metrics, "wall_s": 2.0})
    jobs = read_study(tmp_path / "study")
    assert [(j["sweep"], j["name"]) for j in jobs] == [("a", "0_x"), ("b", "1_x")]


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
    # a learned phase and a truncated gate's settings are named, so their runs do not pool with the default's
    assert model_label({"model": {"name": "hrnn"}, "basis": {"name": "dct", "learn_phase": True}}) == \
        "hrnn-dct learned phase clock_event"
    assert model_label({"model": {"name": "hrnn"}, "basis": {"name": "logcos", "learn_phase": False}}) == \
        "hrnn-logcos clock_event"
    assert model_label({"model": {"name": "hrnn", "activation": "event", "gate": "truncated", "gate_threshold": 0.3,
                                  "gate_support": 0.25}, "basis": {"name": "binary"}}) == \
        "hrnn event gate truncated threshold 0.3 support 0.25"
    # a baseline's layers and initialisation are named off its own model's defaults (conf/model/lstm.yaml:
    # one layer, chrono), so stacked or differently initialised runs do not pool with the preset's
    assert model_label({"model": {"name": "lstm", "num_layers": 1, "init": "chrono"}, "basis": {"name": "dct"}}) == "lstm"
    assert model_label({"model": {"name": "lstm", "hidden_size": 61, "num_layers": 2, "init": "forget1"},
                        "basis": {"name": "dct"}}) == "lstm hidden 61 layers 2 init forget1"
    assert model_label({"model": {"name": "gru", "num_layers": 2, "init": "default"}, "basis": {"name": "dct"}}) == "gru layers 2"


def test_a_run_from_before_the_wave_count_and_the_newer_basis_keys_gets_its_count_from_its_checkpoint(tmp_path):
    """metrics.json without recovered_wave and a stored config without basis.learn_phase and
    basis.start_periods (as hrnn wrote them before those existed): the count is rebuilt from the best
    checkpoint's clock and equals the one a current run records."""
    from conftest import compose_config
    from hrnn.train.loop import train

    run = tmp_path / "run"
    cfg = compose_config(["task=timescales", "task.periods=[2,7]", "basis=dct", "trainer.steps=4", "trainer.eval_every=2",
                          "model.hidden_size=8", "model.n_modules=2", "trainer.num_threads=1", "trainer.progress=false"])
    train(cfg, run)
    metrics = json.loads((run / "metrics.json").read_text())
    config = OmegaConf.to_container(cfg, resolve=True)
    recorded = metrics.pop("recovered_wave")
    for key in ("learn_phase", "start_periods"):
        config["basis"].pop(key)
    assert results.wave_recovered({"metrics": metrics, "config": config, "dir": str(run)}) == recorded


def test_first_step_below_and_missing_study_dir(tmp_path, capsys):
    history = [{"step": 100, "val_mse": 0.5}, {"step": 200, "val_mse": 0.005}, {"step": 300, "val_mse": 0.001}]
    assert first_step_below(history, "val_mse", 0.01) == 200
    assert first_step_below(history, "val_mse", 0.0001) is None
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "run scripts/study/study.sh first" in capsys.readouterr().err


# The summary table and the figures (docs/results.md): numbers against their definitions, on metrics.json
# files written here.

def adding_job(sweep: Path, name: str, activation: str, seed: int, metrics: dict | None, steps: int = 4000) -> Path:
    """A job of `hrnn-train -m trainer.seed=... model.activation=... task=adding` as Hydra leaves it."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    config = {"model": {"name": "hrnn", "activation": activation}, "basis": {"name": "dct"},
              "task": {"name": "adding", "seq_len": 200}, "trainer": {"seed": seed, "steps": steps}}
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    overrides = [f"trainer.seed={seed}", "task=adding", f"model.activation={activation}"]
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps({"status": "finished", **metrics}))
    return job


def adding_metrics(seed: int, test: float, curve: list[float], fraction: float, wall: float, periods: bool = False) -> dict:
    history = [{"step": 500 * (i + 1), "wall_s": wall * (i + 1) / len(curve), "val_mse": v,
                "val_update_fraction": fraction, **({"periods": [1.0 + i, 4.0]} if periods else {})}
               for i, v in enumerate(curve)]
    return {"metric": "mse", "higher_is_better": False, "val_metric": min(curve), "test_metric": test,
            "baseline": 1 / 6, "seed": seed, "test": {"mse": test, "update_fraction": fraction}, "params": 1234,
            "steps": 500 * len(curve), "wall_s": wall, "train_step_s": 0.01, "history": history}


def write_multirun(sweep: Path, overrides: list[str]) -> None:
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": overrides}}}), sweep / "multirun.yaml")


def test_sweep_values_split_outside_brackets_and_expand_to_every_job():
    assert results.split_sweep("clock_event,event,clock") == ["clock_event", "event", "clock"]
    assert results.split_sweep("[2,7,30]") == ["[2,7,30]"]
    jobs = results.expand(["trainer.seed=0,1,2", "task.periods=[2,7,30]", "model.activation=event,clock"])
    assert len(jobs) == 6 and all(j["task.periods"] == "[2,7,30]" for j in jobs)
    assert {(j["trainer.seed"], j["model.activation"]) for j in jobs} == {(s, a) for s in "012" for a in ("event", "clock")}
    command = results.commands({"ablation_timescales": results.ABLATION["ablation_timescales"]}, out="outputs/ablation")[0]
    assert command.startswith("hrnn-train -m hydra/launcher=joblib") and "'task.periods=[2,7,30]'" in command
    assert command.endswith("hydra.sweep.dir=outputs/ablation/ablation_timescales")


def test_summary_rows_pool_finished_seeds_and_count_the_rest(tmp_path):
    """Mean ± std over the finished seeds only, n their count; an unfinished job is running or stopped
    by how recently its files changed, a job the sweep has not begun is counted as not started, and a
    planned sweep with no directory is not run."""
    import statistics

    sweep = tmp_path / "ablation" / "adding200"
    tests = {0: 0.0008, 1: 0.0004, 2: 0.0012}
    for seed, test in tests.items():
        adding_job(sweep, f"{2 * seed}_event_{seed}", "event", seed,
                   adding_metrics(seed, test, [0.15, 0.01 * (seed + 1), test], 0.03 + 0.01 * seed, 400.0 + 10 * seed))
    adding_job(sweep, "1_clock_0", "clock", 0, adding_metrics(0, 0.156, [0.167, 0.167, 0.167], 0.5, 300.0))
    unfinished = adding_job(sweep, "3_clock_1", "clock", 1, None)
    (unfinished / "run.log").write_text("step 500/4000\n")
    write_multirun(sweep, ["trainer.seed=0,1,2", "task=adding", "model.activation=event,clock"])  # clock seed 2: not begun
    plan = {"adding200": ["trainer.seed=0,1,2", "task=adding", "model.activation=event,clock"],
            "adding1000": ["trainer.seed=0,1,2", "task=adding", "task.seq_len=1000", "model.activation=event"]}

    now = unfinished.joinpath("run.log").stat().st_mtime + 60
    rows = {(r["T"], r["model"]): r for r in results.summary_rows(results.planned_jobs(tmp_path / "ablation", plan, now=now))}
    event = rows[(200, "hrnn event")]
    assert event["n"] == 3 and event["seeds"] == [0, 1, 2] and event["jobs"] == 3
    assert event["test"] == (statistics.fmean(tests.values()), statistics.stdev(tests.values()))
    assert abs(event["update_fraction"][0] - 0.04) < 1e-12 and abs(event["wall_s"][0] - 410.0) < 1e-9
    assert event["solved"] == 3 and event["params"] == [1234] and event["steps"] == [1500]
    clock = rows[(200, "hrnn-dct clock")]
    assert (clock["n"], clock["jobs"], clock["running"], clock["not started"]) == (1, 3, 1, 1)
    assert clock["test"] == (0.156, None) and clock["solved"] == 0  # one seed: no std
    not_run = rows[(1000, "hrnn event")]
    assert (not_run["n"], not_run["jobs"], not_run["not started"]) == (0, 3, 3)

    table = results.format_summary(list(rows.values()))
    assert "| adding T = 200 | hrnn event | mse 0.0008 ± 0.0004 |" in table
    assert "| 3/3 (mse < 0.01) | 3 | 1,234 | 1,500 | 410 ± 10 | 0.040 ± 0.010 | 3/3 finished |" in table
    assert "| 1 (single seed) |" in table and "1/3 finished, 1 running, 1 not started |" in table
    assert table.rstrip().endswith("| not run |")

    later = results.planned_jobs(tmp_path / "ablation", plan, now=now + 2 * results.RUNNING_WITHIN_S)
    assert [j["status"] for j in later if j["name"] == "3_clock_1"] == ["stopped"]


def test_a_task_without_a_solved_bar_has_no_solved_count(tmp_path):
    """Text has no "solved": its rows say "-" there, not a count against adding's MSE bar."""
    sweep = tmp_path / "text"
    for seed, bpc in ((0, 1.93), (1, 1.95)):
        job = sweep / f"{seed}_gru"
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"model": {"name": "gru", "hidden_size": 108}, "basis": {"name": "dct"},
                                         "task": {"name": "text", "seq_len": 150}, "trainer": {"seed": seed}}),
                       job / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create([f"trainer.seed={seed}"]), job / ".hydra" / "overrides.yaml")
        (job / "metrics.json").write_text(json.dumps({
            "status": "finished", "metric": "bpc", "val_metric": bpc + 0.05, "test_metric": bpc, "baseline": 4.43,
            "seed": seed, "params": 67682, "steps": 20000, "wall_s": 1245.0, "train_step_s": 0.055,
            "history": [{"step": 1000, "val_bpc": 2.5, "val_mse": 0.001}]}))
    [row] = results.summary_rows(results.read_study(tmp_path))
    assert row["solved"] is None and row["n"] == 2 and row["model"] == "gru hidden 108"
    assert "| text T = 150 | gru hidden 108 | bpc 1.9400 ± 0.0141 | 1.9900 ± 0.0141 | - | 2 (two seeds) |" in \
        results.format_summary([row])


def test_curves_are_the_mean_and_std_over_seeds_at_the_evaluations_every_seed_has():
    a = adding_metrics(0, 0.001, [0.15, 0.02, 0.001], 0.03, 300.0)
    b = adding_metrics(1, 0.003, [0.16, 0.04, 0.003, 0.002], 0.05, 400.0)  # one more evaluation than a
    c = results.curve([a, b], "val_mse")
    assert c["n"] == 2 and c["steps"] == [500, 1000, 1500]
    assert c["mean"] == [0.155, 0.03, 0.002]
    assert abs(c["std"][1] - 0.02 / 2 ** 0.5) < 1e-12
    assert c["wall_s"] == [(100.0 + 100.0) / 2, (200.0 + 200.0) / 2, (300.0 + 300.0) / 2]
    assert results.curve([a], "val_mse")["std"] == [None, None, None]
    assert results.series_label("hrnn event", 3) == "hrnn event (n = 3 seeds)"
    assert results.series_label("lstm", 1) == "lstm (n = 1 seed)"


def test_figures_are_written_as_png_for_each_task(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the `figures` extra
    sweep = tmp_path / "ablation" / "adding200"
    for seed in (0, 1):
        adding_job(sweep, f"{seed}_clock_event_{seed}", "clock_event", seed,
                   adding_metrics(seed, 0.001, [0.15, 0.01, 0.001], 0.03, 300.0, periods=True))
        adding_job(sweep, f"{seed + 2}_event_{seed}", "event", seed, adding_metrics(seed, 0.002, [0.15, 0.02, 0.002], 0.05, 280.0))
    written = results.render_figures(results.planned_jobs(tmp_path / "ablation"), tmp_path / "figures")
    assert sorted(p.name for p in written) == ["curves_adding_T200.png", "periods_adding_T200.png",
                                              "update_fraction_adding_T200.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert main([str(tmp_path / "ablation"), "--summary", "--figures", str(tmp_path / "again")]) == 0
    out = capsys.readouterr()
    assert "| adding T = 200 | hrnn event | mse 0.0020 |" not in out.out  # two seeds: a std is shown
    assert "| adding T = 200 | hrnn event | mse 0.0020 ± 0.0000 |" in out.out and "| 2 (two seeds) |" in out.out
    assert (tmp_path / "again" / "curves_adding_T200.png").exists()


def test_figures_can_stop_at_a_step_and_take_a_suffix(tmp_path, monkeypatch):
    """--max-step N and --max-wall S draw every curve's evaluations up to step N against steps and up to S
    seconds against wall time, and nothing after."""
    pytest.importorskip("matplotlib")
    sweep = tmp_path / "study" / "adding200"
    for seed in (0, 1):
        adding_job(sweep, f"{seed}_event_{seed}", "event", seed, adding_metrics(seed, 0.002, [0.15, 0.02, 0.002], 0.05, 280.0))
    saved, save = {}, results._save

    def keep(fig, path):
        saved[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(results, "_save", keep)
    assert main([str(tmp_path / "study"), "--figures", str(tmp_path / "figures"), "--max-step", "1000",
                 "--max-wall", "100", "--suffix", "_early"]) == 0
    assert (tmp_path / "figures" / "curves_adding_T200_early.png").exists()
    steps_panel, wall_panel = saved["curves_adding_T200_early.png"].axes
    (steps_line,), (wall_line,) = steps_panel.get_lines()[:1], wall_panel.get_lines()[:1]
    assert list(steps_line.get_xdata()) == [500, 1000]  # the evaluation at 1,500 is left out
    assert list(wall_line.get_xdata()) == pytest.approx([280 / 3])  # the evaluations at 187 and 280 s are left out
    assert steps_panel.get_title() == "at equal steps, the first 1,000 steps"
    assert wall_panel.get_title() == "at equal wall time, the first 100 s"


keep_records = load_script("keep_records", "study")


def test_kept_records_are_the_done_runs_small_files_and_read_back_as_the_sweep(tmp_path, capsys):
    """Finished and failed runs are copied without checkpoints or events; a run still going is left out;
    results.py reads the copy as it read the sweep."""
    sweep = tmp_path / "study" / "ablation_adding200"
    metrics = adding_metrics(0, 0.001, [0.1, 0.001], 0.03, 10.0)
    adding_job(sweep, "0_a", "clock_event", 0, metrics)
    adding_job(sweep, "1_a", "clock_event", 1, None)  # still going: no metrics.json
    failed = adding_job(sweep, "2_a", "clock_event", 2, None)
    (failed / "error.txt").write_text("ValueError: bad\n")
    (sweep / "0_a" / "checkpoints").mkdir()
    (sweep / "0_a" / "checkpoints" / "last.pt").write_bytes(b"x" * 100)
    (sweep / "0_a" / "events.out.tfevents.1").write_bytes(b"x")
    (sweep / "multirun.yaml").write_text("hydra: {overrides: {task: [trainer.seed=0,1,2]}}\n")
    into = tmp_path / "docs" / "runs"

    assert keep_records.main([str(sweep), "--into", str(into)]) == 0
    assert "kept 2 run records" in capsys.readouterr().out
    kept = into / "ablation_adding200"
    assert sorted(p.name for p in kept.iterdir()) == ["0_a", "2_a", "multirun.yaml"]
    assert sorted(str(p.relative_to(kept / "0_a")) for p in (kept / "0_a").rglob("*") if p.is_file()) == [
        ".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.json"]
    assert (kept / "2_a" / "error.txt").read_text() == "ValueError: bad\n"
    original = {j["name"]: (j["status"], j["metrics"], j["config"]) for j in read_study(tmp_path / "study")}
    copied = {j["name"]: (j["status"], j["metrics"], j["config"]) for j in read_study(into)}
    assert copied == {name: original[name] for name in ("0_a", "2_a")}

    assert keep_records.main([str(tmp_path / "nowhere"), "--into", str(into)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_sweeps_option_keeps_only_the_named_sweep_directories(tmp_path, capsys):
    """--sweeps selects sweeps, or jobs as <sweep>/<job directory>, by shell pattern: the summary has the rows
    of the matching ones only, and a pattern that matches none is an error naming it."""
    adding_job(tmp_path / "study" / "ablation_event", "0_event", "event", 0,
               adding_metrics(0, 0.0008, [0.15, 0.0008], 0.03, 400.0))
    adding_job(tmp_path / "study" / "ablation_clock", "0_clock", "clock", 0,
               adding_metrics(0, 0.156, [0.167, 0.156], 0.5, 300.0))
    adding_job(tmp_path / "study" / "other", "0_event", "event", 1, adding_metrics(1, 0.0004, [0.15, 0.0004], 0.03, 400.0))
    assert main([str(tmp_path / "study"), "--summary", "--sweeps", "ablation_*"]) == 0
    table = capsys.readouterr().out
    assert "| hrnn event | mse 0.0008 |" in table and "| hrnn-dct clock | mse 0.1560 |" in table
    assert "0.0004" not in table  # the run in `other`
    assert main([str(tmp_path / "study"), "--summary", "--sweeps", "ablation_event, other"]) == 0
    table = capsys.readouterr().out
    assert "mse 0.0006 ± 0.0003" in table and "clock" not in table.split("\n", 2)[2]
    assert main([str(tmp_path / "study"), "--summary", "--sweeps", "ablation_event, ablation_clock/0_*"]) == 0
    table = capsys.readouterr().out  # one job of a sweep, by its directory
    assert "| hrnn event | mse 0.0008 |" in table and "| hrnn-dct clock | mse 0.1560 |" in table
    assert main([str(tmp_path / "study"), "--summary", "--sweeps", "ablation_event, ablation_clock/1_*"]) == 0
    assert "clock" not in capsys.readouterr().out.split("\n", 2)[2]
    assert main([str(tmp_path / "study"), "--summary", "--sweeps", "missing*"]) == 1
    assert "in sweeps matching missing*" in capsys.readouterr().err


def test_legends_of_long_labels_take_fewer_columns_and_more_rows():
    assert results.legend_layout(["hrnn event (n = 3 seeds)"] * 4) == (3, 2)
    assert results.legend_layout(["x" * 60] * 3) == (2, 2)
    assert results.legend_layout(["x" * 130, "short"]) == (1, 2)
    assert results.legend_layout([]) == (3, 0)
