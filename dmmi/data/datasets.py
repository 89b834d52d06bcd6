"""Torch datasets over the refs of :mod:`dmmi.data.refer`, and skipping of bad samples.

``build_dataset(data_cfg, split, tokenizer=..., image_size=S, max_tokens=L, train=...)``
gives a :class:`RefDataset`:

* **train**: one item per ref; its sentence is drawn each epoch from a generator seeded by
  ``(seed, epoch, index)`` (``data_cfg.all_sentences``: one item per sentence instead).
  The same generator draws the horizontal flip (``data_cfg.hflip``) and is handed to the
  eraser, so an epoch is reproducible whatever the worker layout. Call ``set_epoch(e)``
  before iterating; with ``persistent_workers=True`` that call does not reach the workers:
  then let the sampler yield ``(index, epoch)`` pairs (``ZeroSpreadSampler(with_epoch=True)``),
  which ``__getitem__`` accepts too.
* **eval**: one item per sentence, no flip, no erasure.

Items are dicts that the default collate batches (B = batch size)::

    image (B,3,S,S) float  mask (B,S,S) long {0,1}  input_ids / attention_mask / erased_ids (B,L) long
    delta (B,) long        type: list[str]          sentence: list[str]
    image_id, ref_id, sent_id, index: (B,) long

Images: ``data_cfg.image_root`` if set, else ``<root>/images``; a ``file_name`` is looked
for as ``<image_root>/<file_name>``, then ``<image_root>/train2014/<file_name>``, then
``<image_root>/val2014/<file_name>`` (COCO 2014 layout). Sentences that are empty or only
whitespace are dropped when the dataset is built (``dataset.dropped_sentences``); a ref
left with none is dropped too.

**Bad samples.** A missing or unreadable image (or one whose size differs from
instances.json) makes ``dataset[i]`` raise a one-line DmmiError naming the ref and the file.
For a long evaluation that should go on, wrap and collate like this::

    ds = SkipBadSamples(build_dataset(...))                 # bad item -> BadSample record
    loader = DataLoader(ds, batch_size=8, collate_fn=collate_skip_bad)
    report = SkipReport()
    for batch in loader:
        report.update(batch)              # counts batch["skipped"] (list of messages)
        if batch["index"].numel() == 0:  # every item of this batch was bad
            continue
        ...
    print(report.summary())              # "skipped 2 bad samples: ref 7: image file ..."

``RefDataset.check_images(open_files=False)`` finds the items with missing (or, with
``open_files``, unreadable) images up front, without loading anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from dmmi.data.refer import Ref, RefData, load_from_config
from dmmi.data.tokenize import Encoded, encode, load_tokenizer
from dmmi.data.transforms import load_image, prepare_sample
from dmmi.errors import DmmiError

COCO_SUBDIRS = ("train2014", "val2014")

# eraser(sentence_lower, encoded, rng) -> erased input ids (list of max_tokens ints)
Eraser = Callable[[str, Encoded, np.random.Generator], Sequence[int]]


def image_candidates(image_root: str | Path, file_name: str) -> list[Path]:
    """Where a ``file_name`` may lie: the root itself, then the COCO 2014 folders."""
    root = Path(image_root)
    return [root / file_name] + [root / sub / file_name for sub in COCO_SUBDIRS]


class RefDataset(Dataset):
    """Referring samples of one split; see the module docstring for items and modes."""

    def __init__(self, data: RefData, split: str, *, tokenizer, image_size: int, max_tokens: int, train: bool,
                 image_root: str | Path, seed: int = 0, eraser: Optional[Eraser] = None,
                 all_sentences: bool = False, hflip: bool = False, erase: bool = True,
                 keep_image: Optional[Callable[[int], bool]] = None):
        self.data = data
        self.split = split
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.image_size = int(image_size)
        self.max_tokens = int(max_tokens)
        self.train = bool(train)
        self.image_root = Path(image_root)
        self.seed = int(seed) % (2**63)
        self.eraser = eraser if (train and erase) else None
        self.hflip = bool(hflip) and self.train
        self.epoch = 0
        self.dropped_sentences: list[tuple[int, int]] = []  # (ref_id, sent_id) of empty sentences
        self.refs: list[Ref] = []
        for ref in data.split(split):
            if keep_image is not None and not keep_image(ref.image_id):
                continue  # held out (e.g. a validation part carved out of train)
            kept = [(sid, text) for sid, text in ref.sentences if text.strip()]
            self.dropped_sentences += [(ref.ref_id, sid) for sid, text in ref.sentences if not text.strip()]
            if kept:
                self.refs.append(ref if len(kept) == len(ref.sentences) else _with_sentences(ref, kept))
        # items: (ref position, sentence position); -1 = drawn per epoch
        if self.train and not all_sentences:
            self.items = [(r, -1) for r in range(len(self.refs))]
        else:
            self.items = [(r, s) for r, ref in enumerate(self.refs) for s in range(len(ref.sentences))]
        self._paths: dict[int, Path] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        counts = {t: self.types.count(t) for t in ("zero", "one", "many")}
        mode = "train" if self.train else "eval"
        return f"RefDataset({self.data.dataset} {self.split}, {mode}, {len(self)} items, {counts})"

    @property
    def types(self) -> list[str]:
        """'zero' / 'one' / 'many' per item (for :class:`dmmi.data.samplers.ZeroSpreadSampler`)."""
        return [self.refs[r].type for r, _ in self.items]

    def sentence_at(self, index: int) -> str:
        """The sentence of an evaluation item (training items draw theirs per epoch)."""
        r, s = self.items[int(index)]
        if s < 0:
            raise DmmiError(f"item {index} of the training dataset has no fixed sentence (drawn per epoch)")
        return self.refs[r].sentences[s][1]

    def set_epoch(self, epoch: int) -> None:
        """Change the per-epoch draws (sentence, flip, erased phrase)."""
        self.epoch = int(epoch)

    def image_path(self, ref: Ref) -> Path:
        """The ref's image file; DmmiError naming the ref and the places looked in if absent."""
        path = self._paths.get(ref.image_id)
        if path is None:
            candidates = image_candidates(self.image_root, ref.file_name)
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise DmmiError(f"ref {ref.ref_id} (split {self.split}): image file not found: {ref.file_name} "
                                f"(looked in {', '.join(str(p.parent) for p in candidates)})")
            self._paths[ref.image_id] = path
        return path

    def check_images(self, open_files: bool = False) -> list["BadSample"]:
        """Items whose image is missing (``open_files``: or unreadable), one record per item."""
        bad_refs: dict[int, str] = {}
        for r, ref in enumerate(self.refs):
            try:
                path = self.image_path(ref)
                if open_files:
                    load_image(path)
            except DmmiError as e:
                bad_refs[r] = _ref_message(ref, self.split, e)
        return [BadSample(i, bad_refs[r]) for i, (r, _) in enumerate(self.items) if r in bad_refs]

    def __getitem__(self, index):
        if isinstance(index, (tuple, list)):  # (index, epoch) from a sampler with with_epoch=True
            index, epoch = int(index[0]), int(index[1])
        else:
            index, epoch = int(index), self.epoch
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} items")
        r, s = self.items[index]
        ref = self.refs[r]
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
        if s < 0:
            s = int(rng.integers(len(ref.sentences)))
        sent_id, sentence = ref.sentences[s]

        path = self.image_path(ref)
        try:
            image = load_image(path)
        except DmmiError as e:
            raise DmmiError(_ref_message(ref, self.split, e)) from None
        try:
            mask = self.data.ref_mask(ref)  # (H, W) uint8
        except DmmiError as e:
            raise DmmiError(_ref_message(ref, self.split, e)) from None
        if (image.height, image.width) != mask.shape:
            raise DmmiError(f"ref {ref.ref_id} (split {self.split}): image {path} is {image.width}x{image.height} "
                            f"but instances.json says {mask.shape[1]}x{mask.shape[0]}")
        flip = self.hflip and bool(rng.random() < 0.5)
        image_t, mask_t, sentence = prepare_sample(image, mask, sentence, self.image_size, flip=flip)
        try:
            enc = encode(self.tokenizer, sentence, self.max_tokens)
        except DmmiError as e:
            raise DmmiError(f"ref {ref.ref_id} sentence {sent_id}: {e}") from None
        input_ids = torch.tensor(enc.input_ids, dtype=torch.long)
        if self.eraser is not None:
            erased = torch.tensor([int(i) for i in self.eraser(sentence.lower(), enc, rng)], dtype=torch.long)
            if erased.shape != input_ids.shape:
                raise DmmiError(f"eraser returned {erased.numel()} ids for {input_ids.numel()} tokens")
        else:
            erased = input_ids.clone()
        return {
            "image": image_t,  # (3, S, S) float
            "mask": mask_t,  # (S, S) long
            "input_ids": input_ids,  # (L,)
            "attention_mask": torch.tensor(enc.attention_mask, dtype=torch.long),  # (L,)
            "erased_ids": erased,  # (L,)
            "delta": torch.tensor(ref.delta, dtype=torch.long),  # ()
            "type": ref.type,
            "sentence": sentence,
            "image_id": ref.image_id,
            "ref_id": ref.ref_id,
            "sent_id": sent_id,
            "index": index,
        }


