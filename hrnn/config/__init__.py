"""The configuration: `registry` names every choice, `schema` types and checks a composed config.

Importing this package registers the resolvers that conf/config.yaml's run and job directories use.
"""
from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems
JOB_NUMBER_DIGITS = 10  # room kept in a job directory's name for its number (any sweep's count), before its `_`
OVERRIDES_MAX = NAME_MAX - JOB_NUMBER_DIGITS - 1


def run_name(model: str, basis: str) -> str:
    """The run directory's suffix (conf/config.yaml): the model, and for hrnn its basis; the baselines have none."""
    return f"{model}_{basis}" if model == "hrnn" else model


def job_dir(num: int, overrides: str) -> str:
    """A sweep job's directory name (conf/config.yaml): `<num>_<overrides>`, or where the overrides are too
    long for one file name's 255 bytes, their first part and a hash of the whole, so that a long override list
    still gets a directory, the same one on every call (resume=auto finds it again) and not another job's.
    Whether and where the name is cut depends on the overrides alone, never on the job's number, so a job
    renumbered by a larger sweep keeps the part after `_` that resume=auto matches it by."""
    if len(overrides.encode()) <= OVERRIDES_MAX:
        return f"{num}_{overrides}"
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:12]
    head = overrides.encode()[:OVERRIDES_MAX - len(digest) - 1].decode(errors="ignore")
    return f"{num}_{head}~{digest}"


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("job_dir", job_dir, replace=True)
