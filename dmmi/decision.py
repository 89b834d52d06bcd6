"""The no-target decision: class scores -> masks, the one rule that :class:`dmmi.inference.Predictor`,
``dmmi predict`` / ``serve`` and ``dmmi evaluate`` all apply.

The paper's decision is the argmax of the two class maps (a pixel is referred when its referred
score beats the background one; an all-background mask means "no target"). Not in the paper,
and off by default: a ``threshold`` on the foreground probability, and a ``min_area`` under
which a mask counts as no target (a false positive of a few pixels on an expression that refers
to nothing).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from dmmi.errors import DmmiError


def check_threshold(value, what: str = "threshold") -> Optional[float]:
    """None (the paper's argmax) or a probability in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise DmmiError(f"{what} must be a foreground probability in [0, 1] (or None: the argmax), got {value!r}")
    return float(value)


def check_min_area(value, what: str = "min_area") -> float:
    """A share of the image in [0, 1): a mask smaller than it counts as no target."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise DmmiError(f"{what} must be a share of the image in [0, 1), got {value!r}")
    return float(value)


def threshold_masks(logits: torch.Tensor, threshold: Optional[float]) -> torch.Tensor:
    """(B, 2, H, W) class scores -> (B, H, W) bool masks: foreground probability > ``threshold``
    (None: the paper's argmax, which is the same as > 0.5).

    The comparison is made on the logits (p = sigmoid(referred - background) > t as
    referred - background > log(t / (1 - t)), t kept in [1e-12, 1 - 1e-12]), as
    :class:`dmmi.inference.Predictor` always has; the argmax counts NaN as the maximum, as
    ``argmax`` does, without an int64 (B, H, W)."""
    x = logits.float()
    background, referred = x[:, 0], x[:, 1]
    if threshold is None:  # == x.argmax(1) == 1
        return (referred > background) | (referred.isnan() & ~background.isnan())
    t = min(max(float(threshold), 1e-12), 1 - 1e-12)
    return (referred - background) > float(np.log(t / (1 - t)))


def decide_masks(logits: torch.Tensor, threshold: Optional[float] = None, min_area: float = 0.0) -> torch.Tensor:
    """(B, 2, H, W) class scores -> (B, H, W) bool masks: the no-target decision, the one function that
    :class:`dmmi.inference.Predictor` and :func:`dmmi.engine.evaluate.run_evaluation` both use. :func:`threshold_masks`, then a
    mask covering less than ``min_area`` of its image (the exact share, in float64) emptied.
    Predictor passes the logits upsampled to the image's own size, evaluation those at the evaluation
    resolution: the share is measured there."""
    masks = threshold_masks(logits, threshold)
    if min_area:
        n = masks[0].numel() if len(masks) else 1
        share = masks.flatten(1).sum(dim=1).cpu().double() / n  # (B,) == count_nonzero / size
        keep = (share >= min_area).to(masks.device)
        masks = masks & keep[:, None, None]
    return masks


def describe_min_area(min_area: float) -> str:
    """'; no target below 0.5% of the image', or '' without a minimum area."""
    return f"; no target below {100 * min_area:g}% of the image" if min_area else ""


def describe_decision(threshold: Optional[float], min_area: float) -> str:
    """The no-target decision in words, e.g. 'mask = p(foreground) > 0.70; no target below 0.5% of the image'."""
    what = "mask = argmax (p(foreground) > 0.5)" if threshold is None else f"mask = p(foreground) > {threshold:g}"
    return what + describe_min_area(min_area)
