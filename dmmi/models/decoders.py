"""The two decoders of DMMI (paper Fig. 2b, 2c) and the contrastive head (§3.3.2).

D is the decoder width: the text width Ct by default (the authors), or smaller (``decoder_dim``,
the laptop preset), in which case the words are projected to D for the decoder's attention.
Skips s1..s4 come from the encoder at strides 4, 8, 16, 32 with widths C1..C4.

* TextToImageDecoder (Eq. 7): Y4 = V4*; Y_n = psi(phi(Y_{n+1}, V_n*), E4*) for n = 3, 2; a third
  phi to stride 4, then a 1x1 conv to 2 class maps.
* ContextClueRecovery (CCR, §3.3.1): the erased sentence's words query the stride-8 decoder
  map through one transformer decoder layer -> reconstructed words E^ (training only).
* ContrastiveHead (§3.3.2): pooled multi-level visual vector V_o and pooled words E_o
  (training only).
* LocationPrior (not in the paper, ``model.location_prior``; on in ``demo_lite``): a
  sentence-conditioned tilt of the foreground logit, per pixel ("leftmost" leans left) or per
  candidate region relative to the others (``location_prior_mode=object``: the left one rises).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dmmi.config import LOCATION_PRIOR_MODES
from dmmi.errors import DmmiError
from dmmi.models.mba import PointwiseConv1d

# On a CPU PyTorch's flash-attention kernel is about 2x slower than its plain math kernel for
# short sequences (fwd+bwd of psi at 6x6 / 12x12 tokens, the 96-px demo: 15 -> 8 ms and 47 -> 22
# ms under bf16 autocast on 2 cores) and faster for long ones (20x20: 96 vs 129 ms). Up to this
# many query x key pairs the decoders ask for the math kernel on a CPU; on a GPU PyTorch chooses.
CPU_MATH_ATTENTION_MAX = 40_000


def attention_kernel(device: torch.device, pairs: int):
    """Context for the attention of ``pairs`` = Lq * Lk (the largest in the layer) on ``device``."""
    if device.type == "cpu" and pairs <= CPU_MATH_ATTENTION_MAX:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


class FuseUp(nn.Module):
    """phi: upsample the deeper map to the skip's size, concatenate, 2 x (3x3 conv, BN, ReLU).

    forward(deep (B, Cd, h, w), skip (B, Cs, H, W)) -> (B, D, H, W)
    """

    def __init__(self, deep_dim: int, skip_dim: int, dim: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(deep_dim + skip_dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(),
        )

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if deep.shape[-2:] != skip.shape[-2:]:
            deep = F.interpolate(deep, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.block(torch.cat([deep, skip], dim=1))


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


class WordQueryLayer(nn.Module):
    """psi: one transformer decoder layer, visual tokens as queries, words as memory.

    forward(x (B, D, H, W), words (B, L, D), word_pad (B, L) bool, True = padding, or None)
      -> (B, D, H, W). Post-norm, ReLU FFN (PyTorch defaults, as the authors).
    ``pos_embed``: add 2D sine position codes to the pixel tokens first (not in the paper: the
    authors' tokens know where they are only through convolution padding).
    """

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, pos_embed: bool = False):
        super().__init__()
        if pos_embed and dim % 4:
            raise DmmiError(f"model.decoder_pos_embed needs a decoder width divisible by 4, got {dim}")
        self.layer = nn.TransformerDecoderLayer(dim, heads, ffn, dropout, batch_first=True)
        self.pos_embed = pos_embed

    def forward(self, x: torch.Tensor, words: torch.Tensor, word_pad: Optional[torch.Tensor]) -> torch.Tensor:
        B, D, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, D)
        if self.pos_embed:
            # torch.export traces with fake tensors: the cache would keep them for later eager calls
            codes = sine_position_codes.__wrapped__ if torch.compiler.is_exporting() else sine_position_codes
            tokens = tokens + codes(H, W, D, x.device, tokens.dtype)
        with attention_kernel(x.device, (H * W) ** 2):  # self-attention is the larger one
            tokens = self.layer(tokens, words, memory_key_padding_mask=word_pad)
        return tokens.transpose(1, 2).reshape(B, D, H, W)  # (B, D, H, W)


@dataclass
class DecoderMaps:
    """What the text-to-image decoder produces (strides relative to the input)."""

    logits: torch.Tensor  # (B, 2, H/4, W/4) class scores, channel 1 = foreground
    y16: torch.Tensor  # (B, D, H/16, W/16) after phi, before psi
    y8: torch.Tensor  # (B, D, H/8, W/8) after phi, before psi (CCR's memory)
    y4: torch.Tensor  # (B, D, H/4, W/4) last map before the classifier


class TextToImageDecoder(nn.Module):
    """Eq. 7. forward(skips [s1..s4], words (B, L, D), word_pad (B, L) or None) -> DecoderMaps."""

    def __init__(self, widths, dim: int, *, heads: int = 8, ffn: int = 2048, dropout: float = 0.1,
                 use_transformer: bool = True, text_dim: Optional[int] = None, pos_embed: bool = False):
        super().__init__()
        c1, c2, c3, c4 = widths
        # words are projected to the decoder width only when it differs from the text width
        self.word_proj = nn.Linear(text_dim, dim) if text_dim and text_dim != dim and use_transformer else None
        self.fuse_16 = FuseUp(c4, c3, dim)
        self.query_16 = WordQueryLayer(dim, heads, ffn, dropout, pos_embed) if use_transformer else None
        self.fuse_8 = FuseUp(dim, c2, dim)
        self.query_8 = WordQueryLayer(dim, heads, ffn, dropout, pos_embed) if use_transformer else None
        self.fuse_4 = FuseUp(dim, c1, dim)
        self.classifier = nn.Conv2d(dim, 2, 1)

    def forward(self, skips, words: torch.Tensor, word_pad: Optional[torch.Tensor]) -> DecoderMaps:
        s1, s2, s3, s4 = skips
        if self.word_proj is not None:
            words = self.word_proj(words)  # (B, L, D)
        y16 = self.fuse_16(s4, s3)
        x = self.query_16(y16, words, word_pad) if self.query_16 is not None else y16
        y8 = self.fuse_8(x, s2)
        x = self.query_8(y8, words, word_pad) if self.query_8 is not None else y8
        y4 = self.fuse_4(x, s1)
        return DecoderMaps(logits=self.classifier(y4), y16=y16, y8=y8, y4=y4)


class LocationPrior(nn.Module):
    """A sentence-conditioned location prior on the foreground logit (not in the paper).

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

    forward(logits (B, 2, h, w), words (B, L, Ct), word_mask (B, L)) -> logits (B, 2, h, w)
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


class ContextClueRecovery(nn.Module):
    """CCR: reconstruct the erased words from the image (training only).

    forward(y8 (B, D, h, w), erased_words (B, L, Ct), word_pad (B, L) or None) -> E^ (B, L, Ct)
    """

    def __init__(self, dim: int, text_dim: int, *, heads: int = 8, ffn: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.visual_memory = nn.Sequential(nn.Conv2d(dim, text_dim, 3, padding=1, bias=False),
                                           nn.BatchNorm2d(text_dim), nn.ReLU())
        self.layer = nn.TransformerDecoderLayer(text_dim, heads, ffn, dropout, batch_first=True)

    def forward(self, y8: torch.Tensor, erased_words: torch.Tensor, word_pad: Optional[torch.Tensor]) -> torch.Tensor:
        memory = self.visual_memory(y8).flatten(2).transpose(1, 2)  # (B, hw, Ct)
        L, hw = erased_words.shape[1], memory.shape[1]
        with attention_kernel(y8.device, L * max(L, hw)):
            return self.layer(erased_words, memory, tgt_key_padding_mask=word_pad)  # (B, L, Ct)


class ContrastiveHead(nn.Module):
    """Pooled visual and text vectors for L_con (training only).

    V_o = fuse_4([fuse_8([avg(y16), avg(y8)]), avg(y4)]); E_o = mean over words of conv(E4*)
    (valid words only; all positions with ``pool_padding`` as the authors).
    forward(maps: DecoderMaps, words (B, L, Ct), word_mask (B, L)) -> (V_o (B, Ct), E_o (B, Ct))
    """

    def __init__(self, dim: int, text_dim: int, *, pool_padding: bool = False):
        super().__init__()
        self.fuse_8 = nn.Linear(2 * dim, text_dim)
        self.fuse_4 = nn.Linear(text_dim + dim, text_dim)
        self.text_align = PointwiseConv1d(text_dim, text_dim)
        self.pool_padding = pool_padding

    def forward(self, maps: DecoderMaps, words: torch.Tensor, word_mask: torch.Tensor):
        v = self.fuse_8(torch.cat([maps.y16.mean((2, 3)), maps.y8.mean((2, 3))], dim=1))  # (B, Ct)
        v = self.fuse_4(torch.cat([v, maps.y4.mean((2, 3))], dim=1))  # (B, Ct)
        e = self.text_align(words.transpose(1, 2))  # (B, Ct, L)
        if self.pool_padding:
            e = e.mean(dim=2)
        else:
            m = word_mask[:, None, :].to(e.dtype)  # (B, 1, L)
            e = (e * m).sum(2) / m.sum(2).clamp_min(1.0)  # (B, Ct)
        return v, e
