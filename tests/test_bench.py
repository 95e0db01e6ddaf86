"""scripts/bench.py runs end to end (tiny sizes; the numbers themselves are not checked)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--only", "hrnn-dct,cwrnn,cwrnn-dense,lstm",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "T = 30" in proc.stdout and "LSTM / hrnn-dct" in proc.stdout and "cwrnn dense / hard" in proc.stdout
    results = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert results["cwrnn-dense"]["dense_calls"] > 0  # the dense run really went through the forced-dense op
    assert results["cwrnn"]["dense_calls"] == 0
