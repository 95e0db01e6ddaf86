"""Defaults have one home, the YAML in conf/: the schemas give types only, and a missing key is one clear error.
Names have one home, hrnn/config/registry.py: the conf/ files, validation and the command line agree with it."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_config, run_cli
from hrnn.cli.train import preflight
from hrnn.config import registry
from hrnn.config.schema import schemas, validate
from hrnn.errors import UserError
from hrnn.models.clock import BasisClock, PeriodClock
from hrnn.tasks import build_task


def test_schemas_hold_no_default_values():
    for schema in {schema for group in registry.RUN_GROUPS for schema in schemas(group)}:
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


@pytest.mark.parametrize("group", sorted(registry.NAMED_GROUPS))
def test_each_group_has_one_file_per_registered_name(group):
    files = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert files == sorted(registry.NAMED_GROUPS[group])
    for name in files:  # each file is the option of its name
        assert validate(compose_config([f"{group}={name}"]))[group].name == name


@pytest.mark.parametrize("name", sorted(registry.OPTIMIZERS))
def test_an_optimizer_is_chosen_alike_as_a_group_option_and_by_its_name(name):
    preflight([f"optim={name}"])
    by_option, by_name = (validate(compose_config([arg])) for arg in (f"optim={name}", f"optim.name={name}"))
    assert by_option.optim == by_name.optim and by_option.optim.name == name


def test_an_unknown_optimizer_is_refused_alike_both_ways():
    message = "unknown optim 'adagrad'; allowed: adam, adamw, rmsprop, sgd"
    with pytest.raises(UserError, match=f"^{message}$"):
        preflight(["optim=adagrad"])
    with pytest.raises(UserError, match=f"^{message}$"):
        validate(compose_config(["optim.name=adagrad"]))


def test_mnist_length_is_the_datas_and_a_mismatch_is_one_line(tmp_path):
    import numpy as np

    from hrnn.tasks.mnist import save_mnist

    split = lambda n: (np.zeros((n, 784), dtype=np.float32), np.zeros(n, dtype=np.int64))  # noqa: E731
    save_mnist(tmp_path, {"train": split(4), "val": split(2), "test": split(2)})
    cfg = validate(compose_config(["task=smnist", f"data_dir={tmp_path}"]))
    assert build_task(cfg.task, cfg.data_dir, 0).spec.seq_len == cfg.task.seq_len  # 784, from the YAML
    cfg = validate(compose_config(["task=smnist", "task.seq_len=100", f"data_dir={tmp_path}"]))
    with pytest.raises(UserError) as error:
        build_task(cfg.task, cfg.data_dir, 0)
    assert str(error.value) == (f"task.seq_len=100 does not fit smnist: the images in data_dir={tmp_path} have 784 "
                                f"pixels, read one per step; drop the override")
