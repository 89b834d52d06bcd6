"""Model files: weights + the resolved config that built them, never arbitrary pickles.

Three layouts, chosen by the path:
* ``.safetensors``: tensors, with ``{"format": "dmmi-model", "preset", "config" (JSON)}``
  in the metadata;
* any other suffix (``.pt``, ``.pth``, ...): a ``torch.save`` dict ``{format, version, preset,
  config, model, extra}`` readable with ``torch.load(weights_only=True)``. Training checkpoints
  use the same keys (plus optimizer/scheduler/RNG state), so they load here too;
* no suffix, or an existing folder: a Hub-style model directory (``config.json``,
  ``model.safetensors``, ``README.md``: :mod:`dmmi.hub`); a Hub repo id loads the same way.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from dmmi.engine.checkpoint import atomic_write
from dmmi.errors import DmmiError

FORMAT = "dmmi-model"
TRAINING_FORMAT = "dmmi-checkpoint"  # dmmi.engine.checkpoint: model + optimizer + ...; extra.config


def save_model_file(path: str | Path, model: torch.nn.Module, cfg, extra: Optional[dict] = None) -> Path:
    """Write ``model``'s weights and ``cfg`` (a Config) to ``path`` atomically (layout by path: module docstring)."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        from dmmi.hub import save_pretrained

        return save_pretrained(model, cfg, path, extra=extra)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    cfg_dict = cfg.to_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "preset": str(cfg.preset), "config": json.dumps(cfg_dict),
                "extra": json.dumps(extra or {}, default=str)}
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    else:
        payload = {"format": FORMAT, "version": 1, "preset": str(cfg.preset), "config": cfg_dict,
                   "model": state, "extra": json.loads(json.dumps(extra or {}, default=str))}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def read_model_file(path: str | Path, *, revision: Optional[str] = None) -> tuple[dict, dict]:
    """-> (state_dict, config dict). One-line DmmiError for anything that is not ours.

    ``path``: a model file (.pt / .safetensors, a training checkpoint), a model directory or a
    Hub repo id (:mod:`dmmi.hub`)."""
    state, cfg, _ = read_model_file_extra(path, revision=revision)
    return state, cfg


def read_model_file_extra(path: str | Path, *, revision: Optional[str] = None) -> tuple[dict, dict, dict]:
    """:func:`read_model_file` -> (state_dict, config dict, extra): what the file records beside the
    weights (``{"val": ..., "step": ..., "trained_on": ...}``; {} for a training checkpoint)."""
    from dmmi import hub

    if Path(path).is_dir() or hub.looks_like_repo_id(str(path)):
        return hub.read_model_dir(path, revision=revision)
    path = Path(path)
    if not path.is_file():
        raise DmmiError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise DmmiError(f"{path}: not a readable safetensors file or truncated ({str(e)[:120]})") from None
        if meta.get("format") != FORMAT:
            raise DmmiError(f"{path}: safetensors file without dmmi metadata (not a dmmi model)")
        return state, json.loads(meta["config"]), _plain_dict(json.loads(meta.get("extra") or "{}"))
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise DmmiError(f"{path}: not a dmmi checkpoint or it is truncated ({first})") from None
    if isinstance(payload, dict) and payload.get("format") == TRAINING_FORMAT and \
            isinstance(payload.get("extra"), dict) and "config" in payload["extra"]:
        return payload["model"], payload["extra"]["config"], {}  # a training checkpoint (dmmi.engine)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model" not in payload:
        hint = " (an authors' RIS-DMMI checkpoint? run `dmmi convert` first)" if isinstance(payload, dict) and \
            "bert_model" in payload else ""
        raise DmmiError(f"{path}: not a dmmi checkpoint{hint}")
    return payload["model"], payload["config"], _plain_dict(payload.get("extra"))


def _plain_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def load_model_file(path: str | Path, *, expect_preset: Optional[str] = None, map_location="cpu",
                    revision: Optional[str] = None):
    """Rebuild the model a file, model directory or Hub repo id describes and load its weights.
    -> (model, Config).

    ``expect_preset``: refuse a file of another preset with a clear message.
    """
    state, cfg_dict = read_model_file(path, revision=revision)
    return model_from_state(str(path), state, cfg_dict, expect_preset=expect_preset, map_location=map_location)


def model_from_state(path: str, state: dict, cfg_dict: dict, *, expect_preset: Optional[str] = None,
                     map_location="cpu"):
    """:func:`read_model_file`'s (state_dict, config dict) of ``path`` -> (model, Config)."""
    from dmmi.config import Config
    from dmmi.models import build_model

    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DmmiError(f"{path}: the file holds no model weights (its 'model' entry is empty or not a state dict)")
    if not isinstance(cfg_dict, dict):
        raise DmmiError(f"{path}: the file holds no config (its 'config' entry is not a mapping)")
    cfg = Config.from_dict(cfg_dict, source=str(path))
    if expect_preset and cfg.preset != expect_preset:
        raise DmmiError(f"{path}: checkpoint of preset {cfg.preset!r}, but {expect_preset!r} was asked for")
    cfg.model.text_pretrained = False  # the file holds the text encoder's weights
    cfg.model.backbone_weights = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg.model, text_width=None if any(k.startswith("text_encoder.") for k in state)
                            else _text_width(state))
    load_weights(model, state, source=str(path))
    return model.to(map_location), cfg


def _text_width(state: dict) -> int:
    w = state.get("contrastive.text_align.weight")
    if w is None:
        w = state["fusions.0.mba.region_attn.0.word_key.0.weight"]
        return int(w.shape[1])
    return int(w.shape[0])


def load_weights(model: torch.nn.Module, state: dict, *, source: str = "weights") -> None:
    """Strict load with a one-line error naming the first mismatching key."""
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise DmmiError(f"{source}: weights do not fit the model: {k} has shape {tuple(v.shape)}, "
                            f"the model expects {tuple(own[k].shape)}")
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unexpected or missing:
        what = f"unexpected {unexpected[0]!r}" if unexpected else f"missing {missing[0]!r}"
        raise DmmiError(f"{source}: weights do not fit the model ({len(unexpected)} unexpected, "
                        f"{len(missing)} missing tensors; {what})")
    model.load_state_dict(state)
