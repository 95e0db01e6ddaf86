"""The configuration: `registry` names every choice, `schema` types and checks a composed config.

Importing this package registers the resolvers that conf/config.yaml's run and job directories use.
"""
from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems


def run_name(model: str, basis: str) -> str:
    """The run directory's suffix (conf/config.yaml): the model, and for hrnn its basis; the baselines have none."""
    return f"{model}_{basis}" if model == "hrnn" else model


def job_dir(num: int, overrides: str) -> str:
    """A sweep job's directory name (conf/config.yaml): `<num>_<overrides>`, or where that exceeds one file
    name's 255 bytes, its first part and a hash of the whole, so that a long override list still gets a
    directory, the same one on every call (resume=auto finds it again) and not another job's."""
    name = f"{num}_{overrides}"
    if len(name.encode()) <= NAME_MAX:
        return name
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:12]
    head = name.encode()[:NAME_MAX - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("job_dir", job_dir, replace=True)
