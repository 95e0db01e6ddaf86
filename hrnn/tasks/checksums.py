"""Data files checked against the SHA-256 recorded next to them (`sha256sum` format, so
`sha256sum -c` checks them too): a damaged or swapped file is refused in one line, never read.

A file is read once and the bytes that were checked are the bytes used, so nothing can change
between the check and the use.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from hrnn.errors import UserError

LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](\S.*)")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_sums(sums: Path, fix: str) -> dict[str, str]:
    """File name -> recorded SHA-256 of a `sha256sum` file; UserError when it is missing or unreadable."""
    try:
        text = sums.read_bytes().decode("ascii")
    except FileNotFoundError:
        raise UserError(f"checksum file {sums} not found, so the data cannot be verified; {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"checksum file {sums} is not text, so the data cannot be verified; {fix}") from None
    except OSError as exc:
        raise UserError(f"cannot read checksum file {sums}: {exc.strerror}; {fix}") from None
    recorded = {}
    for line in text.splitlines():
        match = LINE.fullmatch(line.strip())
        if match is None and line.strip():
            raise UserError(f"{sums} holds a line that is not `<sha256>  <file>`: {line.strip()[:60]!r}; {fix}")
        if match is not None:
            recorded[match.group(2)] = match.group(1).lower()
    return recorded


def verified_bytes(path: Path, sums: Path, fix: str) -> bytes:
    """The bytes of `path`, read once and checked against its line in `sums`."""
    expected = read_sums(sums, fix).get(path.name)
    if expected is None:
        raise UserError(f"{sums} records no checksum for {path.name}, so {path} cannot be verified; {fix}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; {fix}") from None
    if digest(data) != expected:
        raise UserError(f"{path} has sha256 {digest(data)[:16]}..., but {sums} records {expected[:16]}...: "
                        f"the file is damaged or was replaced; {fix}")
    return data


def sums_text(files: dict[str, bytes]) -> str:
    """The `sha256sum` lines recording `files` (name -> content)."""
    return "".join(f"{digest(data)}  {name}\n" for name, data in sorted(files.items()))
