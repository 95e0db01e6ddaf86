"""The clock op's Gluon kernels (hrnn/ops/gpu_gluon.py): what can be checked without a GPU, and
their values and gradients where one is present.

Gluon has no interpreter, so on the CPU the kernels are compiled for an H100 (sm_90) with Triton's
own ptxas and nvdisasm in a fresh process: no register spills, bf16 tensor-core products, and
the step's structure they exist for, at most 2 barriers in the time loop (the Triton kernels
they replace have 8). On a GPU they must match the reference loop as the Triton kernels do.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

COMPILE = r"""
import json, os, re, subprocess, sys, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from hrnn.ops import gpu_gluon as G

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

def compile_(kernel, ptrs, constexprs, warps):
    sig = {n: "*fp32" if n in ptrs else "constexpr" if n in constexprs else "fp32" if n in ("thr_value", "support")
           else "i32" for n in kernel.arg_names}
    return triton.compile(GluonASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})

def inspect(kernel):
    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/k.ptx", "w").write(kernel.asm["ptx"])
        open(f"{d}/k.cubin", "wb").write(kernel.asm["cubin"])
        err = subprocess.run([f"{BIN}/ptxas", "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([f"{BIN}/nvdisasm", "-c", f"{d}/k.cubin"], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    # The time loop: the longest backward branch.
    labels = {m.group(1): i for i, line in enumerate(sass) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    loops = [(i - labels[m.group(1)], labels[m.group(1)], i) for i, line in enumerate(sass)
             if (m := re.search(r"BRA `?\(?\.(L_x_\d+)", line)) and labels.get(m.group(1), i) < i]
    _, first, last = max(loops)
    body = sass[first:last + 1]
    return {"spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", err)),
            "loop_barriers": sum("BAR.SYNC" in line for line in body),
            "loop_mma": sum("HMMA.16816.F32.BF16" in line for line in body)}

out = {}
for hp, steps in ((128, 784), (128, 2000), (32, 200)):
    warps = G.num_warps(hp)
    common = dict(T=steps, HP=hp, BLOCK_B=16, NUM_WARPS=warps, CHAINS=3)
    fwd = compile_(G.leaky_forward_kernel, {"u", "w_h", "waves", "h0", "buf", "cands", "last"},
                   dict(WRITE_STATES=True, WRITE_CANDS=True, WRITE_LAST=True, **common), warps)
    bwd = compile_(G.leaky_backward_kernel, {"grad", "grad_last", "buf", "cands", "w_h", "waves", "dz", "dh0",
                   "da_part"}, dict(GRAD_ALL=True, NEED_DA=True, **common), warps)
    out[f"HP={hp} T={steps}"] = {"forward": inspect(fwd), "backward": inspect(bwd), "warps": warps, "products": 1}
# The gated kernels (unit gates: a second product for the gate) of the default model's 8 modules of
# 16 units, with the variants that hold the most registers (per-sample waves and thresholds,
# dL/da, a truncated gate's support) and the plainest.
gated_ptrs = {"u", "gu", "w_h", "gate_h", "waves", "thr", "h0", "buf", "cands", "gates", "acts", "last", "grad",
              "grad_last", "grad_act", "dz", "dzg", "dzl", "dwave", "dh0"}
for steps, variant in ((784, dict(WAVES=1, GATE=0, THR_TENSOR=False)), (200, dict(WAVES=2, GATE=2, THR_TENSOR=True)),
                       (2000, dict(WAVES=0, GATE=1, THR_TENSOR=False))):
    common = dict(T=steps, MP=8, UP=16, BLOCK_B=16, NUM_WARPS=8, CHAINS=3, **variant)
    fwd = compile_(G.gated_forward_kernel, gated_ptrs, dict(WRITE_STATES=True, WRITE_CANDS=True, WRITE_LAST=False,
                                                            **common), 8)
    bwd = compile_(G.gated_backward_kernel, gated_ptrs, dict(GRAD_ALL=True, HAS_GRAD=True, HAS_GRAD_ACT=True,
                                                             NEED_DWAVE=True, SUPPORT=True, **common), 8)
    out[f"gated HP=128 T={steps} {variant}"] = {"forward": inspect(fwd), "backward": inspect(bwd), "warps": 8,
                                                 "products": 2}
print(json.dumps(out))
"""


def test_gluon_kernels_compile_for_hopper_without_spills_and_with_two_barriers_a_step():
    """Each kernel's loop runs HP / 16 warps of 16 columns each: per product (the gated kernels have
    two: the gate's beside the main one) 3 bf16 products x (HP / 16 k-steps) x 2 n-tiles of MMAs; no
    spills, and at most 2 barriers (the one exchange a step between warps)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, r in out.items():
        hp = int(case.split("HP=")[1].split()[0])
        assert r["warps"] == hp // 16, (case, r)
        for name in ("forward", "backward"):
            assert r[name]["spill_bytes"] == 0, (case, name, r[name])
            assert r[name]["loop_barriers"] <= 2, (case, name, r[name])
            assert r[name]["loop_mma"] == r["products"] * 3 * (hp // 16) * 2, (case, name, r[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Gluon kernels run on a GPU only")
@pytest.mark.parametrize("batch,steps,hidden,modules,last_only", [(100, 50, 128, 8, False), (37, 20, 40, 4, True),
                                                                   (16, 9, 16, 2, False)])
def test_gluon_kernels_match_the_reference_on_a_gpu(batch, steps, hidden, modules, last_only, monkeypatch):
    """Values and every gradient against the float64 reference loop within bf16x3's bound, and
    against the Triton kernels of the same precision."""
    from hrnn.ops import gpu, leaky_scan_reference
    assert gpu._gluon(hidden, "bf16x3", torch.float32), "the Gluon kernels were not picked"
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(batch, steps, hidden, generator=gen)
    w_h = torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5
    waves = torch.rand(steps, modules, generator=gen)
    h0 = torch.randn(batch, hidden, generator=gen) * 0.5
    weight = torch.randn(batch, hidden, generator=gen) if last_only else torch.randn(batch, steps, hidden, generator=gen)

    def run(fn, device, dtype):
        args = [t.to(device, dtype).requires_grad_() for t in (u, w_h, waves, h0)]
        out = fn(*args)
        (out * weight.to(device, dtype)).sum().backward()
        return [t.detach().double().cpu() for t in (out, *(a.grad for a in args))]

    ref = run(lambda *a: leaky_scan_reference(*a, last_only=last_only), "cpu", torch.float64)
    glu = run(lambda *a: gpu.leaky_scan(*a, last_only, "bf16x3"), "cuda", torch.float32)
    monkeypatch.setitem(gpu.TUNING, "gluon", False)
    tri = run(lambda *a: gpu.leaky_scan(*a, last_only, "bf16x3"), "cuda", torch.float32)
    for r, g, t in zip(ref, glu, tri):
        scale = r.abs().max().clamp_min(1e-6)
        assert (g - r).abs().max() / scale < 1e-3
        assert (g - t).abs().max() / scale < 1e-3


GATED_GPU_CASES = [  # batch, steps, inputs, hidden, modules, waves, mode, support
    (100, 40, 1, 128, 8, "shared", "soft", 0.0),       # the default model's shapes
    (37, 20, 3, 40, 4, "per_sample", "soft", 0.0),     # modules of 10 units pad to 16; three programs
    (20, 16, 2, 64, 8, None, "hard", 0.0),
    (20, 16, 2, 48, 3, "shared", "truncated", 0.2),    # 3 modules pad to 4; a support
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Gluon kernels run on a GPU only")
@pytest.mark.parametrize("case", GATED_GPU_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
def test_gluon_gated_kernels_match_the_reference_on_a_gpu(case, last_only):
    """States, activations and the gradient of every input against the float64 reference loop."""
    from test_gated_fused import call, make

    from hrnn.ops import gated_leaky_rnn_reference, gpu
    batch, steps, inputs, hidden, modules, waves, mode, support = case
    mp, up, _ = gpu.gated_layout(hidden, modules)
    assert gpu._gluon(mp * up, "bf16x3", torch.float32), "the Gluon kernels were not picked"
    args = make(batch, steps, inputs, hidden, modules, torch.float64, waves)

    def values_and_grads(fn, device, dtype):
        leaves = {k: v.to(device, dtype).requires_grad_() for k, v in args.items() if v is not None and k != "thresholds"}
        thresholds = args["thresholds"].to(device, dtype) if mode != "soft" else 0.5
        states, acts = call(fn, {**args, **leaves}, mode, thresholds, last_only, support=support)
        weight = torch.randn(states.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        loss = (states * weight.to(device, dtype)).sum() + 0.3 * acts.square().sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return [t.detach().double().cpu() for t in (states, acts, *grads)]

    want = values_and_grads(gated_leaky_rnn_reference, "cpu", torch.float64)
    got = values_and_grads(lambda *a, **k: gpu.gated_leaky_rnn(*a, "bf16x3", **k), "cuda", torch.float32)
    if mode != "soft":
        assert torch.equal(got[1] == 0, want[1] == 0)
    for g, w in zip(got, want):
        assert (g - w).abs().max() / w.abs().max().clamp_min(1e-6) < 1e-3
