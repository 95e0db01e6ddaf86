#!/usr/bin/env python3
"""Provide the character-level language-modelling corpus: data/kjv.txt and its checksum.

The King James Bible comes from Debian's own packages, never from a web site:
`apt-get download bible-kjv=4.38 bible-kjv-text=4.38` into a temporary directory,
`dpkg-deb -x` to unpack them there (nothing is installed), then the package's own
program prints the whole text non-interactively:

    <tree>/usr/bin/bible -p <tree>/usr/lib "Gen1:1-Rev22:21"   (stdin /dev/null, stdout a pipe)

Its default output (pretty-printing on) is the plain text: a "Book N" heading per
chapter, verses numbered and indented, lines broken at 79 columns, ASCII only. It
uses no pager and ignores COLUMNS unless -l is given; the environment is fixed
anyway (COLUMNS and LINES removed, LC_ALL=C). The result is pinned: 4,298,239 bytes,
SHA-256 82fa5f37...b033ea (below); anything else is an error, not a new corpus.

`--text FILE` takes your own text instead (tinyshakespeare's input.txt, enwik8, ...):
it is copied into the data directory as <stem>.txt (or --out NAME) the same way.

Written next to the text (data/kjv.txt):
  data/kjv.sha256  `sha256sum` format ("<hex>  kjv.txt"); hrnn.tasks.text verifies the
                   text against it before every use (`cd data && sha256sum -c kjv.sha256`).
  data/kjv.json    a manifest: size, SHA-256, where the text came from, and the
                   compressors' bits per character on the whole file (reference lines).

The split into train/validation/test is the task's, not this script's: by position,
the last 5% test, the 5% before it validation (hrnn/tasks/text.py, "Split").

Reference lines measured on kjv.txt (gzip 1.12, XZ Utils 5.4.1, bzip2 1.0.8; bits per
character = 8 * compressed bytes / 4,298,239):
  gzip -9   2.4595    xz -9e   1.8594    bzip2 -9   1.7859   (gzip -9n from stdin: 1,321,463 bytes)
Without apt-get (not Debian) the script says so in one line and exits 2: use --text.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("bible-kjv", "bible-kjv-text")
VERSION = "4.38"
RANGE = "Gen1:1-Rev22:21"  # the whole text, Genesis 1:1 to Revelation 22:21
KJV_NAME = "kjv.txt"
KJV_BYTES = 4_298_239
KJV_SHA256 = "82fa5f3788c6a9a010fb128a0f0bf588984b5888a82058520620eded59b033ea"
# Command-line compressors read stdin (so gzip stores no file name); stdlib fallbacks when one is missing.
COMPRESSORS = {
    "gzip -9": (["gzip", "-9", "-n", "-c"], "python gzip", lambda d: gzip.compress(d, 9, mtime=0)),
    "xz -9e": (["xz", "-9e", "-c"], "python lzma", lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)),
    "bzip2 -9": (["bzip2", "-9", "-c"], "python bz2", lambda d: bz2.compress(d, 9)),
}


class FetchError(Exception):
    """One line for the user; main prints it and exits 1."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run(cmd: list[str], cwd: Path, what: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        errors = [line for line in detail if line.startswith("E:")] or detail[-1:] or ["no message"]
        raise FetchError(f"{what} failed (`{' '.join(cmd)}` exited {result.returncode}: {errors[0]})")
    return result


def download(packages: list[str], tmp: Path, any_version: bool) -> list[Path]:
    """`apt-get download` the packages (at VERSION unless any_version) into tmp."""
    specs = packages if any_version else [f"{name}={VERSION}" for name in packages]
    try:
        _run(["apt-get", "download", *specs], tmp, "apt-get download")
    except FetchError as exc:
        hint = "" if any_version else f"; if version {VERSION} is gone from your release, try --any-version"
        raise FetchError(f"{exc}; run `apt-get update` first if the package lists are missing{hint}") from None
    debs = sorted(tmp.glob("*.deb"))
    if not debs:
        raise FetchError(f"apt-get download left no .deb in {tmp}")
    return debs


def unpack(debs: list[Path], tree: Path) -> None:
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(tree)], tree.parent, f"dpkg-deb -x {deb.name}")


def _library_path(tree: Path) -> str:
    dirs = sorted({str(p.parent) for p in tree.rglob("lib*.so*")})
    return os.pathsep.join(dirs + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)


