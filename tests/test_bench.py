"""The benchmark scripts (scripts/bench/) measure what their tables say: tiny sizes, no timing assertions.

End to end, bench.py's table has its claimed columns and a row per configuration and capability,
each row printing the numbers its subprocess measured, and its ratios divide two rows of the same
run; each fused row ran the kernels it names (the capability, skipping or not). The ratio and the
argument checks are also tested on their own, with numbers made up here. bench_gates.py's forced
gates open the fraction of (sample, step, module) they claim, and time_kernels.py's builds of every
capability compute the same weight gradient.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, load_script, run_cli

from hrnn import ops

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench"
needs_ext = pytest.mark.skipif(not ops.fused_available(), reason=str(ops.fused_unavailable_reason()))


@pytest.fixture(scope="module")
def bench():
    return load_script("bench", "bench")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """bench.py --quick on hrnn-dct, cwrnn, cwrnn-dense (each under every capability) and LSTM:
    (stdout, the JSON results)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench.py"), "--quick", "--only", "hrnn-dct,cwrnn,cwrnn-dense,lstm",
         "--capabilities", ",".join(ops.cpu_capabilities()), "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())["results"]


def table(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    """The T = 30 table: its header's cells, and each row's cells by row name."""
    lines = stdout.split("T = 30", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["config"])
    header = lines[start].split("  description")[0].split()
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("  ") or line.strip().startswith("ratios"):
            break
        cells = line.split()
        rows[cells[0]] = cells[1:6]
    return header, rows


@needs_ext
def test_bench_table_has_its_columns_and_a_row_per_config_and_capability(quick_run, bench):
    stdout, results = quick_run
    header, rows = table(stdout)
    assert header == ["config", "median", "s", "min", "s", "max", "s", "x", "floor", "peak", "MB"]
    capabilities = ops.cpu_capabilities()
    assert set(rows) == {f"{c}@{cap}" for c in ("hrnn-dct", "cwrnn", "cwrnn-dense") for cap in capabilities} | {"lstm"}
    for r in results:  # each row prints what its subprocess measured
        name = f"{r['config']}@{r['capability']}" if r["capability"] else r["config"]
        median, least, most, over_floor, peak = (float(v) for v in rows[name])
        assert (median, least, most) == tuple(round(r[k], 4) for k in ("median", "min", "max"))
        assert least <= median <= most
        assert over_floor == round(r["median"] / r["floor"], 2) and peak == round(r["peak_mb"], 1)


@needs_ext
def test_bench_ratio_divides_two_rows_of_the_same_run(quick_run):
    stdout, results = quick_run
    medians = {(r["config"], r["capability"]): r["median"] for r in results}
    for capability in ops.cpu_capabilities():
        line = next(line for line in stdout.splitlines() if line.strip().startswith(f"ratios (medians), {capability}:"))
        printed = float(line.split("LSTM / hrnn-dct ")[1].split(";")[0])
        assert printed == round(medians[("lstm", None)] / medians[("hrnn-dct", capability)], 2)


@needs_ext
def test_each_fused_row_ran_its_capability_and_path(quick_run):
    _, results = quick_run
    for r in (r for r in results if r["config"] != "lstm"):
        assert r["capability_used"] == r["capability"]
        calls = r["kernel_calls"]
        if r["config"] == "cwrnn":  # hard waves: the skipping kernels, never the dense ones
            assert calls["skipping"] > 0 and calls["dense"] == 0, r
        else:  # cwrnn-dense is forced dense; hrnn-dct's soft waves need no skipping
            assert calls["dense"] > 0 and calls["skipping"] == 0, r
    lstm = [r for r in results if r["config"] == "lstm"]
    assert len(lstm) == 1 and lstm[0]["kernel_calls"] == {"skipping": 0, "dense": 0}


def test_ratios_are_one_capabilitys_row_over_a_shared_baseline(bench):
    rows = {"hrnn-dct@avx2": {"median": 2.0, "peak_mb": 30.0}, "hrnn-dct@default": {"median": 4.0, "peak_mb": 30.0},
            "lstm": {"median": 5.0, "peak_mb": 60.0}, "cwrnn@avx2": {"median": 1.0, "peak_mb": 1.0}}
    assert bench.ratios(rows, "avx2", 0.5) == ["hrnn-dct / floor 4.00", "LSTM / hrnn-dct 2.50",
                                               "peak MB hrnn-dct / LSTM 0.50"]
    assert bench.ratios(rows, "default", 0.5) == ["hrnn-dct / floor 8.00", "LSTM / hrnn-dct 1.25",
                                                  "peak MB hrnn-dct / LSTM 0.50"]
    assert bench.ratios({"lstm": rows["lstm"]}, "avx2", 0.5) == []  # no ratio without both of its rows


def test_bench_text_table_prints_each_rows_step_and_characters_per_second(tmp_path):
    """The text rows alone: the same columns as the T tables and chars/s = batch x T / the median step."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--quick", "--only", "text-hrnn,text-lstm",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\ntext: ", 1)[1].splitlines()
    assert lines[0].startswith("batch 32, T = 30, 74 symbols, the state carried") and "T = 30   FLOP" not in proc.stdout
    assert lines[1].split("  description")[0].split() == [
        "config", "median", "s", "min", "s", "max", "s", "x", "floor", "peak", "MB", "chars/s"]
    rows = {line.split()[0]: line.split()[1:7] for line in lines[2:4]}
    for r in json.loads(out.read_text())["results"]:
        assert (r["batch"], r["steps"]) == (32, 30) and r["chars_per_s"] == pytest.approx(32 * 30 / r["median"])
        assert float(rows[r["config"]][0]) == round(r["median"], 4)
        assert float(rows[r["config"]][5]) == round(r["chars_per_s"])


@pytest.mark.parametrize("args, message", [
    (["--only", "hrnn-dct,nosuch"], "argument --only: unknown configs ['nosuch']; choose from hrnn-dct, "),
    (["--repeat", "0"], "argument --repeat: '0' is not a whole number >= 1"),
    (["--steps", "30", "-5"], "argument --steps: '-5' is not a whole number >= 1"),
])
def test_bench_refuses_a_bad_value_in_one_line(bench, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        bench.make_parser().parse_args(args)
    assert stop.value.code == 2
    *usage, error = capsys.readouterr().err.strip().splitlines()
    assert usage[0].startswith("usage:") and error.startswith(f"{Path(sys.argv[0]).name}: error: {message}")


@needs_ext
def test_bench_refuses_a_capability_this_machine_lacks(bench, capsys):
    with pytest.raises(SystemExit):
        bench.capabilities_to_run(bench.make_parser(), "sse9")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(f"error: capabilities ['sse9'] do not run here; this machine executes "
                          f"{ops.cpu_capabilities()[::-1]}")


@needs_ext
def test_bench_gates_opens_the_fraction_it_forces():
    """The quick f-curve: every row of each mode, and the measured open fraction ('open') of the
    forced hard gates: exactly 0 and 1 at f = 0 and 1, near f between."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gates.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("hard f=")]
    assert [(r[1], r[2]) for r in rows] == [(f"f={f}", mode) for mode in ("no-grad", "train")
                                            for f in ("1", "0.5", "0.25", "0.1", "0")]
    for r in rows:
        forced, opened = float(r[1][2:]), float(r[-1])
        assert opened == pytest.approx(forced, abs=0 if forced in (0, 1) else 0.06)


@needs_ext
def test_bench_gates_truncated_times_every_capability_and_opens_the_fraction_it_forces():
    """--truncated --quick: one block per capability this CPU runs (best first), a soft row at ratio 1
    and a row per forced (f, w) whose measured open fraction is f and whose gradient support (the candidates
    computed in training) is f + w (exactly at 0 and 1)."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gates.py"), "--truncated", "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] and line.split()[0] in
            ops.cpu_capabilities()]
    gates = load_script("bench_gates", "bench")
    per_block = 2 * (1 + len(gates.TRUNCATED_ROWS))  # two readouts, a soft row and each (f, w)
    assert [r[0] for r in rows[::per_block]] == ops.cpu_capabilities()[::-1]
    for r in rows:
        if r[2] == "soft":
            assert r[7] == "1.000" and r[9] == "1.000"
            continue
        forced, within, opened, support = float(r[2]), float(r[3]), float(r[4]), float(r[5])
        assert opened == pytest.approx(forced, abs=0 if forced in (0, 1) else 0.1)
        assert support == pytest.approx(forced + within, abs=0 if forced + within in (0, 1) else 0.1)
    assert {(float(r[2]), float(r[3])) for r in rows if r[2] != "soft"} == set(gates.TRUNCATED_ROWS)


@needs_ext
def test_bench_gates_clock_opens_the_forced_share_of_the_clocks_ticks():
    """--clock --quick: per capability, the soft step under the learned clock at ratio 1 with every (b, t, m)
    open, the soft step under the frozen clock open on its ticks only, and per forced tick share q a truncated
    row whose open fraction is q times the clock's share of ticks (exactly at q = 1: every (b, t, m) off a tick
    is shut whatever its gate says)."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gates.py"), "--clock", "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gates = load_script("bench_gates", "bench")
    waves = gates.binary_clock_waves(12)
    assert waves[:, 3].tolist() == [float(t % 8 == 0) for t in range(12)]
    ticks = float(waves.mean())
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] and line.split()[0] in
            ops.cpu_capabilities()]
    assert [r[0] for r in rows[::2 + len(gates.CLOCK_TICK_SHARES)]] == ops.cpu_capabilities()[::-1]
    for r in rows:
        if r[1:4] == ["soft,", "learned", "clock"]:  # never exactly 0: every (b, t, m) computed
            assert r[5] == "1.000" and r[-3] == "1.000" and r[-1] == "1.000"
        elif r[1:4] == ["soft,", "frozen", "clock"]:  # the clock's exact zeros, whatever the gate
            assert float(r[5]) == pytest.approx(ticks, abs=5e-4)
        elif r[1] == "truncated":
            share, opened = float(r[2]), float(r[3])
            assert opened == pytest.approx(share * ticks, abs=5e-4 if share == 1 else 0.05)  # printed to 3 places
    assert sorted(float(r[2]) for r in rows if r[1] == "truncated") == sorted(
        gates.CLOCK_TICK_SHARES * len(ops.cpu_capabilities()))


