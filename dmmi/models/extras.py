"""What this implementation adds to DMMI: none of it is in the paper, all of it is off in the
paper presets (on in ``demo_lite``). :func:`dmmi.models.build_model` injects each one where the
paper's modules leave a hook; without them they compute the paper's network.

* :class:`LocationPrior` (``model.location_prior``): a sentence-conditioned tilt of the
  foreground logit; a logit hook of :class:`~dmmi.models.dmmi.DMMI`, registered as
  ``location_prior`` (state-dict keys ``location_prior.slopes.*``).
* :class:`SinePositionCodes` (``model.decoder_pos_embed``): 2D sine codes added to psi's pixel
  tokens; the token hook of :class:`~dmmi.models.decoders.WordQueryLayer` (no parameters).
* :class:`TextFeatureCache` (``model.text_cache``): the frozen text encoder's word features of
  seen expressions; the cache of :class:`~dmmi.models.text_encoder.TextEncoder` (no parameters).
* L_empty (``loss.w_empty``): :func:`dmmi.losses.empty_mask_loss`, in the losses' own
  not-in-the-paper part (the losses are pure functions of the outputs, chosen by LossConfig).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dmmi.config import LOCATION_PRIOR_MODES
from dmmi.errors import DmmiError


# ------------------------------------------------------------------ location prior
class LocationPrior(nn.Module):
    """A sentence-conditioned location prior on the foreground logit.

    g = gain * Linear(masked mean of the text encoder's words) in R^2 gives a tilt g_x * x + g_y * y
    over centred coordinates (x, y) in [-1, 1]; "the leftmost ..." learns g_x < 0. The decoder
    alone learnt no direction at all in the 96-px demo (its outputs for "leftmost" and "rightmost"
    differed by 0.003 in probability). Zero-initialised: a fresh model predicts as without it.

    mode "pixel": every pixel's foreground logit gains the tilt at its own coordinates.
    mode "object": a comparison among the decoder's candidates, wherever they lie. The candidates
    are the connected regions of the incoming map with foreground probability above
    ``CANDIDATE_PROB`` (8-connected, found by masked max-pooling; no gradient); each region takes
    the tilt at its bounding-box centre, so a whole object moves together, and the tilts are
    centred on their mean over the candidates (weighted by probability): with "the leftmost"
    the left candidate rises and the right one falls by the same amount whether both lie in the
    left or the right half (a pixel tilt lowers both in the wrong half). Other pixels are left
    alone; no candidate, or zero slopes: no change.

    forward(logits (B, 2, h, w), words E (B, L, Ct), word_mask (B, L)) -> logits (B, 2, h, w)
    """

    MODES = LOCATION_PRIOR_MODES
    CANDIDATE_PROB = 0.1  # object mode: hesitant maps (two candidates at p = 0.4) must still count

    def __init__(self, text_dim: int, gain: float = 10.0, mode: str = "pixel"):
        super().__init__()
        if mode not in self.MODES:
            raise DmmiError(f"location prior mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.gain, self.mode = gain, mode
        self.slopes = nn.Linear(text_dim, 2)
        nn.init.zeros_(self.slopes.weight)
        nn.init.zeros_(self.slopes.bias)

    def forward(self, logits: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        B, _, h, w = logits.shape
        m = word_mask[:, :, None].to(words.dtype)  # (B, L, 1)
        pooled = (words * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, Ct)
        g = (self.gain * self.slopes(pooled)).to(logits.dtype)  # (B, 2)
        if self.mode == "pixel":
            xs, ys = _centred(w, logits), _centred(h, logits)  # (w,), (h,)
            tilt = g[:, 0, None, None] * xs[None, None, :] + g[:, 1, None, None] * ys[None, :, None]  # (B, h, w)
            return torch.stack([logits[:, 0], logits[:, 1] + tilt], dim=1)  # (B, 2, h, w)
        prob = torch.sigmoid((logits[:, 1] - logits[:, 0]).detach().float())  # (B, h, w) foreground probability
        candidate = prob > self.CANDIDATE_PROB  # (B, h, w)
        # box centres in fp32, under bf16 autocast too
        cx, cy = candidate_box_centres(candidate, _centred(w, prob), _centred(h, prob))  # 2 x (B, h, w)
        g = g.float()
        tilt = g[:, 0, None, None] * cx + g[:, 1, None, None] * cy  # (B, h, w), constant per region
        weight = prob * candidate  # (B, h, w)
        centre = (weight * tilt).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1e-6)  # (B,) mean tilt of the candidates
        shift = (tilt - centre[:, None, None]) * candidate  # (B, h, w), zero off the candidates
        return torch.stack([logits[:, 0], logits[:, 1] + shift.to(logits.dtype)], dim=1)  # (B, 2, h, w)


def _centred(n: int, like: torch.Tensor) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1] along a side of n pixels: (n,), ``like``'s dtype and device."""
    return (torch.arange(n, device=like.device, dtype=like.dtype) + 0.5) / n * 2 - 1


@torch.no_grad()
def candidate_box_centres(candidate: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor):
    """Bounding-box centres of the 8-connected regions of ``candidate`` (B, h, w) bool.

    xs (w,), ys (h,): the pixel coordinates. Returns cx, cy (B, h, w): inside a region, its box
    centre; elsewhere the pixel's own coordinates. Each region is labelled with the largest pixel
    index in it (masked 3x3 max-pooling until nothing changes, at most h + w rounds: enough for
    any region short of a maze, which would keep a few labels), then boxes are reduced per label.
    """
    B, h, w = candidate.shape
    n = h * w
    inside = candidate[:, None].float()  # (B, 1, h, w)
    index = torch.arange(1, n + 1, device=xs.device, dtype=torch.float32).view(1, 1, h, w)  # exact below 2^24
    label = index * inside  # (B, 1, h, w): own index + 1 on the candidates, 0 elsewhere
    # stop once settled (checked every 4 rounds) only eager on a CPU: on a GPU the check is a host sync,
    # torch.compile (a graph break) and torch.export (ONNX) cannot branch on data; a settled map stays
    # as it is, so all h + w rounds give the same labels
    check = (label.device.type == "cpu" and not torch.compiler.is_compiling()
             and not torch.compiler.is_exporting())
    for step in range(h + w):
        grown = F.max_pool2d(label, 3, stride=1, padding=1) * inside  # one ring further, inside only
        if check and step % 4 == 3 and torch.equal(grown, label):
            break
        label = grown
    label = label.long().flatten(1)  # (B, n): region label, 0 off the candidates
    grid_x = xs[None, :].expand(h, w).reshape(1, n).expand(B, n)  # (B, n)
    grid_y = ys[:, None].expand(h, w).reshape(1, n).expand(B, n)  # (B, n)

    def centre(grid: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, h, w)
        big = torch.finfo(grid.dtype).max
        hi = torch.full((B, n + 1), -big, dtype=grid.dtype, device=grid.device).scatter_reduce(1, label, grid, "amax")
        lo = torch.full((B, n + 1), big, dtype=grid.dtype, device=grid.device).scatter_reduce(1, label, grid, "amin")
        mid = (hi.gather(1, label) + lo.gather(1, label)) / 2  # (B, n)
        return torch.where(label > 0, mid, grid).view(B, h, w)

    return centre(grid_x), centre(grid_y)


# ------------------------------------------------------------------ decoder position codes
@functools.lru_cache(maxsize=16)  # the same few map sizes every step: build each once, never mutated
def sine_position_codes(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """DETR's 2D sine codes: (h * w, dim), half the channels for y, half for x (dim % 4 == 0)."""
    if dim % 4:
        raise ValueError(f"sine position codes need a width divisible by 4, got {dim}")
    n = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(n, device=device, dtype=torch.float32) / n))  # (n,)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    py, px = ys[:, None] * freq, xs[:, None] * freq  # (h, n), (w, n)
    py = torch.cat([py.sin(), py.cos()], 1)[:, None, :].expand(h, w, 2 * n)  # (h, w, dim/2)
    px = torch.cat([px.sin(), px.cos()], 1)[None, :, :].expand(h, w, 2 * n)  # (h, w, dim/2)
    return torch.cat([py, px], -1).reshape(h * w, dim).to(dtype or torch.float32)  # (h*w, dim)