def print_bible(tree: Path, tmp: Path) -> bytes:
    """The whole text from the unpacked `bible` program (readline fetched too if the system lacks it)."""
    program, lib = tree / "usr/bin/bible", tree / "usr/lib"
    if not (program.is_file() and (lib / "bible.data").is_file()):
        raise FetchError(f"the unpacked packages lack usr/bin/bible or usr/lib/bible.data under {tree}")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "PAGER")}
    env["LC_ALL"] = "C"
    # The data path is also the working directory, which `bible` searches first: `-p .` is
    # immune to spaces in the temporary path (-p takes a space-separated list).
    cmd = [str(program), "-p", ".", RANGE]
    result = subprocess.run(cmd, cwd=lib, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    if result.returncode != 0 and b"error while loading shared libraries" in result.stderr:
        # A minimal system without libreadline8: unpack it next to the program, never install it.
        unpack(download(["libreadline8"], tmp / "lib-debs", any_version=True), tree)
        env["LD_LIBRARY_PATH"] = _library_path(tree)
        result = subprocess.run(cmd, cwd=lib, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines() or ["no message"]
        raise FetchError(f"`bible -p <tree>/usr/lib {RANGE}` exited {result.returncode}: {message[0]}")
    return result.stdout


def fetch_kjv(any_version: bool) -> bytes:
    with tempfile.TemporaryDirectory(prefix="kjv-") as name:
        tmp = Path(name)
        (tmp / "debs").mkdir()
        (tmp / "lib-debs").mkdir()
        tree = tmp / "root"
        tree.mkdir()
        unpack(download(list(PACKAGES), tmp / "debs", any_version), tree)
        text = print_bible(tree, tmp)
    if len(text) != KJV_BYTES or sha256(text) != KJV_SHA256:
        raise FetchError(f"`bible` printed {len(text):,} bytes with sha256 {sha256(text)}; expected "
                         f"{KJV_BYTES:,} bytes with sha256 {KJV_SHA256} (bible-kjv {VERSION}); not written")
    return text


def reference_bpc(data: bytes) -> dict[str, dict]:
    """Each compressor's bits per character on the whole file: 8 * compressed bytes / bytes."""
    out = {}
    for label, (cmd, module, fallback) in COMPRESSORS.items():
        if shutil.which(cmd[0]):
            size = len(subprocess.run(cmd, input=data, capture_output=True, check=True).stdout)
            tool = label
        else:
            size = len(fallback(data))
            tool = f"{module} (no {cmd[0]} on PATH)"
        out[label] = {"bytes": size, "bpc": round(8 * size / len(data), 4), "measured_with": tool}
    return out


def write_corpus(data: bytes, target: Path, source: dict, reference: bool) -> dict:
    """target, target.sha256 and target.json, each replaced atomically."""
    if not data:
        raise FetchError("the text is empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = sha256(data)
    manifest = {"file": target.name, "bytes": len(data), "sha256": digest, "source": source}
    if reference:
        manifest["reference_bpc"] = reference_bpc(data)
    for path, content in ((target, data), (target.with_suffix(".sha256"), f"{digest}  {target.name}\n".encode()),
                          (target.with_suffix(".json"), (json.dumps(manifest, indent=2) + "\n").encode())):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(content)
        tmp.replace(path)
    return manifest


def is_verified(target: Path, expected: str | None = None) -> bool:
    sums = target.with_suffix(".sha256")
    if not (target.is_file() and sums.is_file()):
        return False
    recorded = (sums.read_text().split() or [""])[0]
    return sha256(target.read_bytes()) == recorded and expected in (None, recorded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", type=Path)
    parser.add_argument("--text", type=Path, metavar="FILE", help="use this text file instead of the KJV from apt")
    parser.add_argument("--out", metavar="NAME",
                        help="file name in the data directory (default kjv.txt, or <stem>.txt with --text)")
    parser.add_argument("--any-version", action="store_true",
                        help=f"take the release's version of the packages, not {VERSION} (the text is still checked)")
    parser.add_argument("--no-reference", action="store_true", help="skip the compressor reference lines")
    parser.add_argument("--force", action="store_true", help="fetch again even if the file is present and verified")
    args = parser.parse_args(argv)
    try:
        if args.text is not None:
            if not args.text.is_file():
                raise FetchError(f"--text {args.text}: no such file")
            target = args.data_dir / (args.out or f"{args.text.stem}.txt")
            if target.suffix in (".sha256", ".json", ".tmp"):
                raise FetchError(f"--out {target.name}: the checksum and manifest take those names; use e.g. .txt")
            data = args.text.read_bytes()
            source = {"kind": "file", "path": str(args.text.resolve())}
        else:
            target = args.data_dir / (args.out or KJV_NAME)
            if not args.force and is_verified(target, KJV_SHA256):
                print(f"{target} is present and verified (sha256 {KJV_SHA256[:16]}...)")
                return 0
            missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
            if missing:
                print(f"error: {' and '.join(missing)} not found (the KJV comes from Debian's bible-kjv package); "
                      f"provide your own text with --text FILE", file=sys.stderr)
                return 2
            data = fetch_kjv(args.any_version)
            source = {"kind": "debian", "packages": [f"{p}={VERSION}" for p in PACKAGES],
                      "command": f'bible -p <unpacked>/usr/lib "{RANGE}"'}
        manifest = write_corpus(data, target, source, reference=not args.no_reference)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {target} ({manifest['bytes']:,} bytes, sha256 {manifest['sha256']}) and "
          f"{target.with_suffix('.sha256').name}, {target.with_suffix('.json').name}")
    for label, line in manifest.get("reference_bpc", {}).items():
        print(f"  {label:9s} {line['bpc']:.4f} bits/char ({line['bytes']:,} bytes, {line['measured_with']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
