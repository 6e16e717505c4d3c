"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from zoo.train.config import TrainConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Names (as ``named_parameters()`` gives them) of the parameters trained without weight decay.

    The one rule: a parameter with fewer than 2 dims (norm weights, biases, per-channel vectors) or one named in
    its module's class attribute ``no_weight_decay`` (e.g. ``Mamba.no_weight_decay = ("A_log", "D")``) is exempt;
    embeddings and other matrices are decayed. It is read from the module classes, not from the tensors, so a
    model rebuilt by ``from_pretrained`` gets the same groups (and a resumed optimizer state fits them).
    """
    exempt: set[int] = set()
    for module in model.modules():
        declared = getattr(type(module), "no_weight_decay", ())
        if isinstance(declared, str):
            declared = (declared,)
        for name, p in module.named_parameters(recurse=False):
            if p.ndim < 2 or name in declared:
                exempt.add(id(p))  # a parameter shared by several modules is exempt if any of them says so
    return {name for name, p in model.named_parameters() if id(p) in exempt}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and everything :func:`no_decay_names` exempts (tied weights counted once)."""
    exempt = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() yields a tied parameter once
        if p.requires_grad:
            (no_decay if name in exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the config's lr, betas, eps and weight decay."""
    if len(cfg.betas) != 2:
        raise ValueError(f"train.betas must have two values like [0.9, 0.95] (got {cfg.betas}).")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps
    )


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup from 0, then cosine down to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following :func:`lr_factor` over ``cfg.steps`` updates."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
