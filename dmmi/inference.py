"""Predictor: load a model once, segment many (image, expression) pairs.

    predictor = Predictor.load("runs/demo/best.pt")
    result = predictor.predict("photo.jpg", "the two dogs on the left")
    result.mask          # (H, W) bool at the image's own size
    result.no_target     # True when the expression refers to nothing in the image

Only the inference path runs: the erased sentence, the CCR branch and the contrastive head
cost nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dmmi.data.tokenize import encode, load_tokenizer
from dmmi.data.transforms import image_to_tensor, load_image
from dmmi.engine.distributed import resolve_device
from dmmi.engine.fastpath import autocast
from dmmi.errors import DmmiError
from dmmi.models.io import load_model_file

ImageLike = Union[str, Path, Image.Image, np.ndarray]


@dataclass
class Prediction:
    text: str
    mask: np.ndarray  # (H, W) bool, at the input image's size
    foreground: float  # share of the image's pixels in the mask

    @property
    def no_target(self) -> bool:
        return not bool(self.mask.any())

    def describe(self) -> str:
        return "no target" if self.no_target else f"foreground {100 * self.foreground:.1f}%"


class Predictor:
    """Holds a model in eval mode, its tokenizer and its preprocessing."""

    def __init__(self, model, cfg, *, device: str | torch.device = "auto", fast: bool = True, tokenizer=None):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.fast = fast
        self.size = cfg.model.image_size
        self.max_tokens = cfg.model.max_tokens
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.text_encoder)

    @classmethod
    def load(cls, checkpoint: str | Path, *, device: str = "auto", fast: bool = True, tokenizer=None,
             expect_preset: Optional[str] = None) -> "Predictor":
        model, cfg = load_model_file(checkpoint, expect_preset=expect_preset)
        return cls(model, cfg, device=device, fast=fast, tokenizer=tokenizer)

    def _image(self, image: ImageLike) -> Image.Image:
        if isinstance(image, (str, Path)):
            return load_image(image)
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3:
                raise DmmiError(f"image array must be (H, W, 3), got {image.shape}")
            return Image.fromarray(image.astype(np.uint8))
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        raise DmmiError(f"not an image: {type(image).__name__} (give a path, a PIL image or an (H, W, 3) array)")

    @torch.no_grad()
    def predict(self, image: ImageLike, text: str | Sequence[str]) -> Prediction | list[Prediction]:
        """One image and one expression -> Prediction; a list of expressions -> a list."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise DmmiError("no expression given")
        pil = self._image(image)
        width, height = pil.size
        x = image_to_tensor(pil, self.size)[None].to(self.device)  # (1, 3, S, S)
        encoded = [encode(self.tokenizer, t, self.max_tokens) for t in texts]  # empty text -> DmmiError
        ids = torch.tensor([e.input_ids for e in encoded], device=self.device)
        mask = torch.tensor([e.attention_mask for e in encoded], device=self.device)
        with autocast(self.device, self.fast):
            logits = self.model(x.expand(len(texts), -1, -1, -1), ids, mask).logits  # (T, 2, S, S)
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        masks = logits.argmax(1).bool().cpu().numpy()  # (T, H, W)
        out = [Prediction(text=t, mask=m, foreground=float(m.mean())) for t, m in zip(texts, masks)]
        return out[0] if isinstance(text, str) else out
