"""Defaults have one home, the YAML in conf/: the schemas give types only, and a missing key is one clear error."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from hrnn.config import SCHEMAS, TrainerSchema, validate
from hrnn.errors import UserError
from hrnn.models.clock import BasisClock, PeriodClock


def test_schemas_hold_no_default_values():
    schemas = {schema for options in SCHEMAS.values() for schema in options.values()} | {TrainerSchema}
    for schema in schemas:
        with_default = [f.name for f in dataclasses.fields(schema)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert with_default == [], f"{schema.__name__} repeats YAML defaults: {with_default}"


def test_clocks_take_their_settings_from_the_config():
    for clock in (BasisClock, PeriodClock):
        defaults = {name: p.default for name, p in inspect.signature(clock).parameters.items()
                    if p.default is not inspect.Parameter.empty and p.default is not None}
        assert defaults == {}, f"{clock.__name__} repeats YAML defaults: {defaults}"


def test_the_yaml_values_are_the_ones_used():
    cfg = validate(compose_config([]))
    assert cfg.optim.clock_lr == 0.01 and cfg.trainer.num_threads is None
    lstm = validate(compose_config(["model=lstm"]))
    assert (lstm.model.hidden_size, lstm.model.n_modules) == (128, 8)  # from conf/model/common/size.yaml


@pytest.mark.parametrize("group,key", [("task", "n_val"), ("optim", "clock_lr"), ("trainer", "eval_every"),
                                       ("basis", "sharpness"), ("model", "hidden_size")])
def test_a_key_missing_from_the_yaml_fails_with_one_line(group, key):
    cfg = compose_config([])
    OmegaConf.set_struct(cfg, False)
    del cfg[group][key]
    with pytest.raises(UserError) as error:
        validate(cfg)
    message = str(error.value)
    assert message.startswith(f"config key {group}.{key} has no value; give it one in conf/{group}/")
    assert "\n" not in message


def test_a_missing_key_on_the_command_line_names_the_key(tmp_path):
    result = run_cli(["~task.n_test"], cwd=tmp_path, check=False, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: config key task.n_test has no value; give it one in "
                                     "conf/task/adding.yaml or on the command line (task.n_test=...)")