@needs_ext
def test_bench_checkpoints_times_trained_runs_at_their_own_activity(tmp_path):
    """Two trained runs of one task, the soft default and a truncated gate under a frozen binary clock: the
    first row is the unit; the soft one opens and computes every update, the truncated one computes exactly
    its open ones (no support), fewer than all."""
    common = ["task=adding", "task.seq_len=24", *TINY, "trainer.steps=6", "trainer.eval_every=3"]
    soft, truncated = tmp_path / "sweep" / "0_soft", tmp_path / "sweep" / "1_truncated"
    run_cli([*common, f"hydra.run.dir={soft}"], tmp_path)
    run_cli([*common, "basis=binary", "regularizer=none", "optim.clock_lr=0", "model.gate=truncated",
             "model.gate_threshold=0.5", "model.gate_bias=0.3", f"hydra.run.dir={truncated}"], tmp_path)
    capabilities = ops.cpu_capabilities()[:2]  # `default` and the next one up where this CPU has it
    proc = subprocess.run([sys.executable, str(BENCH / "bench_checkpoints.py"), str(soft), str(truncated),
                           "--batches", "4", "--capabilities", ",".join(capabilities)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = proc.stdout.split("\ncapability ")[1:]
    assert [table.split()[0] for table in tables] == capabilities
    for table in tables:  # each capability's rows over its own first
        rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith("sweep/")}
        assert list(rows) == ["sweep/0", "sweep/1"]
        assert rows["sweep/0"][1:4] == ["8", "1.000", "1.000"] and rows["sweep/0"][5] == rows["sweep/0"][7] == "1.000"
        opened, computed = float(rows["sweep/1"][2]), float(rows["sweep/1"][3])
        assert 0 < opened == computed < 1


def test_bench_checkpoints_names_a_bad_run_directory_in_one_line(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_checkpoints.py"), str(missing)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {missing} is not a directory; give a run directory written by hrnn-train"]


def test_bench_gates_ratios_are_over_the_same_modes_dense_row(capsys):
    gates = load_script("bench_gates", "bench")
    rows = [("hard f=1", "no-grad", 1.0, (0.004, 0.002), 1.0), ("hard f=0.5", "no-grad", 0.5, (0.003, 0.001), 0.5),
            ("hard f=1", "train", 1.0, (0.010, 0.008), 1.0), ("soft (dense)", "train", None, (0.005, 0.002), None)]
    gates.print_curve(12, rows)
    lines = {(c[0] + " " + c[1], c[2]): c for c in (line.split() for line in capsys.readouterr().out.splitlines())
             if len(c) > 2 and c[0] in ("hard", "soft")}
    assert lines[("hard f=0.5", "no-grad")][4:7] == ["0.750", "1.00", "0.500"]  # median / 4 ms, min / 2 ms
    assert lines[("soft (dense)", "train")][4:7] == ["0.500", "2.00", "0.250"]  # median / 10 ms, min / 8 ms


def test_block_masks_keep_the_fraction_of_blocks_they_name():
    gates = load_script("bench_gates", "bench")
    units = gates.HIDDEN // gates.MODULES
    for fraction in gates.BLOCK_FRACTIONS:
        mask = gates.block_mask(fraction)
        blocks = mask.view(gates.MODULES, units, gates.MODULES, units).amax(dim=(1, 3))
        assert int(blocks.sum()) == round(fraction * gates.MODULES ** 2)
        assert bool(((mask == 0) | (mask == 1)).all())


@pytest.mark.skipif(not [c for c in ops.cpu_capabilities() if c != "default"], reason="no register kernels on this CPU")
def test_time_kernels_builds_and_runs_every_register_capability():
    """scripts/bench/time_kernels.py compiles the kernels with setup.py's flags and times them; every
    capability computes the same dW_h (the printed sum) for the same seeded slice."""
    result = subprocess.run([sys.executable, str(BENCH / "time_kernels.py"), "--steps", "12", "--rows", "7", "--repeat",
                             "1", "--", "-O1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == [c for c in ops.cpu_capabilities() if c != "default"]
    sums = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert all(s == pytest.approx(sums[0], rel=1e-4) for s in sums) and sums[0] != 0
