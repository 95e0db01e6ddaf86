"""The optimizer (optim.name, from hrnn.config.registry) with its parameter groups, and the learning-rate schedule."""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from hrnn.config import registry


def build_optimizer(optim_cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Clock parameters get their own learning rate: a softmax logit must move by several
    units for a module to change period, which takes thousands of steps at the weights' rate.

    optim.clock_lr=0 freezes the clock at its start (the ablation against a fixed hierarchy):
    its parameters stop requiring gradients, so they get no update, no optimizer state and no
    share of the clipped gradient norm. null gives them optim.lr. Learned connectivity's gate
    logits get optim.connectivity_lr for the same reason (at optim.lr they stayed at their start)."""
    clock = model.clock if hasattr(model, "clock") else None
    clock_params = [p for p in clock.parameters() if p.requires_grad] if clock is not None else []
    if optim_cfg.clock_lr == 0:
        for p in clock_params:
            p.requires_grad_(False)
        clock_params = []
    logits = getattr(model, "connectivity_logits", None)
    gate_params = [logits] if logits is not None else []
    own = {id(p) for p in clock_params + gate_params}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in own]}]
    if clock_params:
        clock_lr = optim_cfg.lr if optim_cfg.clock_lr is None else optim_cfg.clock_lr
        groups.append({"params": clock_params, "lr": clock_lr, "weight_decay": 0.0})
    if gate_params:  # like a clock logit, a gate logit must move by units, not by lr-sized steps
        gate_lr = optim_cfg.lr if optim_cfg.connectivity_lr is None else optim_cfg.connectivity_lr
        groups.append({"params": gate_params, "lr": gate_lr, "weight_decay": 0.0})
    kind = getattr(torch.optim, registry.OPTIMIZERS[optim_cfg.name])
    optimizer = kind(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    for group in optimizer.param_groups:  # the schedule scales each group's own starting rate
        group["base_lr"] = group["lr"]
    return optimizer


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate of step `step` (1-based) as a fraction of optim.lr: cosine runs from 1 at
    step 1 to 0 after trainer.steps. A function of the step alone, so a resumed run keeps it."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
    return 1.0


def schedule_step(optimizer: torch.optim.Optimizer, schedule: str, step: int, steps: int) -> None:
    """Set every group's rate for step `step`: its starting rate times the schedule's factor."""
    factor = lr_factor(schedule, step, steps)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
