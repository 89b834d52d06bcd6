"""Optimiser and learning-rate schedule (SPEC §3): AdamW with polynomial decay per iteration.

Weight decay applies to weight matrices / kernels only: never to normalisation parameters,
biases, position tables or any other 1-D parameter (the authors' release does the same).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from dmmi.config import TrainConfig
from dmmi.engine.fastpath import fused_adamw_ok
from dmmi.errors import DmmiError

NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "position_embeddings", "pos_embed")
NORM_TYPES = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _no_decay(module: nn.Module, param_name: str, full_name: str, param: nn.Parameter) -> bool:
    return (
        param.ndim <= 1
        or param_name == "bias"
        or isinstance(module, NORM_TYPES)
        or any(key in full_name for key in NO_DECAY_NAMES)
    )


def param_groups(model: nn.Module, weight_decay: float, text_lr: Optional[float] = None) -> list[dict]:
    """Split the trainable parameters into a decayed and a non-decayed group.

    Returns a list of AdamW parameter groups ``{"name", "params", "weight_decay"}``: "decay"
    (``weight_decay``) and "no_decay" (0.0), leaving out a group that would be empty. Each
    trainable parameter appears exactly once (shared parameters too); frozen ones are skipped.
    With ``text_lr`` the text encoder's parameters (``text_encoder.*``) form their own two groups,
    "text_decay" and "text_no_decay", with ``"lr": text_lr`` (a pretrained BERT wants a smaller
    learning rate than freshly initialised fusion layers).
    """
    groups = {name: [] for name in ("decay", "no_decay", "text_decay", "text_no_decay")}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            kind = "no_decay" if _no_decay(module, param_name, full_name, param) else "decay"
            text = text_lr is not None and full_name.startswith("text_encoder.")
            groups[f"text_{kind}" if text else kind].append(param)
    out = []
    for name, params in groups.items():
        if params:
            group = {"name": name, "params": params, "weight_decay": 0.0 if "no_decay" in name else weight_decay}
            if name.startswith("text_"):
                group["lr"] = text_lr
            out.append(group)
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``cfg.lr`` and ``cfg.weight_decay``.

    ``fused=True`` selects the fused kernel; it is honoured only where
    :func:`dmmi.engine.fastpath.fused_adamw_ok` says it can run (otherwise the multi-tensor
    implementation is used).
    """
    groups = param_groups(model, cfg.weight_decay, cfg.text_lr)
    if not groups:
        raise DmmiError("build_optimizer: the model has no trainable parameters")
    if fused and fused_adamw_ok(model):
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    # multi-tensor kernels on every device (PyTorch picks them by default only on CUDA)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def poly_factor(step: int, total_steps: int, power: float) -> float:
    """Learning-rate multiplier (1 - step / total_steps) ** power, 0 from ``total_steps`` on."""
    return max(0.0, 1.0 - step / total_steps) ** power


def poly_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float,
                   progress: Optional[Callable[[int], float]] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Polynomial decay, stepped once per optimiser iteration (call ``scheduler.step()``
    after each ``optimizer.step()``): lr = base_lr * (1 - step / total_steps) ** power.

    ``progress(step)``: another measure of how far the run is, in [0, 1] (the share of a time
    or step budget spent): the decay then follows whichever is further along, so a run
    cut by its budget still ends with a small learning rate (``train.schedule: budget``).
    """
    if total_steps < 1:
        raise DmmiError(f"poly_scheduler: total_steps must be >= 1, got {total_steps}")
    if power < 0:
        raise DmmiError(f"train.poly_power must be >= 0, got {power}")

    def factor(step: int) -> float:
        if progress is None:
            return poly_factor(step, total_steps, power)
        return max(0.0, 1.0 - max(step / total_steps, min(1.0, progress(step)))) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
