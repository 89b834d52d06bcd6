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

What is not in the paper (psi's position codes, the location prior) lives in
:mod:`dmmi.models.extras`; ``build_model`` injects it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dmmi.models.mba import PointwiseConv1d

# On a CPU PyTorch's flash-attention kernel is slower than its plain math kernel for short
# sequences and faster for long ones (benchmarks/README.md, "Notes moved from the model code").
# Up to this many query x key pairs the decoders ask for the math kernel on a CPU; on a GPU
# PyTorch chooses.
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


class WordQueryLayer(nn.Module):
    """psi: one transformer decoder layer, visual tokens as queries, words as memory.

    forward(x (B, D, H, W), words (B, L, D), word_pad (B, L) bool, True = padding, or None)
      -> (B, D, H, W). Post-norm, ReLU FFN (PyTorch defaults, as the authors).
    ``token_hook``: an injected module (tokens (B, HW, D), H, W) -> tokens, applied to the pixel
    tokens first; none in the paper (build_model: extras.SinePositionCodes).
    """

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, token_hook: Optional[nn.Module] = None):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(dim, heads, ffn, dropout, batch_first=True)
        self.token_hook = token_hook

    def forward(self, x: torch.Tensor, words: torch.Tensor, word_pad: Optional[torch.Tensor]) -> torch.Tensor:
        B, D, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, D)
        if self.token_hook is not None:
            tokens = self.token_hook(tokens, H, W)  # (B, HW, D)
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
    """Eq. 7. forward(skips [s1..s4], words (B, L, Ct), word_pad (B, L) or None) -> DecoderMaps.

    ``token_hook``: handed to both psi layers (:class:`WordQueryLayer`); none in the paper.
    """

    def __init__(self, widths, dim: int, *, heads: int = 8, ffn: int = 2048, dropout: float = 0.1,
                 use_transformer: bool = True, text_dim: Optional[int] = None,
                 token_hook: Optional[nn.Module] = None):
        super().__init__()
        c1, c2, c3, c4 = widths
        # words are projected to the decoder width only when it differs from the text width
        self.word_proj = nn.Linear(text_dim, dim) if text_dim and text_dim != dim and use_transformer else None
        self.fuse_16 = FuseUp(c4, c3, dim)
        self.query_16 = WordQueryLayer(dim, heads, ffn, dropout, token_hook) if use_transformer else None
        self.fuse_8 = FuseUp(dim, c2, dim)
        self.query_8 = WordQueryLayer(dim, heads, ffn, dropout, token_hook) if use_transformer else None
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
