"""Config schema and validation: every bad key or value fails before training, in one line.

Each group option has a small dataclass schema that gives types only: every default
lives in the YAML files in conf/, and a key missing there is an error here. Merging the
composed config into its schema rejects unknown keys, wrong types and missing values;
`validate` then checks ranges and the combinations that types cannot express
(divisibility, basis size against T).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hrnn.core import MATMUL_PRECISIONS
from hrnn.errors import UserError
from hrnn.models.clock import INIT_MODES
from hrnn.models.recurrent import ACTIVATIONS, CONNECTIVITY, GATES


@dataclass
class SyntheticTaskSchema:
    name: str
    seq_len: int
    n_val: int
    n_test: int
    data_seed: int


@dataclass
class TimescalesTaskSchema(SyntheticTaskSchema):
    periods: list[int]


@dataclass
class MnistTaskSchema:
    name: str
    seq_len: int
    permutation_seed: int


@dataclass
class ClockedModelSchema:
    name: str
    hidden_size: int
    n_modules: int
    connectivity: str
    connectivity_init: float
    connectivity_weight: float
    connectivity_threshold: float
    activation: str
    gate: str
    gate_bias: float
    gate_threshold: float
    gate_slope: float
    gate_hard_from: float
    update_weight: float
    chunker_threshold: float
    prediction_weight: float


@dataclass
class CwrnnModelSchema:
    name: str
    hidden_size: int
    n_modules: int


@dataclass
class TorchModelSchema:
    name: str
    hidden_size: int
    n_modules: int  # unused; lets one sweep set model.n_modules for every model


@dataclass
class BasisSchema:
    name: str
    size: Optional[int]
    init: str
    init_weight: float
    sharpness: float


@dataclass
class PeriodBasisSchema:
    name: str
    init: str
    open_ratio: float
    leak: float


@dataclass
class SoftmaxSchema:
    name: str
    temperature: float
    entropy_weight: float


@dataclass
class L1Schema:
    name: str
    weight: float


@dataclass
class NoRegularizerSchema:
    name: str


@dataclass
class OptimSchema:
    name: str
    lr: float
    clock_lr: Optional[float]
    connectivity_lr: Optional[float]
    weight_decay: float
    schedule: str


@dataclass
class TrainerSchema:
    steps: int
    max_wall_s: Optional[float]
    batch_size: int
    eval_every: int
    eval_batch_size: int
    seed: int
    device: str
    num_threads: Optional[int]
    grad_clip: Optional[float]
    log_every: int
    nonfinite: str
    progress: bool
    matmul_precision: str


SCHEMAS: dict[str, dict[str, type]] = {
    "task": {
        "copy": SyntheticTaskSchema,
        "adding": SyntheticTaskSchema,
        "timescales": TimescalesTaskSchema,
        "smnist": MnistTaskSchema,
        "pmnist": MnistTaskSchema,
    },
    "model": {
        "hrnn": ClockedModelSchema,
        "cwrnn": CwrnnModelSchema,
        "lstm": TorchModelSchema,
        "gru": TorchModelSchema,
        "rnn": TorchModelSchema,
    },
    "basis": {"binary": BasisSchema, "dct": BasisSchema, "period": PeriodBasisSchema},
    "regularizer": {"softmax": SoftmaxSchema, "l1": L1Schema, "none": NoRegularizerSchema},
    "optim": {"adam": OptimSchema, "adamw": OptimSchema, "sgd": OptimSchema, "rmsprop": OptimSchema},
}
TOP_LEVEL = {"task", "model", "basis", "regularizer", "optim", "trainer", "data_dir", "resume"}
DEVICES = ("cpu", "cuda", "auto")
NONFINITE = ("stop", "skip")
LR_SCHEDULES = ("constant", "cosine")


def validate(cfg: DictConfig) -> DictConfig:
    """Return cfg with every group checked against its schema; raise UserError on the first problem."""
    unknown = set(cfg.keys()) - TOP_LEVEL
    if unknown:
        raise UserError(f"unknown config key {sorted(unknown)[0]!r}; allowed top-level keys: {', '.join(sorted(TOP_LEVEL))}")
    checked = {}
    for group, options in SCHEMAS.items():
        name = cfg[group].get("name")
        if name not in options:
            raise UserError(f"unknown {group} {name!r}; allowed: {', '.join(options)}")
        checked[group] = _merge(group, options[name], cfg[group])
    checked["trainer"] = _merge("trainer", TrainerSchema, cfg.trainer)
    out = OmegaConf.create({**checked, "data_dir": cfg.data_dir, "resume": cfg.resume})
    _check_values(out)
    return out


def _merge(group: str, schema: type, values: DictConfig) -> DictConfig:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        value = getattr(exc, "value", None)
        allowed = ", ".join(f.name for f in schema.__dataclass_fields__.values())
        first_line = str(exc).splitlines()[0]
        if "not in struct" in str(exc) or "Key '" in first_line and "not" in first_line:
            raise UserError(f"unknown key {group}.{key} for {group}={values.get('name')}; allowed keys: {allowed}") from None
        raise UserError(f"bad value {value!r} for {group}.{key}: {first_line}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        where = f"conf/{group}/{values.name}.yaml" if "name" in values else f"conf/{group}/"
        raise UserError(f"config key {group}.{missing[0]} has no value; give it one in {where} "
                        f"or on the command line ({group}.{missing[0]}=...)")
    return merged


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _positive(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    _require(value is not None and value > 0, f"{key}={value} must be positive")


def _check_values(cfg: DictConfig) -> None:
    task, model, basis, reg, trainer = cfg.task, cfg.model, cfg.basis, cfg.regularizer, cfg.trainer
    for key in ("task.seq_len", "model.hidden_size", "trainer.steps", "trainer.batch_size", "trainer.eval_every",
                "trainer.eval_batch_size", "trainer.log_every", "optim.lr"):
        _positive(cfg, key)
    if task.name in ("smnist", "pmnist"):
        _require(task.seq_len == 784, f"task.seq_len={task.seq_len} is fixed at 784 for {task.name} (28 x 28 pixels)")
    else:
        _positive(cfg, "task.n_val")
        _positive(cfg, "task.n_test")
    if task.name == "adding":
        _require(task.seq_len >= 2, f"task.seq_len={task.seq_len} must be at least 2 for adding (one marker per half)")
    if task.name == "timescales":
        _require(len(task.periods) > 0, "task.periods is empty; give at least one positive integer period")
        bad = [p for p in task.periods if p <= 0]
        if bad:
            raise UserError(f"task.periods has non-positive period {bad[0]}; periods must be positive integers")
    _require(trainer.device in DEVICES, f"trainer.device={trainer.device!r} is not allowed; allowed: {', '.join(DEVICES)}")
    _require(trainer.device != "cuda" or torch.cuda.is_available(),
             "trainer.device=cuda but no CUDA device is available; allowed here: cpu, auto")
    _require(trainer.matmul_precision in MATMUL_PRECISIONS, f"trainer.matmul_precision={trainer.matmul_precision!r} "
             f"is not allowed; allowed: {', '.join(MATMUL_PRECISIONS)}")
    _require(trainer.nonfinite in NONFINITE, f"trainer.nonfinite={trainer.nonfinite!r} is not allowed; allowed: {', '.join(NONFINITE)}")
    _require(trainer.num_threads is None or trainer.num_threads > 0, f"trainer.num_threads={trainer.num_threads} must be positive or null")
    _require(trainer.max_wall_s is None or trainer.max_wall_s > 0, f"trainer.max_wall_s={trainer.max_wall_s} must be positive or null")
    _require(trainer.grad_clip is None or trainer.grad_clip > 0, f"trainer.grad_clip={trainer.grad_clip} must be positive or null")
    _require(cfg.optim.clock_lr is None or cfg.optim.clock_lr >= 0,
             f"optim.clock_lr={cfg.optim.clock_lr} must be positive, 0 (the clock frozen at its start) or null (optim.lr)")
    _require(cfg.optim.connectivity_lr is None or cfg.optim.connectivity_lr > 0,
             f"optim.connectivity_lr={cfg.optim.connectivity_lr} must be positive or null (optim.lr)")
    _require(cfg.optim.schedule in LR_SCHEDULES,
             f"optim.schedule={cfg.optim.schedule!r} is not allowed; allowed: {', '.join(LR_SCHEDULES)}")
    _require(cfg.optim.weight_decay >= 0, f"optim.weight_decay={cfg.optim.weight_decay} must be non-negative")
    if model.name in ("hrnn", "cwrnn"):
        _positive(cfg, "model.n_modules")
        _require(
            model.hidden_size % model.n_modules == 0,
            f"model.hidden_size={model.hidden_size} is not divisible by model.n_modules={model.n_modules}; "
            f"use a hidden size that is a multiple of {model.n_modules}",
        )
    if model.name == "hrnn":
        _require(model.connectivity in CONNECTIVITY,
                 f"model.connectivity={model.connectivity!r} is not allowed; allowed: {', '.join(CONNECTIVITY)}")
        _check_events(model)
        if model.activation in ("clock", "clock_event"):
            _check_clock(cfg)


def _check_events(model: DictConfig) -> None:
    """Learned connectivity and the event gate (hrnn/models/recurrent.py, docs/models.md)."""
    _require(model.activation in ACTIVATIONS,
             f"model.activation={model.activation!r} is not allowed; allowed: {', '.join(ACTIVATIONS)}")
    _require(model.gate in GATES, f"model.gate={model.gate!r} is not allowed; allowed: {', '.join(GATES)}")
    for key in ("connectivity_threshold", "gate_threshold"):
        _require(0 < model[key] < 1, f"model.{key}={model[key]} must be in (0, 1): it is compared with a sigmoid")
    for key in ("connectivity_weight", "update_weight", "prediction_weight"):
        _require(model[key] >= 0, f"model.{key}={model[key]} must be non-negative")
    _require(model.gate_slope >= 1, f"model.gate_slope={model.gate_slope} must be at least 1: the annealed gate's "
                                    f"slope rises from 1 to it")
    _require(0 <= model.gate_hard_from <= 1, f"model.gate_hard_from={model.gate_hard_from} must be in [0, 1]: the "
                                             f"fraction of training after which the annealed gate trains hard (1: never)")
    _require(not (model.gate == "annealed" and model.activation == "chunker"),
             "model.gate=annealed is for activation=event or clock_event; activation=chunker takes soft, hard or stochastic")
    _require(model.chunker_threshold > 0, f"model.chunker_threshold={model.chunker_threshold} must be positive")
    _require(model.activation != "chunker" or model.n_modules >= 2,
             f"model.n_modules={model.n_modules} is too few for activation=chunker: module m wakes on module "
             f"m - 1's errors, so it needs at least 2")


def _check_clock(cfg: DictConfig) -> None:
    basis, reg = cfg.basis, cfg.regularizer
    steps = cfg.task.seq_len + (20 if cfg.task.name == "copy" else 0)
    _require(basis.init in INIT_MODES, f"basis.init={basis.init!r} is not allowed; allowed: {', '.join(INIT_MODES)}")
    if basis.name == "period":
        _require(0 < basis.open_ratio <= 1, f"basis.open_ratio={basis.open_ratio} must be in (0, 1]")
        _require(basis.leak >= 0, f"basis.leak={basis.leak} must be non-negative")
        return
    _require(0 < basis.init_weight < 1, f"basis.init_weight={basis.init_weight} must be in (0, 1)")
    _require(basis.sharpness >= 1, f"basis.sharpness={basis.sharpness} must be at least 1")
    if basis.size is not None:
        _require(basis.size > 0, f"basis.size={basis.size} must be positive or null")
        if basis.name == "binary":
            _require(basis.size <= steps, f"basis.size={basis.size} exceeds the sequence length {steps}: "
                     f"periods beyond it tick only at t=0 and are indistinguishable; use at most {steps} or null")
        else:
            nyquist = steps // 2 + 1
            _require(basis.size <= nyquist, f"basis.size={basis.size} exceeds the {nyquist} cosine frequencies a "
                     f"sequence of length {steps} can tell apart (Nyquist); use at most {nyquist} or null")
    if reg.name == "softmax":
        _positive(cfg, "regularizer.temperature")
        _require(reg.entropy_weight >= 0, f"regularizer.entropy_weight={reg.entropy_weight} must be non-negative")
    if reg.name == "l1":
        _require(reg.weight >= 0, f"regularizer.weight={reg.weight} must be non-negative")
