"""Predictor: load a model once, segment many (image, expression) pairs.

    predictor = Predictor.load("runs/demo/best.pt")
    result = predictor.predict("photo.jpg", "the two dogs on the left")
    result.mask          # (H, W) bool at the image's own size
    result.no_target     # True when the expression refers to nothing in the image
    for result in predictor.iter_predict("photo.jpg", many_expressions):  # one mask at a time
        ...

Memory does not grow with the number of expressions: the model sees at most
``expressions_per_call`` of them per forward, and the upsampling to the image's size runs one
expression at a time, keeping only its (H, W) bool mask. ``predict`` returns every mask (one
byte per pixel each); ``iter_predict`` yields them one by one. Images go through
:func:`dmmi.data.images.load_image` (any mode to RGB, the ``max_pixels`` cap; files and bytes are
turned upright by their EXIF orientation, a PIL image is taken as its pixels are, so that the
mask lines up with it).

Only the inference path runs: the erased sentence, the CCR branch and the contrastive head
cost nothing here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dmmi.data.synthetic import DEFAULT_SIDE
from dmmi.data.tokenize import encode, load_tokenizer
from dmmi.data.images import DEFAULT_MAX_PIXELS, check_max_pixels, check_size, load_image
from dmmi.data.transforms import image_to_tensor
from dmmi.decision import check_min_area, check_threshold, decide_masks
from dmmi.engine.distributed import resolve_device
from dmmi.engine.compiled import GraphedForward
from dmmi.engine.fastpath import autocast
from dmmi.errors import DmmiError
from dmmi.models.io import load_model_file

ImageLike = Union[str, Path, bytes, Image.Image, np.ndarray]
EXPRESSIONS_PER_CALL = 8  # expressions per model forward
SYNTHETIC_SIDE = DEFAULT_SIDE  # the synthetic generator's default image side (``dmmi data synth``, ``make demo``)
log = logging.getLogger("dmmi")


def domain_note(trained_on: Optional[str]) -> Optional[str]:
    """One line for a model trained on dmmi's synthetic set (``data.dataset: synthetic``), else None."""
    if trained_on != "synthetic":
        return None
    return ("note: this model was trained on dmmi's synthetic set of coloured shapes "
            "(circles, squares, triangles, stars): on other images, such as photographs, its masks mean little")


def looks_synthetic(size_wh: tuple[int, int]) -> bool:
    """Whether an image of this size could come from the synthetic generator (square, its default side)."""
    return size_wh == (SYNTHETIC_SIDE, SYNTHETIC_SIDE)


@dataclass
class Prediction:
    text: str
    mask: np.ndarray  # (H, W) bool, at the input image's size
    foreground: float  # share of the image's pixels in the mask
    score: Optional[float] = None  # the largest foreground probability: how sure the model is that something is referred
    probability: Optional[np.ndarray] = None  # (S, S) float32 foreground probability at the model's input size

    @property
    def no_target(self) -> bool:
        return not bool(self.mask.any())

    def describe(self) -> str:
        what = "no target" if self.no_target else f"foreground {100 * self.foreground:.1f}%"
        return what if self.score is None else f"{what} (score {self.score:.2f})"


@dataclass
class Prepared:
    """One image and its expressions, ready for the model (:meth:`Predictor.prepare`)."""

    image: torch.Tensor  # (3, S, S) normalised, at the model's input size
    size_hw: tuple[int, int]  # the image's own (H, W): where the masks go
    texts: list[str]
    encoded: list  # per text: dmmi.data.tokenize.Encoded (input_ids, attention_mask)


