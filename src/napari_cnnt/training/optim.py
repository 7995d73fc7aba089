"""The optimiser and the learning-rate schedule a :class:`~napari_cnnt.training.settings.TrainSettings` asks for."""

from __future__ import annotations

import math

import torch
from torch import nn

from .settings import TrainSettings


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    if s.no_w_decay:
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": s.weight_decay}]
    if s.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=1e-8)
    if s.optimizer == "nadam":
        return torch.optim.NAdam(groups, lr=s.lr, betas=s.betas, eps=1e-8, momentum_decay=0.004)
    return torch.optim.SGD(groups, lr=s.lr, momentum=0.9)


def make_scheduler(opt: torch.optim.Optimizer, s: TrainSettings, total_steps: int):
    """The reference's schedules; OneCycleLR steps every batch, the others every epoch."""
    sched = torch.optim.lr_scheduler
    if s.scheduler == "ReduceLROnPlateau":
        return sched.ReduceLROnPlateau(opt, "min", factor=0.8, patience=5, cooldown=2, min_lr=2e-6)
    if s.scheduler == "StepLR":
        return sched.StepLR(opt, step_size=5, gamma=0.8)
    if s.scheduler == "WarmupCosine":
        warm = max(1, round(s.warmup * total_steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            done = min(1.0, (step - warm) / max(1, total_steps - warm))
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done))

        return sched.LambdaLR(opt, factor)
    if s.scheduler == "OneCycleLR":
        return sched.OneCycleLR(
            opt, max_lr=s.lr, total_steps=total_steps, pct_start=0.3, anneal_strategy="cos",
            cycle_momentum=True, base_momentum=0.85, max_momentum=0.95, div_factor=25, final_div_factor=1e4,
        )
    return None
