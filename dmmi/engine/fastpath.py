"""Fast mode vs reference mode: the one switch (``train.fast``) for train, evaluate and predict.

Reference mode is plain fp32 eager PyTorch, roughly how the authors' code runs (PyTorch's
default precision flags: TF32 for cuDNN convolutions, full fp32 matmuls). Fast mode, on CUDA:

* bf16 autocast around forward + loss (:func:`autocast`); no GradScaler is needed for bf16,
* channels_last weights for the convolutions and TF32 for what stays fp32, cuDNN autotuning
  (:func:`prepare_model`),
* the fused AdamW kernel (:func:`fused_adamw_ok` tells the engine when it may ask for it;
  on CPU too),
* optionally ``torch.compile`` (``compile=True``; in place, so state-dict keys do not change).

On CPU fast mode is channels_last and the fused AdamW kernel: autocast stays off unless asked
for explicitly with ``cpu_bf16=True``, since bf16 is slow on CPUs without native bf16 units.

Usage (one training step)::

    model = prepare_model(build_model(cfg.model), device, fast=cfg.train.fast)
    opt = build_optimizer(model, cfg.train, fused=cfg.train.fast)  # honoured where fused_adamw_ok
    with autocast(device, cfg.train.fast):
        out = model(images, input_ids, attention_mask, erased_ids)
        loss = dmmi_loss(out, target, attention_mask, delta, cfg.loss).total
    loss.backward()              # outside autocast
    opt.step()

Call :func:`prepare_model` before wrapping in DDP. Under autocast the logits come out in bf16:
cast with ``.float()`` before anything that needs fp32 (argmax is fine as it is).

MBA's attention is not routed through ``F.scaled_dot_product_attention``: with at most 20
words its attention maps (B, N, L) are far smaller than the (B, C, N) feature maps around
them, and the SDPA realisation sum_r lambda_r SDPA(Q_r, K_r, V) saved neither time nor
activation memory on CPU (``benchmarks/bench_mba.py`` measures it; the transformer layers
of Swin, BERT and the decoders already run SDPA through timm / transformers / PyTorch).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
from torch import nn

__all__ = ["autocast", "autocast_dtype", "cpu_has_native_bf16", "prepare_model", "prepare_images", "fused_adamw_ok", "configure_backends",
           "describe"]

_FUSED_ADAMW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AMX tiles or AVX512-BF16: recent Xeons),
    where bf16 autocast speeds up convolutions and matmuls; elsewhere it is emulated and slow."""
    try:
        import torch.cpu as tcpu

        return bool(tcpu._is_amx_tile_supported() or tcpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch without the probes
        return False


def autocast_dtype(device, fast: bool, *, cpu_bf16: bool = False) -> Optional[torch.dtype]:
    """The autocast dtype the mode uses on ``device``: bf16 or None (no autocast)."""
    device = _device(device)
    if not fast:
        return None
    if device.type == "cuda" or (device.type == "cpu" and cpu_bf16):
        return torch.bfloat16
    return None


def autocast(device, fast: bool, *, cpu_bf16: bool = False) -> ContextManager:
    """Context manager around forward + loss: bf16 autocast on CUDA when ``fast``, a no-op
    otherwise (reference mode, or CPU without ``cpu_bf16=True``)."""
    device = _device(device)
    dtype = autocast_dtype(device, fast, cpu_bf16=cpu_bf16)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(device, fast: bool) -> None:
    """Set the process-wide CUDA precision flags of the mode (no effect on other devices):
    fast = TF32 matmuls + cuDNN autotuning; reference = PyTorch's defaults. Called by
    :func:`prepare_model`; call it again when one process alternates modes (the benchmarks)."""
    device = _device(device)
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = fast  # default False: fp32 matmuls stay fp32
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default in both modes
    torch.backends.cudnn.benchmark = fast  # fixed input sizes: let cuDNN pick its kernels


def prepare_model(model: nn.Module, device, fast: bool, compile: bool | str = False) -> nn.Module:
    """Move ``model`` to ``device`` and set it up for the mode; returns the same module.

    fast: convolution weights in channels_last (4-D parameters only, i.e. the CNN parts;
    every parameter keeps its name and values), TF32 and cuDNN autotuning on CUDA.
    compile: ``torch.compile`` in place (``nn.Module.compile``), only when asked: True, or a
    ``torch.compile`` mode such as ``"reduce-overhead"`` (CUDA graphs: batch-1 latency) or
    ``"max-autotune"``; state-dict keys do not change. Precision flags are process-wide (see
    :func:`configure_backends`).
    """
    device = _device(device)
    model = model.to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    configure_backends(device, fast)
    if compile:
        model.compile(**({"mode": compile} if isinstance(compile, str) and compile != "default" else {}))
    return model


def prepare_images(images: torch.Tensor, device, fast: bool) -> torch.Tensor:
    """(B, 3, H, W) -> on ``device`` (non-blocking from pinned memory), channels_last when fast."""
    images = images.to(_device(device), non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if fast else images


def fused_adamw_ok(model: nn.Module) -> bool:
    """True when the fused AdamW kernel can run: every trainable parameter is on one kind of
    device, CUDA or CPU, in a dtype it supports (pass ``fused=True`` to
    :func:`dmmi.engine.optim.build_optimizer`). On CPU it is 3x faster than the multi-tensor
    step (demo_lite's 13 M trainable parameters, 2 threads: 10 vs 33 ms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= {"cuda", "cpu"} and all(p.dtype in _FUSED_ADAMW_DTYPES for p in params)


def describe(device, fast: bool, *, cpu_bf16: bool = False, compile: bool | str = False) -> dict:
    """What the mode does on ``device``, for logs and benchmark records."""
    device = _device(device)
    dtype = autocast_dtype(device, fast, cpu_bf16=cpu_bf16)
    return {
        "mode": "fast" if fast else "reference",
        "autocast": str(dtype).replace("torch.", "") if dtype is not None else None,
        "channels_last": bool(fast),
        "tf32_matmul": bool(fast and device.type == "cuda"),
        "cudnn_benchmark": bool(fast and device.type == "cuda"),
        "fused_adamw": bool(fast),
        "compile": compile if isinstance(compile, str) else bool(compile),
    }
