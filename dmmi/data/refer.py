"""Readers for the three published referring-segmentation formats (SPEC §4).

Every format becomes the same thing: a :class:`RefData` holding a flat list of
:class:`Ref` records (all splits), the image table of ``instances.json`` and the
annotations, with masks decoded on demand through pycocotools.

========  ===================================  =========================================
format    files under ``<root>/<dataset>/``     target rule
========  ===================================  =========================================
refer     ``refs(<splitBy>).p`` + instances     ``ann_id`` int: one target
refzom    ``refs(final).p`` + instances         ``ann_id`` int or list; ``source == 'zero'``
                                                 means no target whatever ``ann_id`` holds
grefcoco  ``grefs(<splitBy>).json`` + inst.     ``ann_id`` list; ``[-1]`` means no target
========  ===================================  =========================================

``type`` is ``zero`` / ``one`` / ``many`` from the number of distinct target annotations.
If ``<root>/<dataset>/`` does not exist but ``<root>`` itself holds the files, ``root`` is used.
Segmentations may be polygons, uncompressed RLE (``counts`` a list) or compressed RLE.

    data = load_refs("/data/refer", "refzom")          # dataset ref-zom, splitBy final
    refs = data.split("test")                           # list[Ref]; unknown split -> DmmiError
    mask = data.ref_mask(refs[0])                       # uint8 (H, W), union of the targets
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dmmi.errors import DmmiError

FORMATS = ("refzom", "refer", "grefcoco")
TYPES = ("zero", "one", "many")
DEFAULT_DATASET = {"refzom": "ref-zom", "refer": "refcoco", "grefcoco": "grefcoco"}
# the splits each published splitBy defines (for messages and checks of fixtures)
KNOWN_SPLITS = {
    "unc": ("train", "val", "testA", "testB"),
    "umd": ("train", "val", "test"),
    "google": ("train", "val"),
    "final": ("train", "test"),
}
_SPLIT_ORDER = ("train", "val", "test", "testA", "testB")


@dataclass
class Ref:
    """One referring record: an image, its expressions and its (0, 1 or many) targets."""

    ref_id: int
    image_id: int
    file_name: str  # the image file (from instances.json), relative to the image root
    split: str
    sentences: list[tuple[int, str]]  # (sent_id, text)
    ann_ids: list[int]  # empty for a zero-target ref
    type: str  # 'zero' | 'one' | 'many'

    @property
    def delta(self) -> int:
        """δ of the paper: 0 for a zero-target ref, else 1."""
        return 0 if self.type == "zero" else 1


@dataclass(frozen=True)
class ImageInfo:
    image_id: int
    file_name: str
    height: int
    width: int


def default_dataset(fmt: str) -> str:
    _check_format(fmt)
    return DEFAULT_DATASET[fmt]


def default_split_by(fmt: str, dataset: Optional[str] = None) -> str:
    """refzom: final; grefcoco: unc; refer: umd for refcocog, else unc."""
    _check_format(fmt)
    if fmt == "refzom":
        return "final"
    if fmt == "refer" and (dataset or "").lower() == "refcocog":
        return "umd"
    return "unc"


def annotation_paths(root: str | Path, fmt: str = "refzom", dataset: Optional[str] = None,
                     split_by: Optional[str] = None) -> tuple[Path, Path]:
    """(refs file, instances.json) for a format; raises DmmiError naming a missing file."""
    _check_format(fmt)
    if root is None:
        raise DmmiError("data.root is not set: give the folder holding <dataset>/refs(...).p and instances.json")
    dataset = dataset or default_dataset(fmt)
    split_by = split_by or default_split_by(fmt, dataset)
    name = f"grefs({split_by}).json" if fmt == "grefcoco" else f"refs({split_by}).p"
    root = Path(root)
    folder = root / dataset
    if not folder.is_dir() and (root / name).is_file():
        folder = root  # root already is the dataset folder
    refs_path, inst_path = folder / name, folder / "instances.json"
    for path in (refs_path, inst_path):
        if not path.is_file():
            found = sorted(p.name for p in folder.glob("*refs(*)*")) if folder.is_dir() else []
            hint = f" (that folder holds: {', '.join(found)})" if found else ""
            raise DmmiError(f"annotation file not found: {path}{hint}")
    return refs_path, inst_path


class RefData:
    """All refs of one dataset/splitBy plus images and annotations of ``instances.json``."""

    def __init__(self, fmt: str, dataset: str, split_by: str, refs_path: Path, instances_path: Path,
                 refs: list[Ref], images: dict[int, ImageInfo], annotations: dict[int, dict]):
        self.format, self.dataset, self.split_by = fmt, dataset, split_by
        self.refs_path, self.instances_path = refs_path, instances_path
        self.refs = refs
        self.images = images
        self.annotations = annotations  # ann_id -> {"image_id", "segmentation"}
        by_split: dict[str, list[Ref]] = {}
        for ref in refs:
            by_split.setdefault(ref.split, []).append(ref)
        self._by_split = by_split

    def __repr__(self) -> str:
        return f"RefData({self.dataset}, {self.refs_path.name}, {len(self.refs)} refs, splits {self.splits()})"

    def splits(self) -> list[str]:
        """The split names present, in the order train, val, test, testA, testB, others."""
        known = [s for s in _SPLIT_ORDER if s in self._by_split]
        return known + sorted(s for s in self._by_split if s not in _SPLIT_ORDER)

    def split(self, name: str) -> list[Ref]:
        """The refs of split ``name``; an unknown name raises DmmiError listing the splits."""
        if name not in self._by_split:
            raise DmmiError(f"split {name!r} not in {self.refs_path}: its splits are {', '.join(self.splits())}")
        return self._by_split[name]

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(height, width) from instances.json."""
        info = self.images[image_id]
        return info.height, info.width

    def ann_mask(self, ann_id: int) -> np.ndarray:
        """Mask of one annotation: uint8 (H, W) in {0, 1}, H x W the image size."""
        if ann_id not in self.annotations:
            raise DmmiError(f"{self.instances_path}: no annotation with id {ann_id}")
        ann = self.annotations[ann_id]
        h, w = self.image_size(ann["image_id"])
        return decode_segmentation(ann["segmentation"], h, w, where=f"{self.instances_path.name}: annotation {ann_id}")

    def ref_mask(self, ref: Ref) -> np.ndarray:
        """Union of the ref's targets: uint8 (H, W) in {0, 1}; all zeros for a zero-target ref."""
        h, w = self.image_size(ref.image_id)
        mask = np.zeros((h, w), dtype=np.uint8)
        for ann_id in ref.ann_ids:
            np.maximum(mask, self.ann_mask(ann_id), out=mask)
        return mask


