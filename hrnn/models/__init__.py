"""Models: built from the `model`, `basis` and `regularizer` config groups for a task's spec."""
from __future__ import annotations

from omegaconf import DictConfig

from hrnn.models.baselines import LEM, CoRNN, authors_head_init, chrono_init, forget_bias_init
from hrnn.models.clock import BasisClock, Clock, FixedClock, PeriodClock, log_cosine_size
from hrnn.models.recurrent import ChunkerGate, ClockedRNN, ConnectivityGates, EventGate, SequenceModel, TorchRNN
from hrnn.tasks.base import TaskSpec


def default_basis_size(basis: str, seq_len: int) -> int:
    """Binary: every period up to T. Cosine: every frequency up to Nyquist. logcos: every half octave up to T."""
    if basis == "logcos":
        return log_cosine_size(seq_len)
    return seq_len if basis == "binary" else seq_len // 2 + 1


def build_clock(model_cfg: DictConfig, basis_cfg: DictConfig, reg_cfg: DictConfig, seq_len: int) -> Clock:
    n_modules = model_cfg.n_modules
    if model_cfg.name == "cwrnn":
        return FixedClock([2**m for m in range(n_modules)])
    if basis_cfg.name == "period":
        return PeriodClock(n_modules, seq_len, init=basis_cfg.init, start_periods=basis_cfg.start_periods,
                           open_ratio=basis_cfg.open_ratio, leak=basis_cfg.leak)
    size = basis_cfg.size or default_basis_size(basis_cfg.name, seq_len)
    return BasisClock(
        basis=basis_cfg.name,
        size=size,
        n_modules=n_modules,
        seq_len=seq_len,
        regularizer=reg_cfg.name,
        init=basis_cfg.init,
        start_periods=basis_cfg.start_periods,
        init_weight=basis_cfg.init_weight,
        sharpness=basis_cfg.sharpness,
        learn_phase=basis_cfg.learn_phase,
        **_regularizer_settings(reg_cfg),
    )


def _regularizer_settings(reg_cfg: DictConfig) -> dict[str, float]:
    """The clock's arguments that the chosen regularizer's config group holds."""
    if reg_cfg.name == "softmax":
        return {"temperature": reg_cfg.temperature, "entropy_weight": reg_cfg.entropy_weight}
    if reg_cfg.name == "l1":
        return {"l1_weight": reg_cfg.weight}
    return {}


def build_model(cfg: DictConfig, spec: TaskSpec) -> SequenceModel:
    """The model named by cfg.model.name with a head for the task (config already validated)."""
    model_cfg = cfg.model
    hidden = model_cfg.hidden_size
    if model_cfg.name == "cwrnn":
        clock = build_clock(model_cfg, cfg.basis, cfg.regularizer, spec.seq_len)
        backbone = ClockedRNN(spec.input_size, hidden, clock, "slow_to_fast")
    elif model_cfg.name == "hrnn":
        activation, n_modules = model_cfg.activation, model_cfg.n_modules
        clocked = activation in ("clock", "clock_event")
        clock = build_clock(model_cfg, cfg.basis, cfg.regularizer, spec.seq_len) if clocked else None
        gates = None
        if model_cfg.connectivity == "learned":
            gates = ConnectivityGates(n_modules, model_cfg.connectivity_init, model_cfg.connectivity_weight,
                                      model_cfg.connectivity_threshold)
        event = None
        if activation in ("event", "clock_event"):
            event = EventGate(spec.input_size, hidden, n_modules, model_cfg.gate, model_cfg.gate_bias,
                              model_cfg.gate_threshold, model_cfg.update_weight, model_cfg.gate_slope,
                              model_cfg.gate_hard_from, model_cfg.gate_threshold_warmup, model_cfg.gate_support,
                              model_cfg.gate_open_target, model_cfg.gate_open_rate,
                              model_cfg.gate_open_per_module)
        if activation == "chunker":
            event = ChunkerGate(spec.input_size, hidden, n_modules, model_cfg.gate, model_cfg.chunker_threshold,
                                model_cfg.gate_threshold, model_cfg.update_weight, model_cfg.prediction_weight)
        backbone = ClockedRNN(spec.input_size, hidden, clock, model_cfg.connectivity, gates, event)
    elif model_cfg.name == "lem":
        backbone = LEM(spec.input_size, hidden, model_cfg.dt)
    elif model_cfg.name == "cornn":
        backbone = CoRNN(spec.input_size, hidden, model_cfg.dt, model_cfg.gamma, model_cfg.epsilon)
    else:
        backbone = build_torch_rnn(model_cfg, spec)
    model = SequenceModel(backbone, hidden, spec.output_size, spec.readout)
    if model_cfg.name == "lem":
        authors_head_init(model.head)  # the authors' kaiming_normal_ classifier weight
    return model


def build_torch_rnn(model_cfg: DictConfig, spec: TaskSpec) -> TorchRNN:
    """torch.nn's LSTM, GRU or RNN with the gate-bias initialisation model.init names (lstm, gru)."""
    backbone = TorchRNN(model_cfg.name, spec.input_size, model_cfg.hidden_size, model_cfg.num_layers)
    init = model_cfg.get("init", "default")
    if init == "chrono":
        chrono_init(backbone, model_cfg.chrono_t_max or spec.seq_len)
    elif init == "forget1":
        forget_bias_init(backbone, 1.0)
    return backbone


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["build_model", "build_clock", "count_parameters", "SequenceModel", "Clock"]