def held_out_image(image_id: int, fraction: float) -> bool:
    """Deterministic image-level hold-out: the same images whatever the process or order."""
    import zlib

    return zlib.crc32(str(int(image_id)).encode()) % 10_000 < round(fraction * 10_000)


def build_dataset(data_cfg, split: str, *, tokenizer, image_size: int, max_tokens: int, train: bool,
                  seed: int = 0, eraser: Optional[Eraser] = None,
                  keep_image: Optional[Callable[[int], bool]] = None) -> RefDataset:
    """The :class:`RefDataset` of ``split`` for a :class:`dmmi.config.DataConfig`.

    ``tokenizer``: a fast HF tokenizer or a name for :func:`dmmi.data.tokenize.load_tokenizer`.
    ``eraser``: called in training when ``data_cfg.erase`` is on (None: erased_ids = input_ids).
    """
    data = load_from_config(data_cfg)
    image_root = data_cfg.image_root or Path(data_cfg.root) / "images"
    return RefDataset(data, split, tokenizer=tokenizer, image_size=image_size, max_tokens=max_tokens,
                      train=train, image_root=image_root, seed=seed, eraser=eraser,
                      all_sentences=data_cfg.all_sentences, hflip=data_cfg.hflip, erase=data_cfg.erase,
                      keep_image=keep_image)


