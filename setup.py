"""Build hook for the fused recurrent core (hrnn/ops/csrc); package metadata lives in setup.cfg.

Install with `pip install --no-build-isolation -e .` so the build sees the installed torch
instead of fetching a second one. The extension (hrnn.ops._C) is optional for a user: if torch
is not importable at build time, HRNN_NO_EXT=1 is set, or the compiler fails, the package
installs without it and hrnn.ops runs the pure PyTorch reference loop instead (saying so once at
run time). A developer's `make test` fails instead (HRNN_REQUIRE_FUSED=1, see tests/conftest.py).

One build serves every CPU (ATen's CPU_CAPABILITY scheme): on x86-64, the register kernels of both
cores (hrnn/ops/csrc/kernels.cpp, the clock core's, and gated_kernels.cpp, the event gate's) are
compiled once per capability (avx2, avx512) with that capability's flags, into objects linked
beside the bindings, which are built for the baseline ISA (never -march=native) and hold the clock
core's portable capability, `default` (portable_kernels.cpp); gated_kernels.cpp is compiled for
`default` too (the baseline ISA's vectors). hrnn/ops/csrc/capability.cpp holds the one table of
each capability's kernels: at import the best capability this CPU executes is chosen, and
HRNN_CPU_CAPABILITY=default|avx2|avx512 forces a lower one. Elsewhere only `default` exists.
"""
import os
import platform
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

CSRC = "hrnn/ops/csrc"
# Built once, for the baseline ISA, with torch's headers: the bindings and what they share.
BINDINGS = ["module", "capability", "scan_common", "leaky_scan", "gated_scan", "portable_kernels"]
# Built once per capability, without torch (header-only interfaces: kernels.h, gated_kernels.h).
KERNELS = ["kernels", "gated_kernels"]
# capability -> compiler flags of its register kernels (x86-64). The portable capability,
# `default`, is part of the bindings: the loop in baseline C++, the products through torch's BLAS.
X86_CAPABILITIES = {
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}
# -ffp-contract=fast: -std=c++17 (ISO mode) would otherwise forbid fused multiply-add.
KERNEL_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-ffp-contract=fast", "-fvisibility=hidden"]


def _capabilities() -> dict:
    return X86_CAPABILITIES if platform.machine().lower() in ("x86_64", "amd64") else {}


def _compile_kernels(build_temp: str, ext) -> None:
    """kernels.cpp and gated_kernels.cpp once per capability, in parallel (no torch headers:
    seconds each), linked into `ext`. A capability the compiler cannot build is left out, with a
    line saying so; the gated kernels' `default` build is required (it is the baseline ISA)."""
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    out_dir = os.path.join(build_temp, "hrnn_kernels")
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(name, source, flags) for name, flags in _capabilities().items()
            for source in KERNELS] + [("default", "gated_kernels", [])]

    def compile_one(job):
        name, source, flags = job
        obj = os.path.join(out_dir, f"{source}_{name}.o")
        cmd = [*cxx, *KERNEL_FLAGS, *flags, f"-DHRNN_CPU_CAPABILITY={name}", "-c",
               os.path.join(CSRC, f"{source}.cpp"), "-o", obj]
        return name, obj, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, jobs))
    failed = {name: result.stderr.strip()[-300:] for name, _, result in results if result.returncode}
    if "default" in failed:
        raise RuntimeError(f"the portable gated kernels did not compile: {failed['default']}")
    for name, err in failed.items():
        print(f"hrnn: the {name} kernels did not compile here ({err}); built without them", file=sys.stderr)
    ext.extra_objects.extend(obj for name, obj, _ in results if name not in failed)
    for name in _capabilities():
        if name not in failed:
            ext.define_macros.append((f"HRNN_HAVE_{name.upper()}", "1"))


def _build_ext_class(base):
    """torch's BuildExtension, compiling the per-capability kernel objects first; a failed
    compile leaves the pure PyTorch path instead of failing the install."""

    class KernelsBuildExtension(base):
        failed: set = set()

        def build_extension(self, ext):
            try:
                _compile_kernels(self.build_temp, ext)
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - any compiler/linker failure
                self.failed.add(ext.name)
                print(f"hrnn: building {ext.name} failed ({err}); the pure PyTorch path "
                      "will be used", file=sys.stderr)

        def copy_extensions_to_source(self):  # in-place / editable installs
            kept = self.extensions
            self.extensions = [e for e in kept if e.name not in self.failed]
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = kept

    return KernelsBuildExtension


def _ext_setup():
    if os.environ.get("HRNN_NO_EXT"):
        print("hrnn: HRNN_NO_EXT set, skipping the fused extension", file=sys.stderr)
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("hrnn: torch not importable at build time (use pip install --no-build-isolation); "
              "installing without the fused extension", file=sys.stderr)
        return {}
    headers = [f for f in sorted(os.listdir(CSRC)) if f.endswith(".h")]
    ext = CppExtension(
        "hrnn.ops._C",
        [os.path.join(CSRC, f"{name}.cpp") for name in BINDINGS],
        include_dirs=[os.path.abspath(CSRC)],
        # -fopenmp: at::parallel_for is header code that needs it; the OpenMP runtime is the
        # one torch already loaded (same soname), so there is still one thread pool.
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
        depends=[os.path.join(CSRC, f) for f in headers + [f"{name}.cpp" for name in KERNELS]],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": _build_ext_class(BuildExtension)}}


setup(**_ext_setup())