def decode_segmentation(seg: Any, height: int, width: int, *, where: str = "segmentation") -> np.ndarray:
    """COCO polygons, uncompressed or compressed RLE -> uint8 (height, width) in {0, 1}."""
    from pycocotools import mask as mask_utils

    try:
        if isinstance(seg, list):
            polygons = [[float(v) for v in p] for p in seg if len(p) >= 6]  # 4 numbers would read as a box
            if not polygons:
                return np.zeros((height, width), dtype=np.uint8)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(seg, dict) and "counts" in seg:
            size = [int(v) for v in seg.get("size", (height, width))]
            if size != [height, width]:
                raise DmmiError(f"{where}: RLE size {size} differs from the image size {[height, width]}")
            counts = seg["counts"]
            if isinstance(counts, list):  # uncompressed RLE
                rle = mask_utils.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, height, width)
            else:
                rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise DmmiError(f"{where}: unknown segmentation (expected polygons or RLE), got {type(seg).__name__}")
        with warnings.catch_warnings():  # pycocotools + numpy 2: a harmless copy= DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode(rle)
    except DmmiError:
        raise
    except Exception as e:
        raise DmmiError(f"{where}: cannot decode segmentation ({type(e).__name__}: {e})") from None
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return (mask > 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# loading

_CACHE: dict[tuple, RefData] = {}
_CACHE_SIZE = 2


def load_refs(root: str | Path, fmt: str = "refzom", dataset: Optional[str] = None,
              split_by: Optional[str] = None) -> RefData:
    """Read a dataset in one of :data:`FORMATS`; the result is cached (files keyed by mtime)."""
    dataset = dataset or default_dataset(fmt)
    split_by = split_by or default_split_by(fmt, dataset)
    refs_path, inst_path = annotation_paths(root, fmt, dataset, split_by)
    key = (fmt, dataset, split_by) + _file_key(refs_path) + _file_key(inst_path)
    if key in _CACHE:
        return _CACHE[key]
    images, annotations = _read_instances(inst_path)
    raw_refs = _read_json(refs_path) if fmt == "grefcoco" else _read_pickle(refs_path)
    if not isinstance(raw_refs, list):
        raise DmmiError(f"{refs_path}: expected a list of refs, got {type(raw_refs).__name__}")
    refs = [_parse_ref(fmt, r, i, refs_path, images, annotations) for i, r in enumerate(raw_refs)]
    data = RefData(fmt, dataset, split_by, refs_path, inst_path, refs, images, annotations)
    while len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = data
    return data


def load_from_config(data_cfg) -> RefData:
    """:func:`load_refs` with the fields of a :class:`dmmi.config.DataConfig`."""
    return load_refs(data_cfg.root, data_cfg.format, data_cfg.dataset, data_cfg.split_by)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DmmiError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _file_key(path: Path) -> tuple:
    st = os.stat(path)
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


class _RefsUnpickler(pickle.Unpickler):
    """Refs files hold plain lists/dicts/str/numbers; refuse anything that could run code."""

    _ALLOWED = {
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
        ("__builtin__", "set"), ("__builtin__", "frozenset"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        ("numpy", "dtype"), ("numpy", "ndarray"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            if module == "__builtin__":
                module = "builtins"
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refs files hold plain data; refusing to load {module}.{name}")


def _read_pickle(path: Path) -> Any:
    data = path.read_bytes()
    for encoding in ("utf-8", "latin1"):  # Python 2 str: UTF-8 text, else bytes (latin1 keeps them)
        try:
            return _RefsUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except Exception as e:
            raise DmmiError(f"{path}: not a readable refs pickle ({type(e).__name__}: {e})") from None
    raise DmmiError(f"{path}: not a readable refs pickle (text encoding)")


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DmmiError(f"{path}: not valid JSON ({e})") from None


def _read_instances(path: Path) -> tuple[dict[int, ImageInfo], dict[int, dict]]:
    inst = _read_json(path)
    if not isinstance(inst, dict) or "images" not in inst or "annotations" not in inst:
        raise DmmiError(f"{path}: expected a COCO file with 'images' and 'annotations'")
    images: dict[int, ImageInfo] = {}
    for i, im in enumerate(inst["images"]):
        try:
            info = ImageInfo(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DmmiError(f"{path}: images[{i}] lacks a valid field {e}") from None
        images[info.image_id] = info
    annotations: dict[int, dict] = {}
    for i, ann in enumerate(inst["annotations"]):
        try:
            annotations[int(ann["id"])] = {"image_id": int(ann["image_id"]), "segmentation": ann["segmentation"]}
        except (KeyError, TypeError, ValueError) as e:
            raise DmmiError(f"{path}: annotations[{i}] lacks a valid field {e}") from None
    return images, annotations


def _as_int_list(value: Any) -> list[int]:
    if isinstance(value, np.ndarray):
        value = value.ravel().tolist()
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _target_ids(fmt: str, raw: dict, where: str) -> list[int]:
    if "ann_id" not in raw:
        raise DmmiError(f"{where}: no 'ann_id' field")
    try:
        ids = _as_int_list(raw["ann_id"])
    except (TypeError, ValueError):
        raise DmmiError(f"{where}: 'ann_id' must be an int or a list of ints, got {raw['ann_id']!r}") from None
    if fmt == "refzom" and raw.get("source") == "zero":
        return []  # no target, whatever ann_id holds
    if fmt == "grefcoco":
        if raw.get("no_target") is True:
            return []
        return list(dict.fromkeys(i for i in ids if i != -1))  # [-1]: no target
    if not ids:
        raise DmmiError(f"{where}: 'ann_id' names no object but the ref is not marked as zero-target")
    return list(dict.fromkeys(ids))  # distinct, order kept


def _sentences(raw: dict, where: str) -> list[tuple[int, str]]:
    sents = raw.get("sentences")
    if not isinstance(sents, list):
        raise DmmiError(f"{where}: 'sentences' must be a list")
    sent_ids = raw.get("sent_ids") or []
    out = []
    for i, s in enumerate(sents):
        if not isinstance(s, dict):
            raise DmmiError(f"{where}: sentences[{i}] is not a mapping")
        text = s.get("raw") if isinstance(s.get("raw"), str) and s.get("raw").strip() else s.get("sent")
        if "sent_id" in s:
            sid = s["sent_id"]
        elif i < len(sent_ids):
            sid = sent_ids[i]
        else:
            raise DmmiError(f"{where}: sentences[{i}] has no sent_id")
        out.append((int(sid), "" if text is None else str(text)))
    return out


def _parse_ref(fmt: str, raw: Any, index: int, path: Path, images: dict[int, ImageInfo],
               annotations: dict[int, dict]) -> Ref:
    if not isinstance(raw, dict):
        raise DmmiError(f"{path}: entry {index} is not a mapping")
    where = f"{path.name}: ref {raw.get('ref_id', f'#{index}')}"
    for field in ("ref_id", "image_id", "split", "sentences"):
        if field not in raw:
            raise DmmiError(f"{where}: missing field {field!r}")
    ref_id, image_id = int(raw["ref_id"]), int(raw["image_id"])
    if image_id not in images:
        raise DmmiError(f"{where}: image_id {image_id} is not in instances.json")
    ann_ids = _target_ids(fmt, raw, where)
    for ann_id in ann_ids:
        ann = annotations.get(ann_id)
        if ann is None:
            raise DmmiError(f"{where}: ann_id {ann_id} is not in instances.json")
        if ann["image_id"] != image_id:
            raise DmmiError(f"{where}: ann_id {ann_id} belongs to image {ann['image_id']}, not {image_id}")
    kind = "zero" if not ann_ids else ("one" if len(ann_ids) == 1 else "many")
    return Ref(ref_id=ref_id, image_id=image_id, file_name=images[image_id].file_name, split=str(raw["split"]),
               sentences=_sentences(raw, where), ann_ids=ann_ids, type=kind)