def _with_sentences(ref: Ref, sentences: list[tuple[int, str]]) -> Ref:
    return Ref(ref.ref_id, ref.image_id, ref.file_name, ref.split, sentences, ref.ann_ids, ref.type)


def _ref_message(ref: Ref, split: str, error: Exception) -> str:
    text = str(error)
    return text if text.startswith(f"ref {ref.ref_id} ") else f"ref {ref.ref_id} (split {split}): {text}"


# ---------------------------------------------------------------------------------------------
# skipping bad samples


@dataclass(frozen=True)
class BadSample:
    """Stands for an item that could not be loaded: its index and the one-line reason."""

    index: int
    message: str


class SkipBadSamples(Dataset):
    """Wraps a dataset: an item that raises DmmiError comes back as a :class:`BadSample`.

    Use with :func:`collate_skip_bad`. ``types``, ``set_epoch`` and other attributes pass
    through to the wrapped dataset.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except DmmiError as e:
            i = int(index[0]) if isinstance(index, (tuple, list)) else int(index)
            return BadSample(i, str(e))


def collate_skip_bad(batch: list) -> dict:
    """Default collate of the good items, plus ``skipped``: the messages of the bad ones.

    When every item is bad the batch is ``{"skipped": [...], "index": empty long tensor}``.
    """
    good = [b for b in batch if not isinstance(b, BadSample)]
    out = default_collate(good) if good else {"index": torch.zeros(0, dtype=torch.long)}
    out["skipped"] = [b.message for b in batch if isinstance(b, BadSample)]
    return out


class SkipReport:
    """Counts skipped samples across batches in the main process."""

    def __init__(self, keep: int = 20):
        self.count = 0
        self.messages: list[str] = []  # the first ``keep`` reasons
        self.keep = keep

    def update(self, batch: dict) -> int:
        """Add a batch's ``skipped`` list; returns how many it had."""
        skipped = batch.get("skipped", [])
        self.count += len(skipped)
        self.messages += list(skipped)[: max(0, self.keep - len(self.messages))]
        return len(skipped)

    def summary(self) -> str:
        if not self.count:
            return "skipped 0 bad samples"
        return f"skipped {self.count} bad sample{'s' if self.count != 1 else ''}: " + "; ".join(self.messages[:3])
