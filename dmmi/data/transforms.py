"""Image/mask/sentence transforms: resize to S x S, ImageNet normalisation, horizontal flip.

The image is resized bilinearly, the mask with nearest neighbour (it stays binary). A
horizontal flip mirrors image and mask and swaps the words 'left' and 'right' in the
expression (also in 'leftmost', 'right-hand', ...), so "the man on the left" still names
the same person; flip the text *before* tokenizing it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmmi.data import images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# 'left'/'right' as a word or with a direction suffix; not inside 'bright', 'alright', 'upright'
_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most|ward|wards|hand|handed|side)?\b)", re.IGNORECASE)


def flip_sentence(sentence: str) -> str:
    """Swap 'left' <-> 'right' (whole words and leftmost/rightward/... forms), keeping case."""

    def swap(m: re.Match) -> str:
        word = m.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _LEFT_RIGHT.sub(swap, sentence)


def load_image(path: str | Path) -> Image.Image:
    """Open a dataset image file as RGB; a missing, corrupt or non-image file raises DmmiError.

    :func:`dmmi.data.images.load_image` without a pixel cap and without the EXIF turn: dataset
    masks (instances.json) are drawn on the pixels as stored, and their size is checked against
    the file's. 8-bit images without transparency come out exactly as ``Image.convert("RGB")``
    makes them.
    """
    return images.load_image(path, max_pixels=None, exif=False)


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> FloatTensor (3, size, size): bilinear resize, ImageNet mean/std."""
    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
    arr = (arr - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Binary mask (H, W) -> LongTensor (size, size) in {0, 1}, nearest-neighbour resize."""
    m = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8))
    m = m.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(m, dtype=np.int64).copy())


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of the normalisation: (..., 3, H, W) -> values in [0, 1] (for overlays)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1)


def prepare_sample(image: Image.Image, mask: np.ndarray, sentence: str, size: int, *,
                   flip: bool = False) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Resize/normalise image and mask; with ``flip`` mirror both and swap left/right words.

    Returns image FloatTensor (3, S, S), mask LongTensor (S, S), the (flipped) sentence.
    """
    mask = np.asarray(mask)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask[:, ::-1]
        sentence = flip_sentence(sentence)
    return image_to_tensor(image, size), mask_to_tensor(mask, size), sentence
