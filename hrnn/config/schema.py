"""Config schema and validation: every bad key or value fails before training, in one line.

Each group option has a small dataclass schema that gives types only (hrnn.config.registry says
which option takes which): every default lives in the YAML files in conf/, and a key missing
there is an error here. Merging the
composed config into its schema rejects unknown keys, wrong types and missing values;
`validate` then checks ranges and the combinations that types cannot express
(divisibility, basis size against T).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hrnn.config import registry
from hrnn.errors import UserError
from hrnn.models import default_basis_size
from hrnn.tasks import sequence_length


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
class TextTaskSchema:
    name: str
    file: str
    seq_len: int


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
    gate_threshold_warmup: float
    gate_support: float
    gate_open_target: float
    gate_open_rate: float
    gate_open_per_module: bool
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
    num_layers: int


@dataclass
class GatedTorchModelSchema(TorchModelSchema):
    init: str
    chrono_t_max: Optional[float]


@dataclass
class LemModelSchema:
    name: str
    hidden_size: int
    n_modules: int  # unused, as for TorchModelSchema
    dt: float


@dataclass
class CornnModelSchema(LemModelSchema):
    gamma: float
    epsilon: float


@dataclass
class BasisSchema:
    name: str
    size: Optional[int]
    init: str
    start_periods: Optional[list[float]]
    init_weight: float
    sharpness: float
    learn_phase: bool


@dataclass
class PeriodBasisSchema:
    name: str
    init: str
    start_periods: Optional[list[float]]
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
    flush_denormal: bool




def schemas(group: str) -> list[type]:
    """The schemas of a run group's options, each once."""
    if group == "trainer":
        return [TrainerSchema]
    return list(dict.fromkeys(_schema(group, name) for name in registry.NAMED_GROUPS[group]))


def _schema(group: str, name: str) -> type:
    """The schema of one option: every optimizer takes the same keys."""
    return OptimSchema if group == "optim" else globals()[registry.NAMED_GROUPS[group][name]]


def check_groups(cfg: DictConfig) -> None:
    """The top level: only known keys, each run group a mapping, data_dir a path (UserError otherwise)."""
    unknown = set(cfg.keys()) - set(registry.TOP_LEVEL)
    if unknown:
        raise UserError(f"unknown config key {sorted(unknown)[0]!r}; allowed top-level keys: "
                        f"{', '.join(sorted(registry.TOP_LEVEL))}")
    for group in registry.RUN_GROUPS:
        _require(isinstance(cfg.get(group), DictConfig), f"config group {group} is missing or not a mapping of keys")
    _require(isinstance(cfg.get("data_dir"), (str, int)), f"data_dir={cfg.get('data_dir')!r} must be a directory path")
    _require(cfg.get("resume") is None or isinstance(cfg.resume, str), f"resume={cfg.get('resume')!r} must be a path, auto or null")


def validate(cfg: DictConfig) -> DictConfig:
    """Return cfg with every group checked against its schema; raise UserError on the first problem."""
    check_groups(cfg)
    checked = {}
    for group, options in registry.NAMED_GROUPS.items():
        name = cfg[group].get("name")
        if name not in options:
            raise UserError(f"unknown {group} {name!r}; allowed: {', '.join(sorted(options))}")
        checked[group] = _merge(group, _schema(group, name), cfg[group])
    checked["trainer"] = _merge("trainer", TrainerSchema, cfg.trainer)
    out = OmegaConf.create({**checked, "data_dir": str(cfg.data_dir), "resume": cfg.resume})
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
            option = f" for {group}={values.get('name')}" if "name" in values else ""
            raise UserError(f"unknown key {group}.{key}{option}; allowed keys: {allowed}") from None
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


