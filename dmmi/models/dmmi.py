"""DMMI: the Dual Multi-Modal Interaction network (paper Fig. 2), composed of injected parts.

    images (B, 3, H, W), input_ids / attention_mask (B, L) [, erased_ids (B, L)]
      -> text encoder -> E (B, L, Ct)                                      Fig. 2a
      -> hierarchical encoder: 4 x (visual stage, StageFusion/MBA)        Fig. 2a
           -> skips s1..s4 (LayerNorm of each R_v), final words E4*
      -> TextToImageDecoder(skips, E4*) -> 2 class maps -> upsample        Fig. 2b
      -> training only: ContextClueRecovery(y8, E') -> E^; ContrastiveHead  Fig. 2c

At inference (``model.eval()``) the erased sentence is not encoded and the CCR branch and the
contrastive head do not run. What is not in the paper (:mod:`dmmi.models.extras`) comes in
through the parts' hooks, injected by ``build_model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dmmi.errors import DmmiError
from dmmi.models.backbones import StageBackbone
from dmmi.models.decoders import ContextClueRecovery, ContrastiveHead, TextToImageDecoder
from dmmi.models.text_encoder import TextEncoder


@dataclass
class DMMIOutput:
    logits: torch.Tensor  # (B, 2, H, W) class scores at the input size; channel 1 = foreground
    words_final: torch.Tensor  # (B, L, Ct) E4*, the words after the last MBA
    skips: list = field(default_factory=list)  # 4 x (B, C_i, H_i, W_i), LayerNorm(R_v) per stage
    reconstructed: Optional[torch.Tensor] = None  # (B, L, Ct) E^ from CCR (training only)
    pooled_visual: Optional[torch.Tensor] = None  # (B, Ct) V_o (training only)
    pooled_text: Optional[torch.Tensor] = None  # (B, Ct) E_o (training only)

    def masks(self) -> torch.Tensor:
        """Predicted binary masks (B, H, W), bool: argmax of the two class maps."""
        return self.logits.argmax(dim=1).bool()


class DMMI(nn.Module):
    """The full network. Parts are built by :func:`dmmi.models.build_model`.

    ``compat='ris-dmmi'`` reproduces the authors' computation where ours deliberately differs:
    no word padding mask in the decoder's and CCR's attention.

    ``logit_hooks``: injected modules, none in the paper, each (logits (B, 2, H/4, W/4), words E
    (B, L, Ct), word_mask (B, L)) -> logits, applied in order before the upsampling; each is a
    submodule under its name (its state-dict prefix).
    """

    def __init__(self, *, text_encoder: Optional[TextEncoder], visual: StageBackbone, fusions: nn.ModuleList,
                 decoder: TextToImageDecoder, ccr: Optional[ContextClueRecovery] = None,
                 contrastive: Optional[ContrastiveHead] = None, compat: str = "dmmi",
                 logit_hooks: Optional[Mapping[str, nn.Module]] = None):
        super().__init__()
        self.text_encoder = text_encoder
        self.visual = visual
        self.fusions = fusions
        self.decoder = decoder
        self.ccr = ccr
        self.contrastive = contrastive
        self.compat = compat
        for name, hook in (logit_hooks or {}).items():
            if hasattr(self, name):
                raise DmmiError(f"logit hook {name!r} would replace the model's own {name!r}")
            self.add_module(name, hook)
        self.logit_hooks = tuple(logit_hooks or ())  # their names, in order

    # ---------------------------------------------------------------- encoder (Fig. 2a)
    def encode(self, images: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor):
        """images (B, 3, H, W), words (B, L, Ct), word_mask (B, L) -> (skips, E4* (B, L, Ct))."""
        x = self.visual.stem(images)
        w = words.transpose(1, 2)  # (B, Ct, L)
        skips = []
        for i, fusion in enumerate(self.fusions):
            x = self.visual.stage(i, x)
            v, w, skip = fusion(self.visual.to_nchw(x), w, word_mask)
            x = self.visual.from_nchw(v)
            skips.append(skip)
        return skips, w.transpose(1, 2)  # E4*: (B, L, Ct)

    def forward_features(self, images: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                         erased_words: Optional[torch.Tensor] = None) -> DMMIOutput:
        """Everything after the text encoder. words / erased_words: (B, L, Ct); word_mask (B, L)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise DmmiError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise DmmiError(f"image height and width must be multiples of 32, got {tuple(images.shape[-2:])}")
        if words.shape[0] != images.shape[0]:
            raise DmmiError(f"{images.shape[0]} images but {words.shape[0]} expressions")
        skips, words_final = self.encode(images, words, word_mask)
        word_pad = None if self.compat == "ris-dmmi" else ~word_mask.bool()  # (B, L) True = padding
        maps = self.decoder(skips, words_final, word_pad)
        logits = maps.logits  # (B, 2, H/4, W/4)
        for name in self.logit_hooks:
            logits = getattr(self, name)(logits, words, word_mask)  # (B, 2, H/4, W/4)
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)
        out = DMMIOutput(logits=logits, words_final=words_final, skips=skips)
        if self.training:
            if self.ccr is not None:
                if erased_words is None:
                    raise DmmiError("the CCR branch (model.i2t_decoder) trains on the erased sentence T', but no "
                                    "erased ids were given: pass erased_ids (data.erase=true) or turn the branch off")
                out.reconstructed = self.ccr(maps.y8, erased_words, word_pad)
            if self.contrastive is not None:
                out.pooled_visual, out.pooled_text = self.contrastive(maps, words_final, word_mask)
        return out

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                erased_ids: Optional[torch.Tensor] = None) -> DMMIOutput:
        """images (B, 3, H, W); input_ids, attention_mask, erased_ids (B, L) -> DMMIOutput."""
        if self.text_encoder is None:
            raise DmmiError("this model has no text encoder; call forward_features with word features")
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise DmmiError(f"input_ids and attention_mask must both be (B, L), got {tuple(input_ids.shape)} "
                            f"and {tuple(attention_mask.shape)}")
        # host tensors only: on a GPU the check would be a device sync every step, under torch.compile a
        # graph break (the tokenizer and the datasets refuse empty expressions before they get here)
        if (attention_mask.device.type == "cpu" and not torch.compiler.is_compiling()
                and bool((attention_mask.sum(1) == 0).any())):
            raise DmmiError("an expression is empty (attention_mask has no token)")
        if self.training and self.ccr is not None and erased_ids is None:
            raise DmmiError("the CCR branch (model.i2t_decoder) trains on the erased sentence T', but no erased_ids "
                            "were given: pass them (data.erase=true) or turn the branch off")
        erased = None
        if self.training and self.ccr is not None:
            # T and T' in one batch (same mask for both, as the authors): one call is cheaper than two
            both = self.text_encoder(torch.cat([input_ids, erased_ids]), torch.cat([attention_mask, attention_mask]))
            words, erased = both.chunk(2)  # 2 x (B, L, Ct)
        else:
            words = self.text_encoder(input_ids, attention_mask)
        return self.forward_features(images, words, attention_mask, erased)
