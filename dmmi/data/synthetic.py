"""A small synthetic zero / one / many referring-segmentation dataset in the Ref-ZOM layout.

``generate(out_dir, ...)`` writes exactly what the Ref-ZOM loader reads (SPEC §4)::

    <out>/synthetic/refs(final).p     pickle (protocol 4): list of refs
    <out>/synthetic/instances.json    COCO: images, annotations (polygons and RLE), categories
    <out>/images/<file_name>          PNG images

Each image holds 2-5 coloured shapes (circle, square, triangle, star; red, green, blue,
yellow; small or big) on a plain, procedurally textured or dimmed photo background
(``skimage.data``: astronaut, coffee, chelsea, rocket, hubble; CC0 textures brick, grass,
gravel). Expressions refer to

* one object — by attributes ("the small red circle", "the triangle that is blue") or by
  position among the objects the attributes select ("the leftmost shape", "the red
  square on the far left", "the lowest circle");
* many objects — plurals ("all the green shapes", "two blue triangles", "both squares",
  "every star"), or two unique descriptions joined ("the red circle and the big square");
* zero objects — hard negatives whose words all occur in the image but not together
  ("the red square" with a red circle and a blue square), and plain absent ones.

The referent set of every expression is computed by :func:`select` from a structured
:class:`Query`; the words are produced from the same query, and singular wordings are only
used when exactly one object matches (position words only when the extreme object is
clearly separated from the runner-up), counts only when they equal the number selected.
Sizes are absolute (small: circumradius 8.5-11 % of the side, big: 16-20 %), so "small" and
"big" never depend on the other objects.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives
byte-identical files (fixed pickle protocol, ``json`` with sorted keys, PNG written by PIL
with fixed settings).
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from dmmi.errors import DmmiError

DATASET_NAME = "synthetic"
REFS_FILE = "refs(final).p"
INSTANCES_FILE = "instances.json"
PICKLE_PROTOCOL = 4
FORMAT_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star")
CATEGORY_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}
COLOURS = {
    "red": (225, 35, 35),
    "green": (35, 180, 55),
    "blue": (40, 80, 235),
    "yellow": (245, 215, 30),
}
SIZES = ("small", "big")
SIZE_RADIUS = {"small": (0.085, 0.11), "big": (0.16, 0.20)}  # circumradius / side
ATTRS = ("size", "colour", "shape")
DIRECTIONS = ("left", "right", "top", "bottom")
POSITION_MARGIN = 0.10  # the extreme object must lead the runner-up by this share of the side

SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
SHAPE_NOUNS = {
    "circle": ("circle", "circles"),
    "square": ("square", "squares"),
    "triangle": ("triangle", "triangles"),
    "star": ("star", "stars"),
}
GENERIC_NOUNS = (("shape", "shapes"), ("object", "objects"))
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
POSITION_AFTER = {  # "the {np} <phrase>"
    "left": ("on the left", "on the far left", "furthest to the left"),
    "right": ("on the right", "on the far right", "furthest to the right"),
    "top": ("at the top", "nearest the top"),
    "bottom": ("at the bottom", "nearest the bottom"),
}
POSITION_BEFORE = {  # "the <word> {np}"
    "left": ("leftmost",),
    "right": ("rightmost",),
    "top": ("topmost", "highest"),
    "bottom": ("bottommost", "lowest"),
}

TYPE_SHARES = {"one": 0.45, "many": 0.30, "zero": 0.25}
SPLITS = ("train", "val", "test")

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg")
TEXTURES = ("brick.png", "grass.png", "gravel.png")


def vocabulary() -> list[str]:
    """Every word an expression can use."""
    words = {"the", "all", "every", "both", "of", "and", "that", "is", "a"}
    words.update(COLOURS)
    for v in SIZE_WORDS.values():
        words.update(v)
    for v in SHAPE_NOUNS.values():
        words.update(v)
    for v in GENERIC_NOUNS:
        words.update(v)
    words.update(COUNT_WORDS.values())
    for table in (POSITION_AFTER, POSITION_BEFORE):
        for phrases in table.values():
            for p in phrases:
                words.update(p.split())
    return sorted(words)


# --------------------------------------------------------------------------- objects


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    cx: float  # centre, pixels (continuous coordinates: pixel j covers [j, j+1))
    cy: float
    radius: float  # circumradius, pixels
    angle: float = 0.0  # radians
    ann_id: int = -1
    mask: Optional[np.ndarray] = field(default=None, repr=False)
    segmentation: object = field(default=None, repr=False)

    def attr(self, name: str) -> str:
        return getattr(self, name)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[float]:
    if shape == "square":
        pts = [(r, a) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(r, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        pts = [(r if k % 2 == 0 else 0.5 * r, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    else:
        raise ValueError(shape)
    poly = []
    for rad, a in pts:
        poly.append(round(cx + rad * math.cos(a + angle), 2))
        poly.append(round(cy + rad * math.sin(a + angle), 2))
    return poly


def _rasterise(obj: Obj, h: int, w: int) -> None:
    """Fill ``obj.mask`` and ``obj.segmentation`` so that the annotation decodes (with
    pycocotools) to exactly the pixels that are painted."""
    from pycocotools import mask as mask_utils

    if obj.shape == "circle":
        yy, xx = np.mgrid[0:h, 0:w]
        m = (xx + 0.5 - obj.cx) ** 2 + (yy + 0.5 - obj.cy) ** 2 <= obj.radius**2
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        obj.segmentation = {"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")}
        obj.mask = m
    else:
        poly = _polygon(obj.shape, obj.cx, obj.cy, obj.radius, obj.angle)
        rles = mask_utils.frPyObjects([poly], h, w)
        with warnings.catch_warnings():  # pycocotools' decode warns under numpy 2 (harmless)
            warnings.simplefilter("ignore", DeprecationWarning)
            obj.mask = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
        obj.segmentation = [poly]


def _place_objects(rng: np.random.Generator, side: int, n: int) -> list[Obj]:
    """2..n non-overlapping shapes with attributes drawn from a per-image subset (so that
    plurals and hard negatives occur often)."""
    n_col = int(rng.integers(2, len(COLOURS) + 1))
    n_shp = int(rng.integers(2, len(SHAPES) + 1))
    colours = [str(c) for c in rng.permutation(list(COLOURS))[:n_col]]
    shapes = [str(s) for s in rng.permutation(list(SHAPES))[:n_shp]]
    gap = 0.03 * side
    objs: list[Obj] = []
    for _ in range(n):
        size = "big" if rng.random() < 0.4 else "small"
        lo, hi = SIZE_RADIUS[size]
        r = float(rng.uniform(lo, hi)) * side
        shape = shapes[int(rng.integers(len(shapes)))]
        colour = colours[int(rng.integers(len(colours)))]
        angle = float(rng.uniform(-0.26, 0.26)) if shape != "circle" else 0.0
        for _try in range(60):
            cx = float(rng.uniform(r + 2, side - r - 2))
            cy = float(rng.uniform(r + 2, side - r - 2))
            if all(math.hypot(cx - o.cx, cy - o.cy) >= r + o.radius + gap for o in objs):
                objs.append(Obj(shape, colour, size, round(cx, 2), round(cy, 2), round(r, 2), round(angle, 3)))
                break
    return objs


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Part:
    """One noun phrase: attribute constraints (None = any) and an optional position."""

    size: Optional[str] = None
    colour: Optional[str] = None
    shape: Optional[str] = None
    position: Optional[str] = None  # left / right / top / bottom: the extreme of the matches

    def matches(self, o: Obj) -> bool:
        return all(getattr(self, a) is None or getattr(self, a) == o.attr(a) for a in ATTRS)


@dataclass(frozen=True)
class Query:
    """``kind``: 'single' (one noun phrase, singular), 'plural' (all matches, optional
    ``count``), 'union' (two singular phrases joined by 'and')."""

    kind: str
    parts: tuple[Part, ...]
    count: Optional[int] = None

    def key(self) -> tuple:
        return (self.kind, self.parts, self.count)


def _position_key(o: Obj, direction: str) -> float:
    return {"left": o.cx, "right": -o.cx, "top": o.cy, "bottom": -o.cy}[direction]


def select_part(objs: Sequence[Obj], part: Part) -> list[int]:
    idx = [i for i, o in enumerate(objs) if part.matches(o)]
    if part.position is not None and idx:
        idx = [min(idx, key=lambda i: (_position_key(objs[i], part.position), i))]
    return idx


def select(objs: Sequence[Obj], query: Query) -> list[int]:
    """Indices of the objects ``query`` refers to (sorted; empty = zero target)."""
    out: set[int] = set()
    for p in query.parts:
        out.update(select_part(objs, p))
    return sorted(out)


def position_is_clear(objs: Sequence[Obj], part: Part, side: int) -> bool:
    """At least two objects match the attributes and the extreme one leads the runner-up by
    ``POSITION_MARGIN`` of the side along the direction."""
    idx = [i for i, o in enumerate(objs) if part.matches(o)]
    if part.position is None or len(idx) < 2:
        return False
    keys = sorted(_position_key(objs[i], part.position) for i in idx)
    return keys[1] - keys[0] >= POSITION_MARGIN * side


def _attr_parts(o: Obj, include_empty: bool = False) -> list[Part]:
    out = []
    for k in range(0 if include_empty else 1, len(ATTRS) + 1):
        for subset in itertools.combinations(ATTRS, k):
            out.append(Part(**{a: o.attr(a) for a in subset}))
    return out


def _weighted_choice(rng, items: list, weights: list[float]):
    w = np.asarray(weights, dtype=float)
    return items[int(rng.choice(len(items), p=w / w.sum()))]


def _n_attrs(p: Part) -> int:
    return sum(getattr(p, a) is not None for a in ATTRS)


ATTR_WEIGHT = {0: 0.6, 1: 1.0, 2: 1.4, 3: 0.7}


def _unique_parts(objs: Sequence[Obj]) -> list[tuple[int, Part]]:
    out = []
    for i, o in enumerate(objs):
        for p in _attr_parts(o):
            if select_part(objs, p) == [i]:
                out.append((i, p))
    return out


def _one_attr(rng, objs, side) -> Optional[Query]:
    cands = _unique_parts(objs)
    if not cands:
        return None
    _, p = _weighted_choice(rng, cands, [ATTR_WEIGHT[_n_attrs(p)] for _, p in cands])
    return Query("single", (p,))


def _one_position(rng, objs, side) -> Optional[Query]:
    seen, cands = set(), []
    for o in objs:
        for p in _attr_parts(o, include_empty=True):
            for d in DIRECTIONS:
                q = Part(p.size, p.colour, p.shape, d)
                if q not in seen and position_is_clear(objs, q, side):
                    seen.add(q)
                    cands.append(q)
    if not cands:
        return None
    p = _weighted_choice(rng, cands, [ATTR_WEIGHT[_n_attrs(p)] for p in cands])
    return Query("single", (p,))


def _many_plural(rng, objs, side, allow_all: bool) -> Optional[Query]:
    seen, cands = set(), []
    for o in objs:
        for p in _attr_parts(o, include_empty=allow_all):
            if p not in seen and len(select_part(objs, p)) >= 2:
                seen.add(p)
                cands.append(p)
    if not cands:
        return None
    p = _weighted_choice(rng, cands, [ATTR_WEIGHT[_n_attrs(p)] for p in cands])
    n = len(select_part(objs, p))
    count = n if (n in COUNT_WORDS and rng.random() < 0.35) else None
    return Query("plural", (p,), count)


def _many_union(rng, objs, side) -> Optional[Query]:
    cands = _unique_parts(objs)
    targets = sorted({i for i, _ in cands})
    if len(targets) < 2:
        return None
    a, b = (int(t) for t in rng.choice(targets, size=2, replace=False))
    pa = [p for i, p in cands if i == a]
    pb = [p for i, p in cands if i == b]
    p1 = _weighted_choice(rng, pa, [ATTR_WEIGHT[_n_attrs(p)] for p in pa])
    p2 = _weighted_choice(rng, pb, [ATTR_WEIGHT[_n_attrs(p)] for p in pb])
    if p1 == p2:
        return None
    return Query("union", (p1, p2))


def _present(objs, attr) -> list[str]:
    vals = []
    for o in objs:
        if o.attr(attr) not in vals:
            vals.append(o.attr(attr))
    return sorted(vals)


ALL_VALUES = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES}


def _zero_part(rng, objs, hard: bool) -> Optional[Part]:
    """A part matching nothing. ``hard``: every value occurs in the image (on different
    objects); else at least one value is absent from the image."""
    cands = []
    for k in (2, 3) if hard else (1, 2, 3):
        for dims in itertools.combinations(ATTRS, k):
            pools = [(_present(objs, a) if hard else list(ALL_VALUES[a])) for a in dims]
            for values in itertools.product(*pools):
                p = Part(**dict(zip(dims, values)))
                if select_part(objs, p):
                    continue
                absent = any(v not in _present(objs, a) for a, v in zip(dims, values))
                if hard or absent:
                    cands.append(p)
    if not cands:
        return None
    return _weighted_choice(rng, cands, [ATTR_WEIGHT[_n_attrs(p)] for p in cands])


def _zero(rng, objs, side, hard: bool) -> Optional[Query]:
    p = _zero_part(rng, objs, hard)
    if p is None:
        return None
    u = rng.random()
    if u < 0.35:
        count = int(rng.integers(2, 4)) if rng.random() < 0.3 else None
        return Query("plural", (p,), count)
    if u < 0.55:
        d = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        return Query("single", (Part(p.size, p.colour, p.shape, d),))
    return Query("single", (p,))


def make_query(rng, objs: Sequence[Obj], side: int, ref_type: str, hard_share: float = 0.65) -> Optional[Query]:
    """A query of the requested type (or None when the image does not allow one).

    ``hard_share``: share of zero-target queries that are hard negatives (the rest name a
    value absent from the image; either falls back to the other when impossible).
    """
    u = rng.random()
    if ref_type == "one":
        order = (_one_attr, _one_position) if u < 0.6 else (_one_position, _one_attr)
        for f in order:
            q = f(rng, objs, side)
            if q is not None:
                return q
    elif ref_type == "many":
        if u < 0.3:
            q = _many_union(rng, objs, side)
        else:
            q = _many_plural(rng, objs, side, allow_all=u > 0.85)
        return q if q is not None else _many_plural(rng, objs, side, allow_all=True)
    elif ref_type == "zero":
        hard = u < hard_share
        q = _zero(rng, objs, side, hard)
        return q if q is not None else _zero(rng, objs, side, not hard)
    else:
        raise ValueError(ref_type)
    return None


def query_type(objs: Sequence[Obj], query: Query) -> str:
    n = len(select(objs, query))
    return "zero" if n == 0 else "one" if n == 1 else "many"


# --------------------------------------------------------------------------- wording


def _noun_phrases(p: Part, plural: bool) -> list[str]:
    sizes = SIZE_WORDS[p.size] if p.size else ("",)
    nouns = (SHAPE_NOUNS[p.shape][plural],) if p.shape else tuple(g[plural] for g in GENERIC_NOUNS)
    out = []
    for s in sizes:
        for n in nouns:
            out.append(" ".join(w for w in (s, p.colour or "", n) if w))
    return out


def _singular_wordings(p: Part) -> list[str]:
    base = Part(p.size, p.colour, p.shape)
    nps = _noun_phrases(base, False)
    if p.position is None:
        out = [f"the {np_}" for np_ in nps] + list(nps)
        if p.colour and not p.size:
            nouns = (SHAPE_NOUNS[p.shape][0],) if p.shape else tuple(g[0] for g in GENERIC_NOUNS)
            out += [f"the {n} that is {p.colour}" for n in nouns]
        return out
    out = []
    for np_ in nps:
        out += [f"the {np_} {ph}" for ph in POSITION_AFTER[p.position]]
        out += [f"the {w} {np_}" for w in POSITION_BEFORE[p.position]]
    return out


def wordings(query: Query, n_selected: int) -> list[str]:
    """Every wording of ``query`` (``n_selected``: how many objects it selects)."""
    if query.kind == "single":
        return _singular_wordings(query.parts[0])
    if query.kind == "union":
        p1, p2 = query.parts
        a = _singular_wordings(Part(p1.size, p1.colour, p1.shape))
        b = _singular_wordings(Part(p2.size, p2.colour, p2.shape))
        a = [w for w in a if w.startswith("the ") and " that is " not in w]
        b = [w for w in b if w.startswith("the ") and " that is " not in w]
        out = []
        for x, y in itertools.product(a, b):
            out.append(f"{x} and {y}")
            out.append(f"{x[4:]} and {y[4:]}")
        return out
    p = query.parts[0]
    pl = _noun_phrases(p, True)
    if query.count is not None:
        cw = COUNT_WORDS[query.count]
        out = [f"{cw} {w}" for w in pl] + [f"the {cw} {w}" for w in pl]
        if query.count == 2 and n_selected == 2:
            out += [f"both {w}" for w in pl] + [f"both of the {w}" for w in pl]
        return out
    out = [f"the {w}" for w in pl] + [f"all the {w}" for w in pl] + [f"all {w}" for w in pl]
    if n_selected >= 2:
        out += [f"every {w}" for w in _noun_phrases(p, False)]
    return out


# --------------------------------------------------------------------------- rendering


_IMAGE_CACHE: dict[str, np.ndarray] = {}


def _skimage_file(name: str) -> Optional[np.ndarray]:
    """A bundled ``skimage.data`` image read from disk (never fetched), RGB uint8."""
    if name not in _IMAGE_CACHE:
        try:
            import skimage.data
            from PIL import Image

            path = Path(skimage.data.__file__).parent / name
            with Image.open(path) as im:
                _IMAGE_CACHE[name] = np.asarray(im.convert("RGB"))
        except Exception:  # not bundled in this scikit-image: skip it
            _IMAGE_CACHE[name] = None  # type: ignore[assignment]
    return _IMAGE_CACHE[name]


def _crop_resize(rng, img: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    c = int(rng.integers(int(0.4 * min(h, w)), min(h, w) + 1))
    y = int(rng.integers(0, h - c + 1))
    x = int(rng.integers(0, w - c + 1))
    crop = Image.fromarray(img[y : y + c, x : x + c])
    return np.asarray(crop.resize((side, side), Image.BILINEAR), dtype=np.float32)


def _blur(arr: np.ndarray, radius: float) -> np.ndarray:
    from PIL import Image, ImageFilter

    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def _desaturate(arr: np.ndarray, keep: float) -> np.ndarray:
    gray = arr.mean(axis=2, keepdims=True)
    return gray + keep * (arr - gray)


def _background(rng, side: int) -> tuple[np.ndarray, str]:
    u = rng.random()
    if u < 0.3:
        g = float(rng.uniform(45, 200))
        tint = rng.uniform(-18, 18, size=3)
        bg = np.broadcast_to(g + tint, (side, side, 3)).astype(np.float32)
        return bg + rng.normal(0, 2.0, size=(side, side, 3)).astype(np.float32), "plain"
    if u < 0.65:
        kind = int(rng.integers(4))
        c1 = rng.uniform(50, 190) + rng.uniform(-15, 15, size=3)
        c2 = rng.uniform(50, 190) + rng.uniform(-15, 15, size=3)
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
        if kind == 0:  # smooth noise
            k = int(rng.integers(3, 9))
            low = rng.random((k, k)).astype(np.float32)
            from PIL import Image

            t = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC), np.float32) / 255
        elif kind == 1:  # stripes
            a = float(rng.uniform(0, math.pi))
            f = float(rng.uniform(3, 10))
            t = 0.5 + 0.5 * np.sin(2 * math.pi * f * (xx * math.cos(a) + yy * math.sin(a)))
        elif kind == 2:  # checker
            f = int(rng.integers(3, 9))
            t = ((np.floor(xx * f) + np.floor(yy * f)) % 2).astype(np.float32)
        else:  # CC0 photo texture (brick, grass, gravel), grey
            img = _skimage_file(TEXTURES[int(rng.integers(len(TEXTURES)))])
            if img is None:
                t = np.full((side, side), 0.5, np.float32)
            else:
                t = _crop_resize(rng, img, side).mean(axis=2) / 255
        t = t[..., None]
        bg = c1 * (1 - t) + c2 * t
        bg = _desaturate(bg.astype(np.float32), 0.6)
        return bg + rng.normal(0, 3.0, size=(side, side, 3)).astype(np.float32), "texture"
    name = PHOTOS[int(rng.integers(len(PHOTOS)))]
    img = _skimage_file(name)
    if img is None:
        return np.full((side, side, 3), 120, np.float32), "plain"
    bg = _crop_resize(rng, img, side)
    bg = _blur(bg, float(rng.uniform(0.8, 2.0)))
    bg = _desaturate(bg, float(rng.uniform(0.25, 0.45)))
    bg = bg * float(rng.uniform(0.45, 0.75)) + float(rng.uniform(10, 40))
    return bg, "photo"


def _paint(rng, canvas: np.ndarray, obj: Obj) -> None:
    h, w = canvas.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = float(rng.uniform(0, 2 * math.pi))
    shade = 1.0 + 0.12 * ((xx - obj.cx) * math.cos(a) + (yy - obj.cy) * math.sin(a)) / max(obj.radius, 1.0)
    colour = np.asarray(COLOURS[obj.colour], np.float32)
    pix = colour[None, None, :] * shade[..., None] + rng.normal(0, 5.0, size=(h, w, 3)).astype(np.float32)
    canvas[obj.mask] = pix[obj.mask]


# --------------------------------------------------------------------------- dataset


def _split_of(rank: int, n: int, ratios: Sequence[float]) -> str:
    n_train = int(round(n * ratios[0]))
    n_val = int(round(n * ratios[1]))
    if n >= 3:  # every split gets at least one image
        n_val = max(n_val, 1)
        n_train = min(max(n_train, 1), n - n_val - 1)
    if rank < n_train:
        return "train"
    if rank < n_train + n_val:
        return "val"
    return "test"


def _check_args(n_images, image_size, refs_per_image, min_objects, max_objects, split_ratios, hard_share):
    if not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise DmmiError(f"synthetic: n_images must be a positive integer, got {n_images!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 64:
        raise DmmiError(f"synthetic: image_size must be an integer >= 64, got {image_size!r}")
    if refs_per_image < 1:
        raise DmmiError(f"synthetic: refs_per_image must be >= 1, got {refs_per_image}")
    if not 2 <= min_objects <= max_objects <= 6:
        raise DmmiError(f"synthetic: need 2 <= min_objects <= max_objects <= 6, got {min_objects}, {max_objects}")
    if not 0.0 <= hard_share <= 1.0:
        raise DmmiError(f"synthetic: hard_share must be in [0, 1], got {hard_share}")
    if len(split_ratios) != 3 or any(r < 0 for r in split_ratios) or sum(split_ratios) <= 0:
        raise DmmiError(f"synthetic: split_ratios must be 3 non-negative numbers (train, val, test), got {split_ratios}")


DEFAULT_SIDE = 128  # image side in px of generate() and `dmmi data synth` by default


def generate(
    out_dir: str | Path,
    n_images: int = 600,
    seed: int = 0,
    image_size: int = DEFAULT_SIDE,
    refs_per_image: int = 4,
    min_objects: int = 2,
    max_objects: int = 5,
    split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
    max_sentences: int = 2,
    hard_share: float = 0.65,
    progress: bool = False,
) -> dict:
    """Write the synthetic dataset under ``out_dir`` (Ref-ZOM layout) and return a summary.

    ``n_images`` images of ``image_size``² pixels holding ``min_objects``..``max_objects``
    shapes, ``refs_per_image`` expressions each (1 to ``max_sentences`` wordings per
    expression), split by image into train/val/test by ``split_ratios``. Difficulty knobs:
    fewer objects, and ``hard_share`` (the share of zero-target expressions that are hard
    negatives; 0 = every zero-target names a colour/shape/size absent from the image).
    ``progress``: a tqdm bar over the images (about 100 images/s on one core).

    Returns ``{'root', 'dataset', 'refs_path', 'instances_path', 'image_dir', 'n_images',
    'n_annotations', 'n_refs', 'n_sentences', 'types': {one, many, zero}, 'splits':
    {split: {'images', 'refs', 'one', 'many', 'zero'}}, 'backgrounds', 'image_size',
    'seed', 'seconds'}``.
    """
    t0 = time.perf_counter()
    _check_args(n_images, image_size, refs_per_image, min_objects, max_objects, split_ratios, hard_share)
    from PIL import Image

    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise DmmiError(f"{root}: exists and is not a directory")
    ds_dir = root / DATASET_NAME
    img_dir = root / "images"
    try:
        ds_dir.mkdir(parents=True, exist_ok=True)
        img_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DmmiError(f"{root}: cannot create the output folders ({e.strerror or e})") from None

    rng = np.random.default_rng(seed)
    side = int(image_size)
    total = float(sum(split_ratios))
    ratios = [r / total for r in split_ratios]
    order = rng.permutation(n_images)
    rank_of = {int(img): r for r, img in enumerate(order)}

    type_names = list(TYPE_SHARES)
    type_p = np.asarray([TYPE_SHARES[t] for t in type_names])

    images, annotations, refs = [], [], []
    ann_id, ref_id, sent_id = 1, 0, 0
    backgrounds = {"plain": 0, "texture": 0, "photo": 0}
    indices = range(n_images)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="synthetic images", dynamic_ncols=True, leave=False)
    for k in indices:
        image_id = k + 1
        split = _split_of(rank_of[k], n_images, ratios)
        file_name = f"synthetic_{image_id:06d}.png"
        while True:
            objs = _place_objects(rng, side, int(rng.integers(min_objects, max_objects + 1)))
            if len(objs) >= 2:
                break
        canvas, bg_kind = _background(rng, side)
        backgrounds[bg_kind] += 1
        for o in objs:
            _rasterise(o, side, side)
            _paint(rng, canvas, o)
            o.ann_id = ann_id
            ann_id += 1
        pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(img_dir / file_name, format="PNG", compress_level=6)
        images.append({"id": image_id, "file_name": file_name, "height": side, "width": side})
        for o in objs:
            annotations.append(_annotation(o, image_id, side))

        used: list[tuple] = []
        for _ in range(refs_per_image):
            want = type_names[int(rng.choice(len(type_names), p=type_p))]
            tries = [want] + [t for t in type_names if t != want]
            for t in tries:
                q = None
                for _attempt in range(4):
                    q = make_query(rng, objs, side, t, hard_share)
                    if q is not None and q.key() not in used:
                        break
                    q = None
                if q is not None:
                    break
            if q is None:
                continue
            used.append(q.key())
            targets = select(objs, q)
            rtype = query_type(objs, q)
            if rtype != t:  # cannot happen: make_query builds queries of the requested type
                raise AssertionError(f"synthetic: query {q} selects {len(targets)} objects, wanted {t}")
            words = wordings(q, len(targets))
            n_sent = 1 + int(rng.random() < 0.35) if max_sentences >= 2 else 1
            chosen = rng.choice(len(words), size=min(n_sent, len(words)), replace=False)
            sentences = []
            for w in sorted(int(c) for c in chosen):
                text = words[w]
                sentences.append({"raw": text, "sent": text, "tokens": text.split(), "sent_id": sent_id})
                sent_id += 1
            refs.append(_ref(ref_id, image_id, file_name, split, rtype, [objs[i] for i in targets], objs, sentences))
            ref_id += 1

    categories = [{"id": CATEGORY_IDS[s], "name": s, "supercategory": "shape"} for s in SHAPES]
    instances = {
        "info": {"description": "dmmi synthetic zero/one/many shapes", "seed": int(seed), "version": FORMAT_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    refs_path = ds_dir / REFS_FILE
    inst_path = ds_dir / INSTANCES_FILE
    with open(refs_path, "wb") as f:
        pickle.dump(refs, f, protocol=PICKLE_PROTOCOL)
    inst_path.write_text(json.dumps(instances, sort_keys=True, separators=(",", ":")))

    types = _count_types(refs)
    splits = {}
    for s in SPLITS:
        rs = [r for r in refs if r["split"] == s]
        splits[s] = {"images": sum(1 for im in images if _split_of(rank_of[im["id"] - 1], n_images, ratios) == s),
                     "refs": len(rs), **_count_types(rs)}
    return {
        "root": str(root),
        "dataset": DATASET_NAME,
        "refs_path": str(refs_path),
        "instances_path": str(inst_path),
        "image_dir": str(img_dir),
        "n_images": len(images),
        "n_annotations": len(annotations),
        "n_refs": len(refs),
        "n_sentences": sent_id,
        "types": types,
        "splits": splits,
        "backgrounds": backgrounds,
        "image_size": side,
        "seed": int(seed),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def ref_type(ref: dict) -> str:
    """'zero' / 'one' / 'many' from a Ref-ZOM ref (``source`` and ``ann_id``)."""
    if ref.get("source") == "zero":
        return "zero"
    ann = ref["ann_id"]
    if isinstance(ann, (list, tuple)):
        return "many" if len(ann) > 1 else "one"
    return "one"


def _count_types(refs: Iterable[dict]) -> dict:
    out = {"one": 0, "many": 0, "zero": 0}
    for r in refs:
        out[ref_type(r)] += 1
    return out


def _annotation(o: Obj, image_id: int, side: int) -> dict:
    from pycocotools import mask as mask_utils

    if isinstance(o.segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(o.segmentation, side, side))
    else:
        rle = {"size": o.segmentation["size"], "counts": o.segmentation["counts"].encode("ascii")}
    area = int(mask_utils.area(rle))
    bbox = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
    return {
        "id": o.ann_id,
        "image_id": image_id,
        "category_id": CATEGORY_IDS[o.shape],
        "segmentation": o.segmentation,
        "area": area,
        "bbox": bbox,
        "iscrowd": 0,
    }


def _ref(ref_id, image_id, file_name, split, rtype, targets: list[Obj], objs: list[Obj], sentences) -> dict:
    ref = {
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "sentences": sentences,
        "file_name": file_name,
    }
    if rtype == "zero":
        anchor = objs[0]  # Ref-ZOM: a zero ref still names some annotation of the image
        ref.update(ann_id=anchor.ann_id, category_id=CATEGORY_IDS[anchor.shape], source="zero")
    elif rtype == "one":
        ref.update(ann_id=targets[0].ann_id, category_id=CATEGORY_IDS[targets[0].shape])
    else:
        ref.update(ann_id=[t.ann_id for t in targets], category_id=CATEGORY_IDS[targets[0].shape], source="many")
    return ref