class Predictor:
    """Holds a model in eval mode, its tokenizer and its preprocessing.

    ``max_pixels``: the largest image accepted (width x height, None: no cap), refused before
    decoding; ``expressions_per_call``: expressions per model forward. The no-target decision:
    ``threshold`` (None: the paper's argmax of the two class maps, the same as > 0.5) makes the
    mask the pixels whose foreground probability exceeds it; a mask smaller than ``min_area``
    (a share of the image's pixels, measured at the image's own size) counts as no target (an empty
    mask); both by :func:`dmmi.decision.decide_masks`, as ``dmmi evaluate`` decides.
    ``cuda_graphs`` (opt-in, CUDA only): each forward replays a CUDA graph captured once per batch size
    (:class:`dmmi.engine.compiled.GraphedForward`, the same logits within bf16 rounding); elsewhere it
    changes nothing.

    ``domain_note``: one line when the model was trained on the synthetic set (None otherwise); it
    is logged once (logger ``dmmi``, WARNING) on the first image that is not synthetic-sized, unless
    ``domain_noted`` is already True (a caller that said it itself, e.g. ``dmmi serve`` at start).
    """

    def __init__(self, model, cfg, *, device: str | torch.device = "auto", fast: bool = True, tokenizer=None,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, expressions_per_call: int = EXPRESSIONS_PER_CALL,
                 threshold: Optional[float] = None, min_area: float = 0.0, cuda_graphs: bool = False):
        self.max_pixels = check_max_pixels(max_pixels)
        self.threshold = check_threshold(threshold)
        self.min_area = check_min_area(min_area)
        if isinstance(expressions_per_call, bool) or not isinstance(expressions_per_call, int) \
                or expressions_per_call < 1:
            raise DmmiError(f"expressions_per_call must be a whole number >= 1, got {expressions_per_call!r}")
        self.expressions_per_call = expressions_per_call
        self.device = resolve_device(device, option="device", fix="device='cpu'") if isinstance(device, str) \
            else device
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.fast = fast
        self.size = cfg.model.image_size
        self.max_tokens = cfg.model.max_tokens
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.text_encoder)
        self.trained_on = getattr(cfg.data, "dataset", None)
        self.domain_note = domain_note(self.trained_on)
        self.domain_noted = False  # True once the note was said (logged here, or by its caller)
        # cuda_graphs: the forward replayed from a CUDA graph per batch size (dmmi.engine.compiled); CUDA only
        self.graphed = GraphedForward(self.model, self.device, fast=fast) if cuda_graphs and \
            self.device.type == "cuda" else None

    @classmethod
    def load(cls, checkpoint: str | Path, *, device: str | torch.device = "auto", fast: bool = True, tokenizer=None,
             expect_preset: Optional[str] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
             expressions_per_call: int = EXPRESSIONS_PER_CALL, threshold: Optional[float] = None,
             min_area: float = 0.0, cuda_graphs: bool = False) -> "Predictor":
        threshold = check_threshold(threshold)  # before the model loads
        model, cfg = load_model_file(checkpoint, expect_preset=expect_preset)
        return cls(model, cfg, device=device, fast=fast, tokenizer=tokenizer, max_pixels=max_pixels,
                   expressions_per_call=expressions_per_call, threshold=threshold, min_area=min_area,
                   cuda_graphs=cuda_graphs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs) -> "Predictor":
        """A model directory (:func:`dmmi.hub.save_pretrained`) or a Hub repo id; ``kwargs`` as :meth:`load`
        (which takes model files, directories and repo ids alike)."""
        return cls.load(name_or_path, **kwargs)

    def _image(self, image: ImageLike) -> Image.Image:
        pil = self._load(image)
        if self.domain_note and not self.domain_noted and not looks_synthetic(pil.size):
            self.domain_noted = True
            log.warning(self.domain_note)
        return pil

    def _load(self, image: ImageLike) -> Image.Image:
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3:
                raise DmmiError(f"image array must be (H, W, 3), got {image.shape}")
            check_size(image.shape[1], image.shape[0], self.max_pixels, "the image array")
            return Image.fromarray(image.astype(np.uint8))
        if isinstance(image, Image.Image):  # its pixels as given (no EXIF turn): the mask lines up with them
            return load_image(image, max_pixels=self.max_pixels, exif=False)
        if isinstance(image, (str, Path, bytes, bytearray, memoryview)):  # files: turned upright by EXIF
            return load_image(image, max_pixels=self.max_pixels)
        raise DmmiError(f"not an image: {type(image).__name__} (give a path, a PIL image or an (H, W, 3) array)")

    @torch.no_grad()
    def predict(self, image: ImageLike, text: str | Sequence[str]) -> Prediction | list[Prediction]:
        """One image and one expression -> Prediction; a list of expressions -> a list."""
        out = list(self.iter_predict(image, [text] if isinstance(text, str) else text))
        return out[0] if isinstance(text, str) else out

    def iter_predict(self, image: ImageLike, texts: Sequence[str]) -> Iterator[Prediction]:
        """Yield one Prediction per expression, in order, holding one full-size mask at a time.

        Every expression is tokenized (an empty one: DmmiError) and the image loaded before the
        first forward; the masks are the same however the expressions are grouped per forward.
        """
        item = self.prepare(image, texts)  # empty text -> DmmiError
        return self._masks(item.image[None].to(self.device), item.texts, item.encoded, item.size_hw)  # (1, 3, S, S)

    @torch.no_grad()
    def _masks(self, x: torch.Tensor, texts: list[str], encoded: list,
               size_hw: tuple[int, int]) -> Iterator[Prediction]:
        """x (1, 3, S, S) -> Predictions at size_hw, ``expressions_per_call`` expressions per forward."""
        for start in range(0, len(texts), self.expressions_per_call):
            chunk = encoded[start:start + self.expressions_per_call]
            ids = torch.tensor([e.input_ids for e in chunk], device=self.device)  # (n, L)
            mask = torch.tensor([e.attention_mask for e in chunk], device=self.device)  # (n, L)
            logits = self._logits(x.expand(len(chunk), -1, -1, -1), ids, mask)  # (n, 2, S, S)
            probability = torch.softmax(logits.float(), dim=1)[:, 1]  # (n, S, S)
            scores = probability.flatten(1).amax(1).tolist()  # (n,): one host copy per forward
            for j in range(len(chunk)):
                yield self._prediction(texts[start + j], logits[j], probability[j], scores[j], size_hw)
            del logits, probability

    def _logits(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images (n, 3, S, S), ids / mask (n, L) -> logits (n, 2, S, S): a CUDA graph's replay or eager."""
        if self.graphed is not None:
            return self.graphed(images, ids, mask)
        with autocast(self.device, self.fast):
            return self.model(images, ids, mask).logits

    def _prediction(self, text: str, logits: torch.Tensor, probability: torch.Tensor, score: float,
                    size_hw: tuple[int, int]) -> Prediction:
        """logits (2, S, S), probability (S, S) -> the Prediction at size_hw (the no-target decision applied)."""
        up = F.interpolate(logits[None].float(), size=size_hw, mode="bilinear", align_corners=False)  # (1, 2, H, W)
        m = decide_masks(up, self.threshold, self.min_area)[0]  # the same decision as dmmi evaluate's, at (H, W)
        del up
        m = m.cpu().numpy()  # (H, W) bool
        share = np.count_nonzero(m) / m.size
        return Prediction(text=text, mask=m, foreground=share, score=float(score),
                          probability=probability.cpu().numpy())

    def prepare(self, image: ImageLike, texts: str | Sequence[str]) -> "Prepared":
        """Load one image and tokenize its expression(s) for :meth:`predict_prepared`; a bad image or an
        empty expression: DmmiError, before any model work (``dmmi predict --jobs`` skips such a job)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise DmmiError("no expression given")
        pil = self._image(image)
        encoded = [encode(self.tokenizer, t, self.max_tokens) for t in texts]  # empty text -> DmmiError
        return Prepared(image_to_tensor(pil, self.size), (pil.size[1], pil.size[0]), texts, encoded)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[ImageLike],
                      expressions: Sequence[str | Sequence[str]]) -> list[list[Prediction]]:
        """Many images, each with its expression(s) -> per image the list of its Predictions.

        The (image, expression) pairs of all images go through the model ``expressions_per_call``
        at a time (a batch of different images), each mask at its own image's size. Every image is
        loaded and every expression tokenized before the first forward (a bad one: DmmiError)."""
        if len(images) != len(expressions):
            raise DmmiError(f"predict_batch: {len(images)} images but {len(expressions)} lists of expressions")
        prepared = []
        for n, (image, texts) in enumerate(zip(images, expressions)):
            texts = texts if isinstance(texts, str) else list(texts)
            if not texts:
                raise DmmiError(f"predict_batch: image {n} has no expression")
            prepared.append(self.prepare(image, texts))
        return self.predict_prepared(prepared)

    @torch.no_grad()
    def predict_prepared(self, prepared: Sequence["Prepared"]) -> list[list[Prediction]]:
        """:meth:`prepare`'s items -> per item the list of its Predictions, ``expressions_per_call``
        (image, expression) pairs per forward."""
        pairs = [(i, k) for i, item in enumerate(prepared) for k in range(len(item.texts))]
        out: list[list] = [[None] * len(item.texts) for item in prepared]
        for start in range(0, len(pairs), self.expressions_per_call):
            chunk = pairs[start:start + self.expressions_per_call]
            x = torch.stack([prepared[i].image for i, _ in chunk]).to(self.device)  # (n, 3, S, S)
            ids = torch.tensor([prepared[i].encoded[k].input_ids for i, k in chunk], device=self.device)  # (n, L)
            mask = torch.tensor([prepared[i].encoded[k].attention_mask for i, k in chunk],
                                device=self.device)  # (n, L)
            logits = self._logits(x, ids, mask)  # (n, 2, S, S)
            probability = torch.softmax(logits.float(), dim=1)[:, 1]  # (n, S, S)
            scores = probability.flatten(1).amax(1).tolist()
            for j, (i, k) in enumerate(chunk):
                item = prepared[i]
                out[i][k] = self._prediction(item.texts[k], logits[j], probability[j], scores[j], item.size_hw)
            del logits, probability, x
        return out
