"""Build hook for the fused recurrent core (hrnn/csrc); package metadata lives in setup.cfg.

Install with `pip install --no-build-isolation -e .` so the build sees the installed torch
instead of fetching a second one. The extension is optional: if torch is not importable at
build time, HRNN_NO_EXT=1 is set, or the compiler fails, the package installs without it and
hrnn.fused falls back to the pure PyTorch loop (saying so once at run time).

HRNN_ARCH_FLAGS overrides the target flags (default "-march=native": the kernels are built for
the machine that installs them; set e.g. "-march=x86-64-v3" for a portable build).
"""
import os
import shlex
import sys

from setuptools import setup


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

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves the pure PyTorch path instead of failing the install."""

        failed: set = set()

        def build_extension(self, ext):
            try:
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

    arch = shlex.split(os.environ.get("HRNN_ARCH_FLAGS", "-march=native"))
    ext = CppExtension(
        "hrnn._fused_C",
        ["hrnn/csrc/leaky_scan.cpp"],
        # -ffp-contract=fast: -std=c++17 (ISO mode) would otherwise forbid fused multiply-add.
        # -fopenmp: at::parallel_for is header code that needs it; the OpenMP runtime is the
        # one torch already loaded (same soname), so there is still one thread pool.
        extra_compile_args=["-O3", "-ffp-contract=fast", "-fopenmp", *arch],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_ext_setup())
