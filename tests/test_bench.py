"""scripts/bench.py runs end to end and measures what its rows say (tiny sizes; timings unchecked)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hrnn import fused

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not fused.available(), reason=str(fused.unavailable_reason()))
def test_bench_quick_runs_each_capability_and_path(tmp_path):
    out = tmp_path / "bench.json"
    capabilities = fused.cpu_capabilities()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--only", "hrnn-dct,cwrnn,cwrnn-dense,lstm",
         "--capabilities", ",".join(capabilities), "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "T = 30" in proc.stdout and "LSTM / hrnn-dct" in proc.stdout and "cwrnn dense / hard" in proc.stdout
    results = json.loads(out.read_text())["results"]
    fused_rows = [r for r in results if r["config"] != "lstm"]
    # Each fused config ran once under each capability, and really ran that capability's kernels.
    assert sorted((r["config"], r["capability"]) for r in fused_rows) == sorted(
        (c, cap) for c in ("hrnn-dct", "cwrnn", "cwrnn-dense") for cap in capabilities)
    for r in fused_rows:
        assert r["capability_used"] == r["capability"]
        calls = r["kernel_calls"]
        if r["config"] == "cwrnn":  # hard waves: the skipping kernels, never the dense ones
            assert calls["skipping"] > 0 and calls["dense"] == 0, r
        else:  # cwrnn-dense is forced dense; hrnn-dct's soft waves need no skipping
            assert calls["dense"] > 0 and calls["skipping"] == 0, r
    lstm = [r for r in results if r["config"] == "lstm"]
    assert len(lstm) == 1 and lstm[0]["kernel_calls"] == {"skipping": 0, "dense": 0}


@pytest.mark.skipif(not [c for c in fused.cpu_capabilities() if c != "default"], reason="no register kernels on this CPU")
def test_time_kernels_builds_and_runs_every_register_capability():
    """scripts/time_kernels.py compiles the kernels with setup.py's flags and times them; every
    capability computes the same dW_h (the printed sum) for the same seeded slice."""
    result = subprocess.run([sys.executable, "scripts/time_kernels.py", "--steps", "12", "--rows", "7", "--repeat", "1", "--", "-O1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == [c for c in fused.cpu_capabilities() if c != "default"]
    sums = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert all(s == pytest.approx(sums[0], rel=1e-4) for s in sums) and sums[0] != 0


@pytest.mark.skipif(not fused.available(), reason=str(fused.unavailable_reason()))
def test_bench_gates_quick_f_curve_and_blocks_under_each_capability():
    """scripts/bench_gates.py: the f-curve (f = 0 included) and --blocks, a row per capability, core and
    fraction of nonzero W_h blocks, each dense row the unit of its ratios."""
    script = str(ROOT / "scripts" / "bench_gates.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hard f=0 " in proc.stdout and "reference loop" in proc.stdout
    capabilities = fused.cpu_capabilities()
    proc = subprocess.run([sys.executable, script, "--quick", "--blocks", "--threads", "1",
                           "--capabilities", ",".join(capabilities)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] and line.split()[0] in capabilities]
    assert len(rows) == len(capabilities) * 2 * 5
    for capability in capabilities:
        for core in ("clock", "event"):
            mine = [r for r in rows if r[0] == capability and r[1] == core]
            assert [float(r[-4]) for r in mine] == [1.0, 0.75, 0.5, 0.25, 0.125]
            assert float(mine[0][-1]) == 1.0  # the dense row is the unit of the ratios
