"""Build hook for the fused recurrent core (hrnn/csrc); package metadata lives in setup.cfg.

Install with `pip install --no-build-isolation -e .` so the build sees the installed torch
instead of fetching a second one. The extension is optional for a user: if torch is not
importable at build time, HRNN_NO_EXT=1 is set, or the compiler fails, the package installs
without it and hrnn.fused falls back to the pure PyTorch loop (saying so once at run time).
A developer's `make test` fails instead (HRNN_REQUIRE_FUSED=1, see tests/conftest.py).

One build serves every CPU (ATen's CPU_CAPABILITY scheme): on x86-64, hrnn/csrc/kernels.cpp is
compiled once per capability (avx2, avx512) with that capability's flags, into objects linked
beside the bindings, which are built for the baseline ISA (never -march=native) and hold the
portable capability, `default`. At import the best capability this CPU executes is chosen;
HRNN_CPU_CAPABILITY=default|avx2|avx512 forces a lower one. Elsewhere only `default` exists.
The event-gate kernels (hrnn/csrc/gated_kernels.cpp) are compiled the same way, for `default`
too (the baseline ISA's vectors), and bound by hrnn/csrc/gated_scan.cpp.
"""
import os
import platform
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

CSRC = "hrnn/csrc"
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

    class KernelsBuildExtension(BuildExtension):
        """Compiles the per-capability kernel objects first; a failed compile leaves the pure
        PyTorch path instead of failing the install."""

        failed: set = set()

        def build_extension(self, ext):
            try:
                self._build_kernels(ext)
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

        def _build_kernels(self, ext):
            """kernels.cpp and gated_kernels.cpp once per capability, in parallel (no torch headers:
            seconds each). A capability the compiler cannot build is left out, with a line saying
            so; the gated kernels' `default` build is required (it is the baseline ISA)."""
            cxx = shlex.split(os.environ.get("CXX", "c++"))
            out_dir = os.path.join(self.build_temp, "hrnn_kernels")
            os.makedirs(out_dir, exist_ok=True)
            jobs = [(name, source, flags) for name, flags in _capabilities().items()
                    for source in ("kernels", "gated_kernels")] + [("default", "gated_kernels", [])]

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

    ext = CppExtension(
        "hrnn._fused_C",
        [os.path.join(CSRC, "leaky_scan.cpp"), os.path.join(CSRC, "gated_scan.cpp")],
        include_dirs=[os.path.abspath(CSRC)],
        # -fopenmp: at::parallel_for is header code that needs it; the OpenMP runtime is the
        # one torch already loaded (same soname), so there is still one thread pool.
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
        depends=[os.path.join(CSRC, f) for f in ("kernels.h", "kernels.cpp", "tanh_rational.h", "vectors.h",
                                                 "gated_kernels.h", "gated_kernels.cpp")],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": KernelsBuildExtension}}


setup(**_ext_setup())
