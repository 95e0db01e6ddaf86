"""Run-time CPU dispatch of the fused kernels: every capability the CPU has is built and selectable,
HRNN_CPU_CAPABILITY forces one, and a bad value fails in one line naming the allowed ones."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from hrnn import ops
from hrnn.ops import cpu

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not ops.fused_available(), reason=str(ops.fused_unavailable_reason()))


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def python(code: str, capability: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HRNN_CPU_CAPABILITY"}
    if capability is not None:
        env["HRNN_CPU_CAPABILITY"] = capability
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"), reason="x86-64 Linux only")
def test_every_capability_of_this_cpu_is_built():
    """No variant silently missing: the capabilities offered are exactly those the CPU flags allow,
    so the per-capability runs of tests/test_fused.py cover all of them."""
    flags = cpu_flags()
    expected = ["default"]
    if {"avx2", "fma"} <= flags:
        expected.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        expected.append("avx512")
    assert ops.cpu_capabilities() == expected
    assert ops.cpu_capability() == expected[-1] or os.environ.get("HRNN_CPU_CAPABILITY")


@pytest.mark.parametrize("capability", ops.cpu_capabilities())
def test_variable_selects_the_capability(capability):
    proc = python("import hrnn.ops.cpu as f; print(f.cpu_capability())", capability)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == capability


def test_without_the_variable_the_best_capability_runs():
    proc = python("import hrnn.ops.cpu as f; print(f.cpu_capability(), f.cpu_capabilities()[-1])", None)
    assert proc.returncode == 0, proc.stderr
    chosen, best = proc.stdout.split()
    assert chosen == best


@pytest.mark.parametrize("value, message", [
    ("sse9", "HRNN_CPU_CAPABILITY='sse9' is not a CPU capability; allowed: default, avx2, avx512"),
    ("AVX2", "HRNN_CPU_CAPABILITY='AVX2' is not a CPU capability; allowed: default, avx2, avx512"),
])
def test_bad_value_is_one_line_naming_the_allowed_ones(value, message):
    proc = python("import hrnn.ops.cpu", value)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == f"hrnn.errors.UserError: {message}"


def test_hrnn_train_reports_a_bad_value_in_one_line(tmp_path):
    env = {**os.environ, "HRNN_CPU_CAPABILITY": "fastest"}
    proc = subprocess.run([sys.executable, "-m", "hrnn.cli.train", "trainer.steps=1", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: HRNN_CPU_CAPABILITY='fastest' is not a CPU capability; "
                                   "allowed: default, avx2, avx512")


def test_capability_this_cpu_lacks_is_refused():
    missing = [c for c in cpu.CAPABILITIES if c not in ops.cpu_capabilities()]
    if not missing:
        pytest.skip("this CPU runs every capability")
    proc = python("import hrnn.ops.cpu", missing[0])
    assert proc.returncode != 0
    assert f"HRNN_CPU_CAPABILITY={missing[0]} cannot run on this CPU; allowed here: " in proc.stderr


def test_switching_capability_changes_the_kernels_but_not_the_results():
    import torch

    from hrnn.ops import leaky_rnn

    gen = torch.Generator().manual_seed(0)
    x, w_x, b = torch.randn(5, 12, 3, generator=gen), torch.randn(32, 3, generator=gen), torch.randn(32, generator=gen)
    w_h, waves, h0 = torch.randn(32, 32, generator=gen) / 6, torch.rand(12, 4, generator=gen), torch.zeros(5, 32)
    before = ops.cpu_capability()
    outputs = {}
    try:
        for capability in ops.cpu_capabilities():
            ops.set_cpu_capability(capability)
            assert ops.cpu_capability() == capability
            outputs[capability] = leaky_rnn(x, w_x, b, w_h, waves, h0)
    finally:
        ops.set_cpu_capability(before)
    reference = outputs["default"]
    for capability, out in outputs.items():
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value,available", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_disable_fused_is_off_only_when_empty_or_zero(value, available):
    """HRNN_DISABLE_FUSED=1 (or any other word) runs the PyTorch loop; =0 and an empty value do not."""
    probe = "from hrnn import ops; print(ops.fused_available())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HRNN_DISABLE_FUSED": value})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(available)