class SinePositionCodes(nn.Module):
    """Adds 2D sine position codes to psi's pixel tokens (the authors' tokens know where they are
    only through convolution padding). No parameters.

    forward(tokens (B, H*W, D), H, W) -> tokens + codes (B, H*W, D)
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4:
            raise DmmiError(f"model.decoder_pos_embed needs a decoder width divisible by 4, got {dim}")
        self.dim = dim

    def forward(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # torch.export traces with fake tensors: the cache would keep them for later eager calls
        codes = sine_position_codes.__wrapped__ if torch.compiler.is_exporting() else sine_position_codes
        return tokens + codes(h, w, tokens.shape[-1], tokens.device, tokens.dtype)  # (B, h*w, D)


# ------------------------------------------------------------------ text feature cache
class TextFeatureCache(nn.Module):
    """The word features of up to ``size`` expressions of a frozen text encoder (least recently used
    go first), keyed by their token ids, attention mask, device and autocast dtype; only the rows
    not seen before are encoded. A frozen encoder is a fixed function of its input, so a hit returns
    what encoding would (up to float rounding: a row's features moved by up to 5e-6 with the other
    rows of its batch, MiniLM, fp32). Loading weights or moving the module empties it (it is a child
    of the encoder: ``_apply`` and ``_load_from_state_dict`` reach it). Costs L x Ct floats per
    expression on the encoder's device (20 x 384 x 4 B = 30 KB for MiniLM) and, on a GPU, one small
    host copy of the ids per call (to build the keys). No parameters.

    forward(encode, input_ids (B, L), attention_mask (B, L)) -> word features (B, L, Ct), where
    ``encode(ids, mask)`` is the encoder's own computation.
    """

    def __init__(self, size: int):
        super().__init__()
        if size < 1:
            raise DmmiError(f"model.text_cache must be >= 1 for a cache, got {size}")
        self.size = size
        self.entries: OrderedDict = OrderedDict()  # key -> (L, Ct) features
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.entries.clear()

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half() of the encoder: stale features
        self.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):  # the encoder's new weights: stale features
        self.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        # the keys read the ids on the host: step aside under torch.compile and CUDA-graph capture
        if torch.compiler.is_compiling() or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            return encode(input_ids, attention_mask)
        device = input_ids.device
        amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        ids, mask = input_ids.cpu().numpy(), attention_mask.cpu().numpy()  # (B, L) each, a small host copy
        keys = [(str(device), amp, ids[i].tobytes(), mask[i].tobytes()) for i in range(len(ids))]
        todo: dict = {}  # key -> first row with it
        for i, key in enumerate(keys):
            if key not in self.entries and key not in todo:
                todo[key] = i
        if todo:
            rows = torch.tensor(list(todo.values()), device=device)
            fresh = encode(input_ids[rows], attention_mask[rows])  # (n_new, L, Ct)
            for key, feats in zip(todo, fresh):
                self.entries[key] = feats.clone()  # its own storage: evicting one row frees it
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        out = torch.stack([self.entries[key] for key in keys])  # (B, L, Ct)
        for key in keys:
            self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return out
