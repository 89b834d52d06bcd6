"""The synthetic zero/one/many dataset: layout, determinism, masks vs pixels, and the meaning
of every expression, checked by an independent parser against attributes read off the
rendered pixels (not off the generator's internal state)."""

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dmmi.data import synthetic as syn
from dmmi.errors import DmmiError

N_IMAGES = 60
SIDE = 128


def _hashes(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    summary = syn.generate(root, n_images=N_IMAGES, seed=3, image_size=SIDE)
    refs = pickle.loads((root / "synthetic" / "refs(final).p").read_bytes())
    inst = json.loads((root / "synthetic" / "instances.json").read_text())
    coco = COCO(str(root / "synthetic" / "instances.json"))
    return root, summary, refs, inst, coco


# ----------------------------------------------------------------- pixels -> attributes


def _colour_name(rgb) -> str:
    r, g, b = rgb
    if r > 150 and g > 150 and b < 110:
        return "yellow"
    if r > 150 and g < 110 and b < 110:
        return "red"
    if g > 120 and g > r + 60 and g > b + 60:
        return "green"
    if b > 150 and b > r + 80 and b > g + 80:
        return "blue"
    raise AssertionError(f"object colour {rgb} is not one of the saturated palette colours")


def _shape_from_mask(m: np.ndarray) -> str:
    from skimage.measure import regionprops

    (rp,) = regionprops(m.astype(np.uint8))
    ys, xs = np.nonzero(m)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    r = np.sqrt((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2).max()
    fill = m.sum() / (np.pi * r**2)
    if rp.solidity < 0.78:  # measured: star <= 0.71, others >= 0.86
        return "star"
    if fill > 0.9:  # circle ~1.0
        return "circle"
    if 0.6 < fill < 0.8:  # square 2/pi ~ 0.64
        return "square"
    if fill < 0.57:  # triangle 0.41 (+ small-size discretisation)
        return "triangle"
    raise AssertionError(f"unrecognisable shape: fill {fill:.2f}, solidity {rp.solidity:.2f}")


class Scene:
    """Objects of one image, with attributes measured from the PNG and the decoded masks."""

    def __init__(self, root, coco, image_id):
        info = coco.imgs[image_id]
        self.side = info["width"]
        img = np.asarray(Image.open(root / "images" / info["file_name"]).convert("RGB"), dtype=np.float64)
        self.objs = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            m = coco.annToMask(ann).astype(bool)
            ys, xs = np.nonzero(m)
            cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
            radius = np.sqrt((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2).max()
            self.objs.append(
                {
                    "id": ann["id"],
                    "mask": m,
                    "colour": _colour_name(img[m].mean(axis=0)),
                    "shape": coco.cats[ann["category_id"]]["name"],
                    "size": "small" if radius < 0.135 * self.side else "big",
                    "radius": radius,
                    "cx": cx,
                    "cy": cy,
                }
            )


# ----------------------------------------------------------------- an independent parser

COLOUR_W = {"red", "green", "blue", "yellow"}
SIZE_W = {"small": "small", "little": "small", "big": "big", "large": "big"}
SHAPE_W = {"circle": "circle", "square": "square", "triangle": "triangle", "star": "star"}
GENERIC_W = {"shape", "object"}
COUNT_W = {"two": 2, "three": 3, "four": 4, "five": 5}
POS_AFTER = {
    "on the far left": "left", "on the left": "left", "furthest to the left": "left",
    "on the far right": "right", "on the right": "right", "furthest to the right": "right",
    "at the top": "top", "nearest the top": "top", "at the bottom": "bottom", "nearest the bottom": "bottom",
}
POS_BEFORE = {"leftmost": "left", "rightmost": "right", "topmost": "top", "highest": "top",
              "bottommost": "bottom", "lowest": "bottom"}


def _noun_phrase(words):
    """[size] [colour] noun  ->  (attrs, plural)."""
    assert words, "empty noun phrase"
    *mods, noun = words
    attrs = {}
    plural = noun.endswith("s") and noun[:-1] in set(SHAPE_W) | GENERIC_W
    base = noun[:-1] if plural else noun
    if base in SHAPE_W:
        attrs["shape"] = SHAPE_W[base]
    else:
        assert base in GENERIC_W, f"unknown noun {noun!r}"
    for w in mods:
        if w in SIZE_W:
            assert "size" not in attrs and "colour" not in attrs, f"bad word order {words}"
            attrs["size"] = SIZE_W[w]
        elif w in COLOUR_W:
            assert "colour" not in attrs
            attrs["colour"] = w
        else:
            raise AssertionError(f"unknown word {w!r} in {words}")
    return attrs, plural


def parse_phrase(text):
    """-> dict(attrs, position, plural, count, both, every)."""
    t = text
    q = {"position": None, "count": None, "both": False, "every": False, "quant": None}
    for ph, d in POS_AFTER.items():
        if t.endswith(" " + ph):
            q["position"], t = d, t[: -len(ph) - 1]
            break
    m = re.match(r"^(the )?(\w+) that is (\w+)$", t)
    if m:
        attrs, plural = _noun_phrase([m.group(2)])
        assert m.group(3) in COLOUR_W
        attrs["colour"] = m.group(3)
        q.update(attrs=attrs, plural=plural)
        return q
    words = t.split()
    if words[:3] == ["both", "of", "the"]:
        q["both"], words = True, words[3:]
    elif words[:1] == ["both"]:
        q["both"], words = True, words[1:]
    elif words[:2] == ["all", "the"]:
        q["quant"], words = "all", words[2:]
    elif words[:1] == ["all"]:
        q["quant"], words = "all", words[1:]
    elif words[:1] == ["every"]:
        q["every"], words = True, words[1:]
    elif words[:1] == ["the"]:
        words = words[1:]
    if words and words[0] in COUNT_W:
        q["count"], words = COUNT_W[words[0]], words[1:]
    if words and words[0] in POS_BEFORE:
        assert q["position"] is None
        q["position"], words = POS_BEFORE[words[0]], words[1:]
    attrs, plural = _noun_phrase(words)
    q.update(attrs=attrs, plural=plural)
    return q


def evaluate(scene, q, side):
    """Referent ids of one phrase, asserting the phrase is well formed for the scene."""
    matches = [o for o in scene.objs if all(o[k] == v for k, v in q["attrs"].items())]
    if q["position"] is not None:
        assert not q["plural"]
        if not matches:
            return []
        key = {"left": lambda o: o["cx"], "right": lambda o: -o["cx"],
               "top": lambda o: o["cy"], "bottom": lambda o: -o["cy"]}[q["position"]]
        ranked = sorted(matches, key=key)
        if len(ranked) > 1:  # unambiguous: clearly ahead of the runner-up
            assert key(ranked[1]) - key(ranked[0]) > 0.08 * side, "position word is ambiguous"
        return [ranked[0]["id"]]
    if q["plural"] or q["every"]:
        if q["count"] is not None:
            assert len(matches) in (0, q["count"]), f"count {q['count']} but {len(matches)} objects"
        if q["both"]:
            assert q["count"] is None and len(matches) in (0, 2)
        if matches:
            assert len(matches) >= 2, "a plural that selects a single object"
        return [o["id"] for o in matches]
    assert len(matches) <= 1, "a singular phrase that matches several objects"
    return [o["id"] for o in matches]


def referents(scene, sentence, side):
    parts = sentence.split(" and ")
    assert len(parts) in (1, 2)
    if len(parts) == 2:
        ids = []
        for p in parts:
            q = parse_phrase(p)
            assert not q["plural"] and q["position"] is None
            got = evaluate(scene, q, side)
            assert len(got) == 1, "each half of a union names one object"
            ids += got
        assert len(set(ids)) == 2
        return sorted(ids)
    return sorted(evaluate(scene, parse_phrase(sentence), side))


# ----------------------------------------------------------------- tests


def test_layout_and_loading(data):
    root, summary, refs, inst, coco = data
    assert (root / "synthetic" / "refs(final).p").is_file()
    assert summary["n_images"] == N_IMAGES == len(inst["images"])
    assert summary["n_refs"] == len(refs) and summary["n_annotations"] == len(inst["annotations"])
    assert sorted(c["name"] for c in inst["categories"]) == ["circle", "square", "star", "triangle"]
    ann_by_id = {a["id"]: a for a in inst["annotations"]}
    assert len(ann_by_id) == len(inst["annotations"])
    for im in inst["images"]:
        assert set(im) >= {"id", "file_name", "height", "width"}
        with Image.open(root / "images" / im["file_name"]) as pim:
            assert pim.format == "PNG" and pim.mode == "RGB" and pim.size == (im["width"], im["height"]) == (SIDE, SIDE)
    kinds = set()
    for a in inst["annotations"]:
        assert set(a) >= {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
        kinds.add("polygon" if isinstance(a["segmentation"], list) else "rle")
        m = coco.annToMask(a)
        assert m.sum() == a["area"] > 0
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
        assert max(w, h) >= 0.12 * SIDE, "objects must stay large enough to learn"
        name = coco.cats[a["category_id"]]["name"]
        assert (name == "circle") == (not isinstance(a["segmentation"], list))
    assert kinds == {"polygon", "rle"}
    for r in refs:
        assert set(r) >= {"ref_id", "image_id", "ann_id", "category_id", "split", "sentences", "file_name"}
        for s in r["sentences"]:
            assert set(s) >= {"raw", "sent", "tokens", "sent_id"} and s["tokens"] == s["sent"].split()
    assert len({s["sent_id"] for r in refs for s in r["sentences"]}) == summary["n_sentences"]
    assert len({r["ref_id"] for r in refs}) == len(refs)


def test_masks_match_rendered_objects(data):
    """Each decoded annotation is the connected blob of its colour in the PNG (IoU > 0.9),
    and the drawn shape is the annotated category."""
    from skimage.measure import label

    root, _, _, inst, coco = data
    palette = {"red": (225, 35, 35), "green": (35, 180, 55), "blue": (40, 80, 235), "yellow": (245, 215, 30)}
    ious = []
    for im in inst["images"]:
        img = np.asarray(Image.open(root / "images" / im["file_name"]).convert("RGB"), dtype=np.float64)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]])):
            m = coco.annToMask(a).astype(bool)
            colour = _colour_name(img[m].mean(axis=0))
            close = np.linalg.norm(img - np.asarray(palette[colour]), axis=2) < 70
            lab = label(close, connectivity=1)
            ids, counts = np.unique(lab[m & close], return_counts=True)
            blob = lab == ids[np.argmax(counts)]
            iou = (blob & m).sum() / (blob | m).sum()
            ious.append(iou)
            assert iou > 0.9, (im["file_name"], a["id"], iou)
            assert _shape_from_mask(m) == coco.cats[a["category_id"]]["name"]
    assert np.mean(ious) > 0.97


