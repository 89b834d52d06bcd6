"""Multi-scale Bi-direction Attention (MBA, paper §3.1.2) and the per-stage fusion around it.

Notation: B batch, C visual width of the stage, Ct text width, H x W the stage's map
(N = H*W pixels), L tokens. Words travel channel-first, (B, Ct, L), as 1x1 Conv1d wants.

Text-to-image alignment (Eq. 2-4). For each region size k in {1, 3, 5}, every pixel's k x k
neighbourhood is scored against every word and the scores are soft-maxed over words; the
maps are mixed with learnable weights lambda^alpha = softmax(3 params) and multiply the
projected words. The neighbourhood is *concatenated* (unfold of a channel-reduced map,
zero padding k//2, then a 1x1 conv back to C), the authors' realisation; Eq. 2 as printed
sums the per-pixel scores instead. We implement the concatenation (so the authors' weights
convert) and test it against a direct loop over pixels and window offsets.

Image-to-text alignment (Eq. 5-6). For each token window w in {1, 2, 3} (1 = the token,
2 = previous + current, 3 = previous + current + next, replicate-padded at the ends), the
window is scored against every pixel, soft-maxed over pixels, mixed with lambda^beta and
multiplies the projected pixels.

Where the stage is narrower than the text and than its pixel count (C < Ct, C < N: the early
stages), the image-to-text branch never builds its (B, Ct, N) pixel keys and values. Their
InstanceNorm'd 1x1 projections are linear in the centred pixels,
IN(W v + b) = diag(1/sigma) W (v - mean(v)), with sigma^2 = diag(W Cov(v) W^T) + eps, so
q . key = ((q / sigma) W) . (v - mean) and attn @ value = (attn @ (v - mean)^T) W^T / sigma:
(B, L, C) and (B, C, C) products instead of (B, Ct, N) maps (the covariance costs B*Ct*C*C,
the keys B*Ct*C*N: hence C < N). The same function and gradients, tested against the direct path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

REGION_SIZES = (1, 3, 5)  # text-to-image: k x k pixel regions
TOKEN_WINDOWS = (1, 2, 3)  # image-to-text: consecutive tokens
_REGION_REDUCTION = {1: 1, 3: 2, 5: 4}  # channels per pixel before concatenating k*k of them


class PointwiseConv1d(nn.Conv1d):
    """``nn.Conv1d(cin, cout, 1)`` computed as one matrix product: (B, cin, N) -> (B, cout, N).

    Same parameters and state-dict keys as the convolution (the authors' weights load as they
    are). On a CPU the convolution pays a fixed cost per call (mkldnn), which dominated MBA's
    small maps (benchmarks/README.md, "Notes moved from the model code"). The result is a
    transposed view (channel stride 1).
    """

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.transpose(1, 2), self.weight.squeeze(-1), self.bias).transpose(1, 2)  # (B, cout, N)


def _conv1x1(cin: int, cout: int, norm: bool = False) -> nn.Sequential:
    """1x1 Conv1d over a sequence (B, cin, N) -> (B, cout, N), optionally InstanceNorm'd over N."""
    layers: list[nn.Module] = [PointwiseConv1d(cin, cout)]
    if norm:
        layers.append(nn.InstanceNorm1d(cout))
    return nn.Sequential(*layers)


