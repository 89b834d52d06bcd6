"""Model construction: the only place where configuration meets modules.

    model = build_model(load_config("dmmi_swin_b").model)

``PRESETS`` lists the named configurations (YAML files in ``dmmi/configs``).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from dmmi.config import Config, ModelConfig, available_presets, load_config
from dmmi.models import extras
from dmmi.models.backbones import build_backbone
from dmmi.models.decoders import ContextClueRecovery, ContrastiveHead, TextToImageDecoder
from dmmi.models.dmmi import DMMI, DMMIOutput
from dmmi.models.mba import StageFusion
from dmmi.models.text_encoder import TextEncoder

PRESETS = tuple(available_presets())

__all__ = ["DMMI", "DMMIOutput", "PRESETS", "build_model", "build_preset"]


def build_model(cfg: ModelConfig | Config, *, text_width: Optional[int] = None) -> DMMI:
    """Build DMMI from a ModelConfig.

    ``text_width``: build without a text encoder, for callers that feed word features of
    that width directly to ``forward_features`` (parity tests, cached features).
    What is not in the paper (:mod:`dmmi.models.extras`) is injected here, where the config asks.
    """
    if isinstance(cfg, Config):
        cfg = cfg.model
    text_encoder = None
    if text_width is None:
        text_encoder = TextEncoder(cfg.text_encoder, pretrained=cfg.text_pretrained,
                                   config_overrides=cfg.text_config, trainable_layers=cfg.text_trainable_layers,
                                   frozen=cfg.text_frozen,
                                   cache=extras.TextFeatureCache(cfg.text_cache) if cfg.text_cache else None)
        text_width = text_encoder.width
    visual = build_backbone(cfg)
    # Swin hands the decoder LayerNorm(R_v) (LAVT); CNNs hand it the fused map (the authors' R101)
    skip = "residual" if cfg.backbone.startswith("swin") else "fused"
    fusions = nn.ModuleList(
        StageFusion(c, text_width, multi_scale=cfg.multi_scale, bidirectional=cfg.bidirectional,
                    gated=i < 3 or skip == "fused", skip=skip)
        for i, c in enumerate(visual.widths)
    )
    head = dict(heads=cfg.decoder_heads, ffn=cfg.decoder_ffn, dropout=cfg.decoder_dropout)
    dim = cfg.decoder_dim or text_width
    pos_codes = extras.SinePositionCodes(dim) if cfg.decoder_pos_embed and cfg.decoder_transformer else None
    decoder = TextToImageDecoder(visual.widths, dim, use_transformer=cfg.decoder_transformer, text_dim=text_width,
                                 token_hook=pos_codes, **head)
    ccr = ContextClueRecovery(dim, text_width, **head) if cfg.i2t_decoder else None
    contrastive = (ContrastiveHead(dim, text_width, pool_padding=cfg.compat == "ris-dmmi")
                   if cfg.contrastive else None)
    logit_hooks = {}
    if cfg.location_prior:  # built last, as before: the other parts' random init does not change
        logit_hooks["location_prior"] = extras.LocationPrior(text_width, gain=cfg.location_prior_gain,
                                                             mode=cfg.location_prior_mode)
    return DMMI(text_encoder=text_encoder, visual=visual, fusions=fusions, decoder=decoder, ccr=ccr,
                contrastive=contrastive, compat=cfg.compat, logit_hooks=logit_hooks)


def build_preset(name: str, overrides: tuple | list = (), **kwargs) -> DMMI:
    """Build the model of a named preset (``--set`` style overrides allowed)."""
    return build_model(load_config(name, overrides).model, **kwargs)