def test_ref_types_agree_with_ann_ids(data):
    _, summary, refs, inst, _ = data
    anns = {a["id"]: a for a in inst["annotations"]}
    files = {im["id"]: im["file_name"] for im in inst["images"]}
    counts = {"one": 0, "many": 0, "zero": 0}
    for r in refs:
        assert r["file_name"] == files[r["image_id"]]
        if r.get("source") == "zero":
            t = "zero"
            assert isinstance(r["ann_id"], int) and anns[r["ann_id"]]["image_id"] == r["image_id"]
        elif isinstance(r["ann_id"], list):
            t = "many"
            assert r["source"] == "many" and len(r["ann_id"]) >= 2 and len(set(r["ann_id"])) == len(r["ann_id"])
            assert all(anns[i]["image_id"] == r["image_id"] for i in r["ann_id"])
            assert r["category_id"] == anns[r["ann_id"][0]]["category_id"]
        else:
            t = "one"
            assert "source" not in r and isinstance(r["ann_id"], int)
            assert anns[r["ann_id"]]["image_id"] == r["image_id"]
            assert r["category_id"] == anns[r["ann_id"]]["category_id"]
        assert syn.ref_type(r) == t
        counts[t] += 1
    assert counts == summary["types"]
    n = len(refs)
    for t, share in {"one": 0.45, "many": 0.30, "zero": 0.25}.items():
        assert abs(counts[t] / n - share) < 0.08, (t, counts[t] / n)