class RegionWordAttention(nn.Module):
    """Eq. 2 for one region size k: pixel-region-to-word attention weights.

    forward(v (B, C, H, W), words (B, Ct, L), word_mask (B, L)) -> (B, N, L), rows sum to 1
    over valid words.
    """

    def __init__(self, vis_dim: int, text_dim: int, region: int):
        super().__init__()
        self.region = region
        inner = vis_dim // _REGION_REDUCTION[region]
        self.pixel_reduce = _conv1x1(vis_dim, inner, norm=True)
        self.region_query = _conv1x1(inner * region * region, vis_dim, norm=True)
        self.word_key = _conv1x1(text_dim, vis_dim)
        self.scale = vis_dim**-0.5

    def forward(self, v: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = v.shape
        k = self.region
        reduced = self.pixel_reduce(v.flatten(2))  # (B, C/r, N)
        regions = F.unfold(reduced.view(B, -1, H, W), kernel_size=k, padding=k // 2)  # (B, C/r*k*k, N)
        query = self.region_query(regions)  # (B, C, N)
        mask = word_mask[:, None, :].to(query.dtype)  # (B, 1, L)
        key = self.word_key(words) * mask  # (B, C, L)
        scores = torch.bmm(query.transpose(1, 2), key) * self.scale  # (B, N, L)
        scores = scores + (mask - 1.0) * 1e4  # padding words get -1e4
        return scores.softmax(dim=-1)


class WordWindowPixelAttention(nn.Module):
    """Eq. 5 for one token window w: word-window-to-pixel attention weights.

    forward(v (B, C, H, W), words (B, Ct, L), word_mask (B, L)) -> (B, L, N), rows sum to 1
    over pixels; padding words get a zero query (uniform attention).
    """

    def __init__(self, vis_dim: int, text_dim: int, window: int):
        super().__init__()
        self.window = window
        inner = vis_dim // window
        self.word_reduce = _conv1x1(text_dim, inner)
        self.window_query = _conv1x1(inner * window, text_dim)
        self.pixel_key = _conv1x1(vis_dim, text_dim, norm=True)
        self.scale = vis_dim**-0.5

    def masked_query(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """-> masked word-window queries (B, L, Ct)."""
        w = self.window
        reduced = self.word_reduce(words)  # (B, c, L)
        # replicate-pad the ends (w//2 before, (w-1)//2 after) by concatenation: same values as
        # F.pad(mode="replicate"), whose backward has no fake kernel for torch.compile (2.14)
        reduced = torch.cat([reduced[:, :, :1].expand(-1, -1, w // 2), reduced,
                             reduced[:, :, -1:].expand(-1, -1, (w - 1) // 2)], dim=2)  # (B, c, L+w-1)
        windows = F.unfold(reduced.unsqueeze(-1), kernel_size=(w, 1))  # (B, c*w, L)
        query = self.window_query(windows).transpose(1, 2)  # (B, L, Ct)
        return query * word_mask[:, :, None].to(query.dtype)

    def forward(self, v: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        query = self.masked_query(words, word_mask)  # (B, L, Ct)
        key = self.pixel_key(v.flatten(2))  # (B, Ct, N)
        scores = torch.bmm(query, key) * self.scale  # (B, L, N)
        return scores.softmax(dim=-1)

    def forward_factored(self, stats: "PixelStats", words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """``forward`` without the (B, Ct, N) keys: query . IN(W v + b) = ((query / sigma) W) . (v - mean)."""
        query = self.masked_query(words, word_mask)  # (B, L, Ct)
        weight, inv_sigma = stats.projection(self.pixel_key)  # (Ct, C), (B, Ct)
        q = (query * inv_sigma[:, None, :].to(query.dtype)) @ weight.to(query.dtype)  # (B, L, C)
        scores = torch.bmm(q, stats.centred.to(q.dtype)) * self.scale  # (B, L, N)
        return scores.softmax(dim=-1)


class PixelStats:
    """Centred pixels (B, C, N) and their covariance (B, C, C) over N, computed once per stage
    in fp32, for the factored image-to-text branch."""

    def __init__(self, v: torch.Tensor):
        with torch.autocast(device_type=v.device.type, enabled=False):
            flat = v.flatten(2).float()  # (B, C, N)
            self.centred = flat - flat.mean(dim=2, keepdim=True)  # (B, C, N)
            self.cov = torch.bmm(self.centred, self.centred.transpose(1, 2)) / flat.shape[2]  # (B, C, C)

    def projection(self, conv_in: nn.Sequential):
        """For Sequential(Conv1d(C, Ct, 1), InstanceNorm1d(Ct)) -> (W (Ct, C), 1/sigma (B, Ct)), fp32."""
        conv, norm = conv_in[0], conv_in[1]
        with torch.autocast(device_type=self.cov.device.type, enabled=False):
            weight = conv.weight.squeeze(-1).float()  # (Ct, C)
            var = ((weight @ self.cov) * weight).sum(-1)  # (B, Ct): diag(W Cov W^T)
            return weight, torch.rsqrt(var + norm.eps)


class MultiScaleBidirectionalAttention(nn.Module):
    """MBA: returns a visual residual R_v (B, C, H, W) and a language residual R_l (B, Ct, L).

    R_v = project(GELU(conv(V)) * IN(conv(sum_k lambda^a_k A_k @ value(E))))  (Eq. 3-4, LAVT's
    pixel-word pattern); R_l = conv(sum_w lambda^b_w A_w @ IN(conv(V)))  (Eq. 6). R_l is None
    when ``bidirectional`` is off.
    """

    def __init__(self, vis_dim: int, text_dim: int, *, multi_scale: bool = True, bidirectional: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        regions = REGION_SIZES if multi_scale else (1,)
        windows = TOKEN_WINDOWS if multi_scale else (1,)
        self.region_attn = nn.ModuleList(RegionWordAttention(vis_dim, text_dim, k) for k in regions)
        self.region_mix = nn.Parameter(torch.ones(len(regions)))  # lambda^alpha (softmax-ed)
        self.word_value = _conv1x1(text_dim, vis_dim)
        self.visual_out = _conv1x1(vis_dim, vis_dim, norm=True)
        self.pixel_project = nn.Sequential(PointwiseConv1d(vis_dim, vis_dim), nn.GELU(), nn.Dropout(dropout))
        self.fused_project = nn.Sequential(PointwiseConv1d(vis_dim, vis_dim), nn.GELU(), nn.Dropout(dropout))
        self.bidirectional = bidirectional
        self.factored_i2t: Optional[bool] = None  # None: factored when C < min(Ct, N); True / False force a path
        if bidirectional:
            self.window_attn = nn.ModuleList(WordWindowPixelAttention(vis_dim, text_dim, w) for w in windows)
            self.window_mix = nn.Parameter(torch.ones(len(windows)))  # lambda^beta (softmax-ed)
            self.pixel_value = _conv1x1(vis_dim, text_dim, norm=True)
            self.text_out = _conv1x1(text_dim, text_dim)

    def text_to_image(self, v, words, word_mask) -> torch.Tensor:
        """-> attended words per pixel (B, C, N), before the pixel-word product."""
        mix = self.region_mix.softmax(0)
        attn = sum(mix[i] * a(v, words, word_mask) for i, a in enumerate(self.region_attn))  # (B, N, L)
        value = self.word_value(words) * word_mask[:, None, :].to(v.dtype)  # (B, C, L)
        return self.visual_out(torch.bmm(attn, value.transpose(1, 2)).transpose(1, 2))  # (B, C, N)

    def image_to_text(self, v, words, word_mask, factored: Optional[bool] = None) -> torch.Tensor:
        """-> language residual R_l (B, Ct, L). ``factored`` (default: when C < Ct and C < N) skips the
        (B, Ct, N) pixel keys and values (module docstring); both paths compute the same."""
        mix = self.window_mix.softmax(0)
        if factored is None:
            C, N = v.shape[1], v.shape[2] * v.shape[3]
            factored = self.factored_i2t if self.factored_i2t is not None else C < min(words.shape[1], N)
        if not factored:
            attn = sum(mix[i] * a(v, words, word_mask) for i, a in enumerate(self.window_attn))  # (B, L, N)
            value = self.pixel_value(v.flatten(2))  # (B, Ct, N)
            return self.text_out(torch.bmm(attn, value.transpose(1, 2)).transpose(1, 2))  # (B, Ct, L)
        stats = PixelStats(v)
        attn = sum(mix[i] * a.forward_factored(stats, words, word_mask)
                   for i, a in enumerate(self.window_attn))  # (B, L, N)
        weight, inv_sigma = stats.projection(self.pixel_value)  # (Ct, C), (B, Ct)
        pooled = torch.bmm(attn, stats.centred.transpose(1, 2).to(attn.dtype))  # (B, L, C)
        value = (pooled @ weight.t().to(pooled.dtype)) * inv_sigma[:, None, :].to(pooled.dtype)  # (B, L, Ct)
        return self.text_out(value.transpose(1, 2))  # (B, Ct, L)

    def forward(self, v: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor):
        B, C, H, W = v.shape
        attended = self.text_to_image(v, words, word_mask)  # (B, C, N)
        r_v = self.fused_project(self.pixel_project(v.flatten(2)) * attended).view(B, C, H, W)
        r_l = self.image_to_text(v, words, word_mask) if self.bidirectional else None
        return r_v, r_l


class StageFusion(nn.Module):
    """One MBA step of the hierarchical encoder (§3.1.1), after the blocks of a stage.

    forward(v (B, C, H, W), words (B, Ct, L), word_mask (B, L)) ->
      v*     (B, C, H, W): v + gate(R_v) * R_v, goes on into the next stage,
      words* (B, Ct, L):   words + GELU(conv(R_l)) (unchanged without bi-direction),
      skip   (B, C, H, W): what the decoder receives from this stage: LayerNorm(R_v)
                           (``skip='residual'``, Swin, as LAVT) or v* itself (``skip='fused'``,
                           the authors' ResNet variant).
    The gate's last layer starts at zero, so a fresh model's visual stream is the plain backbone.
    With residual skips the last stage has no gate (``gated=False``): nothing reads its v*.
    """

    def __init__(self, vis_dim: int, text_dim: int, *, multi_scale: bool = True, bidirectional: bool = True,
                 dropout: float = 0.0, gated: bool = True, skip: str = "residual"):
        super().__init__()
        self.mba = MultiScaleBidirectionalAttention(vis_dim, text_dim, multi_scale=multi_scale,
                                                    bidirectional=bidirectional, dropout=dropout)
        self.visual_gate = None
        if gated:
            self.visual_gate = nn.Sequential(nn.Linear(vis_dim, vis_dim, bias=False), nn.ReLU(),
                                             nn.Linear(vis_dim, vis_dim, bias=False), nn.Tanh())
            # zero only the last layer: both zero (as LAVT writes it) would get zero gradients forever
            nn.init.trunc_normal_(self.visual_gate[0].weight, std=0.02)
            nn.init.zeros_(self.visual_gate[2].weight)
        self.language_update = (nn.Sequential(PointwiseConv1d(text_dim, text_dim), nn.GELU())
                                if bidirectional else None)
        if skip not in ("residual", "fused"):
            raise ValueError(f"skip must be 'residual' or 'fused', got {skip!r}")
        self.skip_norm = nn.LayerNorm(vis_dim) if skip == "residual" else None

    def forward(self, v: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor):
        r_v, r_l = self.mba(v, words, word_mask)
        r_last = r_v.permute(0, 2, 3, 1)  # (B, H, W, C)
        if self.visual_gate is not None:
            v = v + (self.visual_gate(r_last) * r_last).permute(0, 3, 1, 2)  # (B, C, H, W)
        if self.language_update is not None:
            words = words + self.language_update(r_l)
        skip = self.skip_norm(r_last).permute(0, 3, 1, 2) if self.skip_norm is not None else v  # (B, C, H, W)
        return v, words, skip
