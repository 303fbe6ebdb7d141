"""Optimizer parameter groups and learning-rate schedules of the paper's recipes.

Mask2Former trains with AdamW (lr 1e-4, weight decay 0.05) where:

- the backbone's learning rate is multiplied by ``backbone_lr_multiplier`` (0.1 in the paper);
- normalisation layers (LayerNorm, GroupNorm, BatchNorm) and embeddings (``nn.Embedding`` such as the learnable
  queries and level embeddings, Swin's relative-position-bias tables and absolute position embeddings) get no weight
  decay (``weight_decay_norm`` and ``weight_decay_embedding``, both 0.0 in the paper);
- the learning rate follows a step schedule (COCO: ×0.1 at two milestones) or a polynomial decay with power 0.9
  (ADE20K), each after an optional linear warm-up.

Everything here is driven by the recipe's ``optimizer`` and ``schedule`` dicts (see ``training/recipes/``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# Parameters of Mask2Former's backbone live under this prefix in transformers' (and our) state-dict layout.
BACKBONE_PREFIX = "model.pixel_level_module.encoder."
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# Parameters that are embeddings although they are not nn.Embedding modules (Swin's tables, the pixel decoder's
# level embedding held as a plain nn.Parameter).
_EMBEDDING_NAME_PARTS = ("relative_position_bias_table", "position_embedding", "position_embeddings", "level_embed")


def _parameter_kinds(model: nn.Module) -> dict[str, str]:
    """Map each trainable parameter name to "norm", "embedding" or "other"."""
    kinds: dict[str, str] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith(("norm", "norm2d")):
                kinds[full_name] = "norm"
            elif isinstance(module, nn.Embedding) or any(part in full_name for part in _EMBEDDING_NAME_PARTS):
                kinds[full_name] = "embedding"
            else:
                kinds[full_name] = "other"
    return kinds


def build_param_groups(
    model: nn.Module, optimizer_config: dict[str, Any], backbone_prefix: str = BACKBONE_PREFIX
) -> list[dict[str, Any]]:
    """Split a model's parameters into AdamW groups by (backbone or not) × (weight-decay kind).

    Args:
        model: a `Mask2FormerForUniversalSegmentation` (or any model of a family), not yet wrapped by DDP.
        optimizer_config: the recipe's ``optimizer`` dict: ``lr``, ``weight_decay``, ``weight_decay_norm``,
            ``weight_decay_embedding``, ``backbone_lr_multiplier``.
        backbone_prefix: where the backbone's parameters start in the state dict (the family's
            ``backbone_prefix``; Mask2Former's by default).

    Returns:
        A list of param-group dicts (``params``, ``lr``, ``weight_decay``, ``name``) with no empty group; every
        trainable parameter is in exactly one group.
    """
    base_lr = float(optimizer_config["lr"])
    weight_decay = {
        "other": float(optimizer_config["weight_decay"]),
        "norm": float(optimizer_config.get("weight_decay_norm", 0.0)),
        "embedding": float(optimizer_config.get("weight_decay_embedding", 0.0)),
    }
    backbone_multiplier = float(optimizer_config.get("backbone_lr_multiplier", 1.0))
    kinds = _parameter_kinds(model)
    groups: dict[tuple[bool, str], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if name not in kinds:  # frozen
            continue
        in_backbone = name.startswith(backbone_prefix)
        key = (in_backbone, kinds[name])
        if key not in groups:
            groups[key] = {
                "name": f"{'backbone' if in_backbone else 'head'}-{kinds[name]}",
                "params": [],
                "lr": base_lr * (backbone_multiplier if in_backbone else 1.0),
                "weight_decay": weight_decay[kinds[name]],
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(
    model: nn.Module, optimizer_config: dict[str, Any], backbone_prefix: str = BACKBONE_PREFIX
) -> torch.optim.Optimizer:
    """AdamW over `build_param_groups` (the only optimizer the paper uses)."""
    name = optimizer_config.get("name", "adamw").lower()
    if name != "adamw":
        raise ValueError(f"optimizer name {name!r} is not supported; use 'adamw' (the paper's optimizer)")
    return torch.optim.AdamW(
        build_param_groups(model, optimizer_config, backbone_prefix),
        lr=float(optimizer_config["lr"]),
        betas=tuple(optimizer_config.get("betas", (0.9, 0.999))),
        eps=float(optimizer_config.get("eps", 1e-8)),
    )


def lr_multiplier(schedule_config: dict[str, Any], max_steps: int) -> Callable[[int], float]:
    """The factor applied to each group's base learning rate at optimizer step ``step`` (0-based).

    ``{"name": "step", "milestones": [...], "gamma": 0.1}``: ``gamma ** (number of milestones <= step)``.
    ``{"name": "poly", "power": 0.9}``: ``(1 - step / max_steps) ** power`` (detectron2's WarmupPolyLR).
    ``{"name": "constant"}``: 1. Each may add ``warmup_steps`` and ``warmup_factor``: a linear ramp from
    ``warmup_factor`` to 1 over the first ``warmup_steps`` steps, multiplied into the schedule.
    """
    name = schedule_config.get("name", "constant")
    warmup_steps = int(schedule_config.get("warmup_steps", 0))
    warmup_factor = float(schedule_config.get("warmup_factor", 1.0))
    if name == "step":
        milestones = sorted(int(m) for m in schedule_config.get("milestones", []))
        gamma = float(schedule_config.get("gamma", 0.1))

        def decay(step: int) -> float:
            return gamma ** sum(step >= milestone for milestone in milestones)

    elif name == "poly":
        power = float(schedule_config.get("power", 0.9))

        def decay(step: int) -> float:
            return max(0.0, 1.0 - step / max(1, max_steps)) ** power

    elif name == "cosine":

        def decay(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps) / max(1, max_steps)))

    elif name == "constant":

        def decay(step: int) -> float:
            return 1.0

    else:
        raise ValueError(f"schedule name {name!r} is not supported; use 'step', 'poly', 'cosine' or 'constant'")

    def multiplier(step: int) -> float:
        warmup = 1.0
        if step < warmup_steps:
            alpha = step / warmup_steps
            warmup = warmup_factor * (1.0 - alpha) + alpha
        return warmup * decay(step)

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule_config: dict[str, Any], max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` with `lr_multiplier` for every group (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule_config, max_steps))