def test_every_expression_selects_exactly_its_targets(data):
    """Parse each sentence independently and evaluate it on attributes measured from pixels."""
    root, _, refs, _, coco = data
    scenes = {}
    checked = {"position": 0, "count": 0, "union": 0, "plural": 0}
    for r in refs:
        scene = scenes.setdefault(r["image_id"], Scene(root, coco, r["image_id"]))
        want = [] if r.get("source") == "zero" else sorted(r["ann_id"] if isinstance(r["ann_id"], list) else [r["ann_id"]])
        for s in r["sentences"]:
            got = referents(scene, s["sent"], SIDE)
            assert got == want, (r["image_id"], s["sent"], got, want)
            words = s["sent"].split()
            if set(words) & (set(POS_BEFORE) | {"left", "right", "top", "bottom"}):
                checked["position"] += 1
            if set(words) & (set(COUNT_W) | {"both"}):
                checked["count"] += 1
            if " and " in s["sent"]:
                checked["union"] += 1
            if words[0] in ("all", "every"):
                checked["plural"] += 1
    assert all(v >= 5 for v in checked.values()), checked


def test_zero_targets_include_hard_negatives(data):
    """Hard negatives: every attribute word is present in the image, on different objects."""
    root, _, refs, _, coco = data
    hard = absent = 0
    for r in refs:
        if r.get("source") != "zero":
            continue
        scene = Scene(root, coco, r["image_id"])
        q = parse_phrase(r["sentences"][0]["sent"])
        assert not any(all(o[k] == v for k, v in q["attrs"].items()) for o in scene.objs)
        each_present = all(any(o[k] == v for o in scene.objs) for k, v in q["attrs"].items())
        if each_present and len(q["attrs"]) >= 2:
            hard += 1
        else:
            absent += 1
    assert hard >= 0.4 * (hard + absent) and absent >= 3, (hard, absent)


