"""The recurrence layer: the ops every clocked model runs, and their backends.

    leaky_rnn, leaky_scan            the clock op (one (T, M) wave for the batch), with or without
                                     the input projection in it
    gated_leaky_rnn                  per-sample activations and an event gate
    chunker_leaky_rnn                the Chunker's gate
    *_reference                      each op's definition, a plain PyTorch loop
    GATE_MODES                       the event gate's modes
    set_matmul_precision, matmul_precision, MATMUL_PRECISIONS
                                     the CUDA kernels' product precision (None, the start: ieee)
    cpu_capability, cpu_capabilities, set_cpu_capability
                                     which build of the C++ kernels runs (default, avx2, avx512)
    fused_available, fused_unavailable_reason
                                     whether the C++ kernels are there, and why not
    kernel_path                      what a device's tensors run: a capability, "triton" or "pytorch loop"
    kernels_hidden                   a block in which one device's kernels count as missing
    last_candidate_blocks            the event-gated C++ kernels' work in their last forward

hrnn/ops/dispatch.py chooses, for each call, between the Triton kernels (gpu.py, gpu_kernels.py),
the C++ kernels (cpu.py, csrc/) and the reference loops (reference.py).

The CPU names load the compiled extension, on first use rather than when this package is
imported: importing hrnn.ops.cpu is what reports a bad HRNN_CPU_CAPABILITY (a UserError).
"""
from __future__ import annotations

from hrnn.ops.dispatch import (MATMUL_PRECISIONS, chunker_leaky_rnn, gated_leaky_rnn, kernel_path, kernels_hidden,
                               leaky_rnn, leaky_scan, matmul_precision, set_matmul_precision)
from hrnn.ops.reference import (GATE_MODES, chunker_leaky_rnn_reference, gated_leaky_rnn_reference,
                                leaky_rnn_reference, leaky_scan_reference)

# Public name -> the name in hrnn.ops.cpu.
_CPU_NAMES = {"cpu_capability": "cpu_capability", "cpu_capabilities": "cpu_capabilities",
              "set_cpu_capability": "set_cpu_capability", "fused_available": "available",
              "fused_unavailable_reason": "unavailable_reason", "last_candidate_blocks": "last_candidate_blocks"}

__all__ = ["GATE_MODES", "MATMUL_PRECISIONS", "chunker_leaky_rnn", "chunker_leaky_rnn_reference", "gated_leaky_rnn",
           "gated_leaky_rnn_reference", "kernel_path", "kernels_hidden", "leaky_rnn", "leaky_rnn_reference",
           "leaky_scan", "leaky_scan_reference", "matmul_precision", "set_matmul_precision", *_CPU_NAMES]


def __getattr__(name: str):
    """The CPU names, from hrnn.ops.cpu, imported on first use."""
    if name not in _CPU_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from hrnn.ops import cpu

    return getattr(cpu, _CPU_NAMES[name])


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