def _one_of(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    _require(value in allowed, f"{key}={value!r} is not allowed; allowed: {', '.join(allowed)}")


def _positive_or_null(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    _require(value is None or value > 0, f"{key}={value} must be positive or null")


def _check_values(cfg: DictConfig) -> None:
    for key in ("task.seq_len", "model.hidden_size", "trainer.steps", "trainer.batch_size", "trainer.eval_every",
                "trainer.eval_batch_size", "trainer.log_every", "optim.lr"):
        _positive(cfg, key)
    _check_task(cfg)
    _check_trainer(cfg)
    _check_optim(cfg)
    _check_model(cfg)
    _check_bounds(cfg)


def _check_task(cfg: DictConfig) -> None:
    task = cfg.task
    if "n_val" in task:  # the synthetic tasks' fixed evaluation sets
        _positive(cfg, "task.n_val")
        _positive(cfg, "task.n_test")
    if task.name == "adding":
        _require(task.seq_len >= 2, f"task.seq_len={task.seq_len} must be at least 2 for adding (one marker per half)")
    if task.name == "timescales":
        _require(len(task.periods) > 0, "task.periods is empty; give at least one positive integer period")
        bad = [p for p in task.periods if p <= 0]
        if bad:
            raise UserError(f"task.periods has non-positive period {bad[0]}; periods must be positive integers")
    if task.name == "text":
        _require(cfg.model.name in registry.STREAM_MODELS,
                 f"model={cfg.model.name} cannot carry its state from one window of the text to the next; "
                 f"task=text takes model={', '.join(registry.STREAM_MODELS)}")


def _check_trainer(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    _one_of(cfg, "trainer.device", registry.DEVICES)
    _require(trainer.device != "cuda" or torch.cuda.is_available(),
             "trainer.device=cuda but no CUDA device is available; allowed here: cpu, auto")
    _one_of(cfg, "trainer.matmul_precision", registry.PRECISIONS)
    _one_of(cfg, "trainer.nonfinite", registry.NONFINITE)
    for key in ("trainer.num_threads", "trainer.max_wall_s", "trainer.grad_clip"):
        _positive_or_null(cfg, key)


def _check_optim(cfg: DictConfig) -> None:
    optim = cfg.optim
    _require(optim.clock_lr is None or optim.clock_lr >= 0,
             f"optim.clock_lr={optim.clock_lr} must be positive, 0 (the clock frozen at its start) or null (optim.lr)")
    _require(optim.connectivity_lr is None or optim.connectivity_lr > 0,
             f"optim.connectivity_lr={optim.connectivity_lr} must be positive or null (optim.lr)")
    _one_of(cfg, "optim.schedule", registry.SCHEDULES)
    _require(optim.weight_decay >= 0, f"optim.weight_decay={optim.weight_decay} must be non-negative")


def _check_model(cfg: DictConfig) -> None:
    model = cfg.model
    if "num_layers" in model:
        _positive(cfg, "model.num_layers")
    if model.name in registry.GATE_BIAS_INITS:
        _one_of(cfg, "model.init", registry.GATE_BIAS_INITS[model.name])
        _require(model.chrono_t_max is None or model.chrono_t_max > 2,
                 f"model.chrono_t_max={model.chrono_t_max} must be above 2 (chrono draws log U[1, T_max - 1]) or null")
    for key in ("dt", "gamma", "epsilon"):
        if key in model:
            _positive(cfg, f"model.{key}")
    if model.name in ("hrnn", "cwrnn"):
        _positive(cfg, "model.n_modules")
        _require(
            model.hidden_size % model.n_modules == 0,
            f"model.hidden_size={model.hidden_size} is not divisible by model.n_modules={model.n_modules}; "
            f"use a hidden size that is a multiple of {model.n_modules}",
        )
    if model.name == "hrnn":
        _one_of(cfg, "model.connectivity", registry.CONNECTIVITY)
        _check_events(cfg)
        if model.activation in ("clock", "clock_event"):
            _check_clock(cfg)


def _check_events(cfg: DictConfig) -> None:
    """Learned connectivity and the event gate (hrnn/models/recurrent.py, docs/models.md)."""
    model = cfg.model
    _one_of(cfg, "model.activation", registry.ACTIVATIONS)
    _one_of(cfg, "model.gate", registry.GATES)
    for key in ("connectivity_threshold", "gate_threshold"):
        _require(0 < model[key] < 1, f"model.{key}={model[key]} must be in (0, 1): it is compared with a sigmoid")
    for key in ("connectivity_weight", "update_weight", "prediction_weight"):
        _require(model[key] >= 0, f"model.{key}={model[key]} must be non-negative")
    _require(model.gate_slope >= 1, f"model.gate_slope={model.gate_slope} must be at least 1: the annealed gate's "
                                    f"slope rises from 1 to it")
    _require(0 <= model.gate_hard_from <= 1, f"model.gate_hard_from={model.gate_hard_from} must be in [0, 1]: the "
                                             f"fraction of training after which the annealed gate trains hard (1: never)")
    _require(0 <= model.gate_threshold_warmup <= 1,
             f"model.gate_threshold_warmup={model.gate_threshold_warmup} must be in [0, 1]: the fraction of training over "
             f"which the truncated gate's threshold rises from 0 (0: no warm-up)")
    _require(model.gate_threshold_warmup == 0 or (model.gate == "truncated" and model.activation in ("event", "clock_event")),
             f"model.gate_threshold_warmup={model.gate_threshold_warmup} is for model.gate=truncated with activation=event "
             f"or clock_event (here gate={model.gate}, activation={model.activation}); set it to 0 or change those")
    _require(0 <= model.gate_support <= model.gate_threshold,
             f"model.gate_support={model.gate_support} must be in [0, model.gate_threshold={model.gate_threshold}]: the "
             f"width below the truncated gate's threshold where a shut gate still gets a gradient (0: none)")
    _require(model.gate_support == 0 or (model.gate == "truncated" and model.activation in ("event", "clock_event")),
             f"model.gate_support={model.gate_support} is for model.gate=truncated with activation=event "
             f"or clock_event (here gate={model.gate}, activation={model.activation}); set it to 0 or change those")
    _require(0 <= model.gate_open_target < 1,
             f"model.gate_open_target={model.gate_open_target} must be in [0, 1): the share of (sample, step, module) "
             f"updates open that each module's truncated-gate threshold follows (0: a fixed threshold)")
    _require(model.gate_open_target == 0 or (model.gate == "truncated" and model.activation in ("event", "clock_event")),
             f"model.gate_open_target={model.gate_open_target} is for model.gate=truncated with activation=event "
             f"or clock_event (here gate={model.gate}, activation={model.activation}); set it to 0 or change those")
    _require(not model.gate_open_per_module or model.gate_open_target > 0,
             f"model.gate_open_per_module=true is for a truncated gate with model.gate_open_target > 0 (here "
             f"{model.gate_open_target}); set it to false or give the target")
    _require(model.gate_open_rate > 0, f"model.gate_open_rate={model.gate_open_rate} must be positive: how far a "
                                       f"module's threshold moves per training pass per unit of open-share error")
    _require(not (model.gate == "annealed" and model.activation == "chunker"),
             "model.gate=annealed is for activation=event or clock_event; activation=chunker takes soft, hard or stochastic")
    _require(model.chunker_threshold > 0, f"model.chunker_threshold={model.chunker_threshold} must be positive")
    _require(model.activation != "chunker" or model.n_modules >= 2,
             f"model.n_modules={model.n_modules} is too few for activation=chunker: module m wakes on module "
             f"m - 1's errors, so it needs at least 2")


def _check_clock(cfg: DictConfig) -> None:
    basis = cfg.basis
    _one_of(cfg, "basis.init", registry.CLOCK_STARTS)
    if basis.start_periods is not None:
        _check_start_periods(basis, cfg.model.n_modules, sequence_length(cfg.task))
    if basis.name == "period":
        _require(0 < basis.open_ratio <= 1, f"basis.open_ratio={basis.open_ratio} must be in (0, 1]")
        _require(basis.leak >= 0, f"basis.leak={basis.leak} must be non-negative")
        return
    _require(0 < basis.init_weight < 1, f"basis.init_weight={basis.init_weight} must be in (0, 1)")
    _require(basis.sharpness >= 1, f"basis.sharpness={basis.sharpness} must be at least 1")
    _require(not (basis.learn_phase and basis.name == "binary"),
             "basis.learn_phase=true needs a cosine basis: basis=dct or basis=logcos (a binary column has no phase to shift)")
    if basis.size is not None:
        _check_basis_size(basis, sequence_length(cfg.task))
    _check_regularizer(cfg)


def _check_start_periods(basis: DictConfig, n_modules: int, steps: int) -> None:
    periods = list(basis.start_periods)
    _require(len(periods) == n_modules, f"basis.start_periods has {len(periods)} periods for model.n_modules={n_modules}: "
             f"give one per module, fastest first")
    for period in periods:
        _require(1 <= period <= steps, f"basis.start_periods holds {period:g}: each period must be in [1, {steps}] "
                 f"(the sequence length)")
        _require(basis.name != "binary" or float(period).is_integer(),
                 f"basis.start_periods holds {period:g}: the binary basis has whole periods only (t % p == 0)")
    if basis.name == "binary" and basis.size is not None:
        _require(max(periods) <= basis.size, f"basis.start_periods holds {max(periods):g}, beyond basis.size={basis.size}: "
                 f"the binary basis has the periods 1..{basis.size}")


def _check_basis_size(basis: DictConfig, steps: int) -> None:
    _require(basis.size > 0, f"basis.size={basis.size} must be positive or null")
    whole = default_basis_size(basis.name, steps)  # what null gives: the most a sequence can tell apart
    if basis.name == "binary":
        _require(basis.size <= whole, f"basis.size={basis.size} exceeds the sequence length {steps}: "
                 f"periods beyond it tick only at t=0 and are indistinguishable; use at most {whole} or null")
    elif basis.name == "logcos":
        _require(basis.size <= whole, f"basis.size={basis.size} exceeds the {whole} columns (the constant and every half octave) up to the "
                 f"sequence length {steps}; use at most {whole} or null")
    else:
        _require(basis.size <= whole, f"basis.size={basis.size} exceeds the {whole} cosine frequencies a "
                 f"sequence of length {steps} can tell apart (Nyquist); use at most {whole} or null")


def _check_regularizer(cfg: DictConfig) -> None:
    reg = cfg.regularizer
    if reg.name == "softmax":
        _positive(cfg, "regularizer.temperature")
        _require(reg.entropy_weight >= 0, f"regularizer.entropy_weight={reg.entropy_weight} must be non-negative")
    if reg.name == "l1":
        _require(reg.weight >= 0, f"regularizer.weight={reg.weight} must be non-negative")


# ----------------------------------------------------------------------------- what the machine can hold

FLOAT_BYTES = 4


def _check_bounds(cfg: DictConfig) -> None:
    """Refuse, before anything is allocated, a thread count beyond the CPUs (torch crashes on it) and
    buffers that cannot fit in the memory available now (the estimate is a lower bound: what is
    refused cannot run, what passes may still be tight)."""
    threads, cpus = cfg.trainer.num_threads, os.cpu_count() or 1
    _require(threads is None or threads <= cpus, f"trainer.num_threads={threads} exceeds the {cpus} CPUs of this "
                                                 f"machine; use at most {cpus}, or null for all cores")
    available = available_memory()
    if available is None:
        return
    parts = buffer_floats(cfg)
    need = FLOAT_BYTES * sum(parts.values())
    biggest = max(parts, key=parts.get)
    _require(need <= available, f"these settings need at least {_size(need)} of memory and {_size(available)} is "
                                f"available (the largest part: {biggest}, {_size(FLOAT_BYTES * parts[biggest])}); "
                                f"lower trainer.batch_size, trainer.eval_batch_size, task.seq_len or model.hidden_size")


def buffer_floats(cfg: DictConfig) -> dict[str, int]:
    """A lower bound on the floats of a run's biggest buffers, by what they are. On a GPU
    (trainer.device cuda or auto) only those kept in host memory count."""
    task, model, trainer = cfg.task, cfg.model, cfg.trainer
    steps, hidden = sequence_length(task), model.hidden_size
    host = {f"the training inputs ({trainer.batch_size} x {steps})": trainer.batch_size * steps}
    eval_rows = trainer.eval_batch_size
    if "n_val" in task:  # the synthetic tasks' sets, made in full at the start
        host[f"the fixed evaluation sets ({task.n_val} + {task.n_test} x {steps})"] = (task.n_val + task.n_test) * steps
        eval_rows = min(eval_rows, max(task.n_val, task.n_test))
    if trainer.device != "cpu":
        return host
    device = {f"the training states ({trainer.batch_size} x {steps} x {hidden})": trainer.batch_size * steps * hidden,
              f"the evaluation states ({eval_rows} x {steps} x {hidden})": eval_rows * steps * hidden,
              f"the recurrent weights and gradients (2 x {hidden} x {hidden})": 2 * hidden * hidden}
    if model.name == "hrnn" and model.activation in ("clock", "clock_event") and cfg.basis.name != "period":
        size = cfg.basis.size or default_basis_size(cfg.basis.name, steps)
        device[f"the clock's basis ({steps} x {size})"] = steps * size
    return {**host, **device}


def available_memory() -> int | None:
    """Bytes of memory available now: MemAvailable of /proc/meminfo, else free pages; None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            break
        n /= 1024
    return f"{n:.1f} {unit}"