def _hard_and_absent(root, refs):
    coco = COCO(str(root / "synthetic" / "instances.json"))
    hard = absent = 0
    for r in refs:
        if r.get("source") != "zero":
            continue
        scene = Scene(root, coco, r["image_id"])
        q = parse_phrase(r["sentences"][0]["sent"])
        if all(any(o[k] == v for o in scene.objs) for k, v in q["attrs"].items()):
            hard += 1
        else:
            absent += 1
    return hard, absent


def test_hard_share_knob(tmp_path):
    syn.generate(tmp_path / "easy", n_images=30, seed=1, hard_share=0.0, max_objects=3)
    refs = pickle.loads((tmp_path / "easy" / "synthetic" / "refs(final).p").read_bytes())
    hard, absent = _hard_and_absent(tmp_path / "easy", refs)
    assert hard == 0 and absent > 10
    coco = COCO(str(tmp_path / "easy" / "synthetic" / "instances.json"))
    per_image = np.bincount([a["image_id"] for a in coco.dataset["annotations"]])[1:]
    assert per_image.min() >= 2 and per_image.max() <= 3
    syn.generate(tmp_path / "hard", n_images=30, seed=1, hard_share=1.0)
    refs = pickle.loads((tmp_path / "hard" / "synthetic" / "refs(final).p").read_bytes())
    hard, absent = _hard_and_absent(tmp_path / "hard", refs)
    assert hard >= 0.85 * (hard + absent)  # fallback to absent only where no hard negative exists
    with pytest.raises(DmmiError, match="hard_share"):
        syn.generate(tmp_path / "bad", n_images=2, hard_share=1.5)


def test_position_words_pick_the_extreme_object(data):
    root, _, refs, _, coco = data
    n = 0
    for r in refs:
        if r.get("source") == "zero" or isinstance(r["ann_id"], list):
            continue
        for s in r["sentences"]:
            q = parse_phrase(s["sent"])
            if q["position"] is None:
                continue
            scene = Scene(root, coco, r["image_id"])
            cands = [o for o in scene.objs if all(o[k] == v for k, v in q["attrs"].items())]
            assert len(cands) >= 2  # the position word is needed
            target = next(o for o in scene.objs if o["id"] == r["ann_id"])
            coord = {"left": "cx", "right": "cx", "top": "cy", "bottom": "cy"}[q["position"]]
            sign = 1 if q["position"] in ("left", "top") else -1
            others = [sign * o[coord] for o in cands if o is not target]
            assert sign * target[coord] < min(others) - 0.08 * SIDE
            n += 1
    assert n >= 10


def test_splits_by_image_with_all_types(data):
    _, summary, refs, _, _ = data
    split_of_image = {}
    for r in refs:
        assert split_of_image.setdefault(r["image_id"], r["split"]) == r["split"]
    assert set(split_of_image.values()) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        types = {syn.ref_type(r) for r in refs if r["split"] == split}
        assert types == {"zero", "one", "many"}, split
    n_train = sum(1 for s in split_of_image.values() if s == "train")
    assert n_train == round(0.8 * N_IMAGES)
    assert summary["splits"]["test"]["images"] == sum(1 for s in split_of_image.values() if s == "test")


def test_small_vocabulary(data):
    _, _, refs, _, _ = data
    used = {w for r in refs for s in r["sentences"] for w in s["tokens"]}
    vocab = set(syn.vocabulary())
    assert used <= vocab
    assert len(vocab) < 60
    assert {"red", "circle", "leftmost", "two", "all"} <= used


