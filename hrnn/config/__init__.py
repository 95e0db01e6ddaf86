"""The configuration: `registry` names every choice, `schema` types and checks a composed config.

Importing this package registers the `run_name` resolver that conf/config.yaml's run directory uses.
"""
from __future__ import annotations

from omegaconf import OmegaConf


def run_name(model: str, basis: str) -> str:
    """The run directory's suffix (conf/config.yaml): the model, and for hrnn its basis; the baselines have none."""
    return f"{model}_{basis}" if model == "hrnn" else model


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