def test_same_seed_same_bytes(data, tmp_path):
    root, summary, _, _, _ = data
    again = syn.generate(tmp_path / "a", n_images=N_IMAGES, seed=3, image_size=SIDE)
    assert _hashes(tmp_path / "a") == _hashes(root)
    assert {k: v for k, v in again.items() if k not in ("seconds", "root", "refs_path", "instances_path", "image_dir")} == \
        {k: v for k, v in summary.items() if k not in ("seconds", "root", "refs_path", "instances_path", "image_dir")}


def test_different_seed_differs(tmp_path):
    syn.generate(tmp_path / "a", n_images=8, seed=0)
    syn.generate(tmp_path / "b", n_images=8, seed=1)
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert ha.keys() == hb.keys()
    assert all(ha[k] != hb[k] for k in ha)  # every file differs: refs, instances and each image


def test_deterministic_across_processes(tmp_path):
    """Same seed in a fresh interpreter with another hash seed: identical bytes."""
    syn.generate(tmp_path / "here", n_images=10, seed=5, image_size=96)
    code = (
        "import sys; from dmmi.data.synthetic import generate; "
        "generate(sys.argv[1], n_images=10, seed=5, image_size=96)"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _hashes(tmp_path / "there") == _hashes(tmp_path / "here")
    with Image.open(tmp_path / "here" / "images" / "synthetic_000001.png") as im:
        assert im.size == (96, 96)


def test_bad_arguments(tmp_path):
    with pytest.raises(DmmiError, match="n_images"):
        syn.generate(tmp_path, n_images=0)
    with pytest.raises(DmmiError, match="n_images"):
        syn.generate(tmp_path, n_images=-4)
    with pytest.raises(DmmiError, match="image_size"):
        syn.generate(tmp_path, n_images=2, image_size=16)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DmmiError, match="not a directory"):
        syn.generate(f, n_images=2)


# ----------------------------------------------------------------- selection logic on hand-made scenes


def _o(shape, colour, size, cx, cy):
    return syn.Obj(shape, colour, size, cx, cy, 10.0)


def test_select_rules():
    objs = [
        _o("circle", "red", "small", 20, 60),
        _o("square", "blue", "big", 60, 20),
        _o("circle", "blue", "small", 100, 100),
        _o("square", "red", "small", 30, 110),
    ]
    P, Q = syn.Part, syn.Query
    assert syn.select(objs, Q("single", (P(colour="red", shape="circle"),))) == [0]
    assert syn.select(objs, Q("plural", (P(colour="blue"),))) == [1, 2]
    assert syn.select(objs, Q("plural", (P(),))) == [0, 1, 2, 3]
    # hard negative: red and square both present, not together... here they are (obj 3)
    assert syn.select(objs, Q("single", (P(colour="red", shape="square"),))) == [3]
    assert syn.select(objs, Q("single", (P(colour="blue", size="small", shape="square"),))) == []
    assert syn.select(objs, Q("single", (P(position="left"),))) == [0]
    assert syn.select(objs, Q("single", (P(position="right"),))) == [2]
    assert syn.select(objs, Q("single", (P(position="top"),))) == [1]
    assert syn.select(objs, Q("single", (P(position="bottom"),))) == [3]
    assert syn.select(objs, Q("single", (P(colour="red", position="right"),))) == [3]
    assert syn.select(objs, Q("single", (P(shape="star", position="left"),))) == []
    assert syn.select(objs, Q("union", (P(colour="red", shape="circle"), P(shape="square", size="big")))) == [0, 1]
    # position needs a clear lead: obj 0 (x=20) vs obj 3 (x=30) at side 128 is too close
    assert not syn.position_is_clear(objs, P(colour="red", position="left"), 128)
    assert syn.position_is_clear(objs, P(colour="red", position="top"), 128)  # 60 vs 110
    assert not syn.position_is_clear(objs, P(shape="circle", colour="red", position="left"), 128)  # one match


def test_make_query_types_are_what_was_asked():
    rng = np.random.default_rng(0)
    for _ in range(200):
        objs = syn._place_objects(rng, 128, int(rng.integers(2, 6)))
        if len(objs) < 2:
            continue
        for t in ("one", "many", "zero"):
            q = syn.make_query(rng, objs, 128, t)
            if q is None:
                assert t == "one"  # only 'one' can be impossible (identical twins, no clear position)
                continue
            assert syn.query_type(objs, q) == t
            n = len(syn.select(objs, q))
            for w in syn.wordings(q, n):
                if q.kind == "single":
                    assert not re.search(r"\b(all|every|both|two|three|four|five)\b", w)
                if n == 1:
                    assert not re.search(r"\b(circles|squares|triangles|stars|shapes|objects)\b", w)
