"""Readers of the REFER, Ref-ZOM and gRefCOCO formats: targets, types, masks, splits, errors."""

import json
import os
import pickle

import numpy as np
import pytest

from dmmi.data.refer import decode_segmentation, default_split_by, load_from_config, load_refs
from dmmi.errors import DmmiError


def by_id(data):
    return {r.ref_id: r for r in data.refs}


def one_line(e):
    return "\n" not in str(e.value)


# --------------------------------------------------------------------------------- Ref-ZOM


def test_refzom_targets_and_types(make_data):
    fx = make_data("refzom")
    refs = by_id(load_from_config(fx.config()))
    assert {i: (r.type, r.ann_ids) for i, r in refs.items()} == {
        1: ("one", [1]),  # int ann_id, no source
        2: ("many", [1, 2, 3]),
        3: ("zero", []),  # source zero, ann_id 99 is not even an annotation
        4: ("one", [4]),  # list with a single id
        5: ("many", [4, 6]),  # list, no source
        6: ("one", [5]),
        7: ("zero", []),  # source zero though ann_id names a real annotation
    }
    assert [r.delta for r in refs.values()] == [1, 1, 0, 1, 1, 1, 0]
    assert refs[1].sentences == [(10, "The red box on the left"), (11, "left red box")]
    assert refs[1].file_name == "COCO_train2014_000000000001.png"


def test_refzom_masks_union_and_zero(make_data):
    fx = make_data("refzom")
    data = load_refs(fx.root, "refzom")
    refs = by_id(data)
    union = data.ref_mask(refs[2])
    expected = fx.masks[1] | fx.masks[2] | fx.masks[3]
    assert union.dtype == np.uint8 and union.shape == (8, 10)
    np.testing.assert_array_equal(union, expected)
    # the overlap is counted once: 6 + 16 + 6 pixels, 1 shared
    assert int(union.sum()) == 6 + 16 + 6 - 1
    np.testing.assert_array_equal(data.ref_mask(refs[5]), fx.masks[4] | fx.masks[6])
    zero = data.ref_mask(refs[7])
    assert zero.shape == (10, 10) and zero.sum() == 0


@pytest.mark.parametrize("ann_id", [1, 2, 3, 4, 5, 6])
def test_every_annotation_decodes_exactly(make_data, ann_id):
    """1, 4: polygons; 2, 5: compressed RLE; 3, 6: uncompressed RLE."""
    fx = make_data("refzom")
    data = load_refs(fx.root, "refzom")
    np.testing.assert_array_equal(data.ann_mask(ann_id), fx.masks[ann_id])


def test_decode_segmentation_forms(seg):
    rect, compressed_rle, uncompressed_rle = seg.rect, seg.compressed_rle, seg.uncompressed_rle
    m = rect(5, 7, 1, 4, 2, 6)
    m[2, 3] = 0
    for form in (compressed_rle(m, as_str=False), compressed_rle(m, as_str=True), uncompressed_rle(m),
                 [[2, 1, 6, 1, 6, 4, 2, 4]]):
        out = decode_segmentation(form, 5, 7)
        expected = rect(5, 7, 1, 4, 2, 6) if isinstance(form, list) else m
        np.testing.assert_array_equal(out, expected)
    assert decode_segmentation([], 5, 7).sum() == 0
    with pytest.raises(DmmiError, match="RLE size"):
        decode_segmentation(compressed_rle(m, as_str=True), 6, 7, where="annotation 3")
    with pytest.raises(DmmiError, match="annotation 3: unknown segmentation"):
        decode_segmentation({"polygon": 1}, 5, 7, where="annotation 3")


# --------------------------------------------------------------------------------- gRefCOCO / REFER


def test_grefcoco_minus_one_is_zero_target(make_data):
    fx = make_data("grefcoco")
    data = load_from_config(fx.config())
    refs = by_id(data)
    assert data.refs_path.name == "grefs(unc).json"
    assert (refs[3].type, refs[3].ann_ids, refs[6].type) == ("zero", [], "zero")
    assert (refs[2].type, refs[2].ann_ids) == ("many", [2, 3])
    np.testing.assert_array_equal(data.ref_mask(refs[2]), fx.masks[2] | fx.masks[3])
    assert data.ref_mask(refs[6]).sum() == 0


def test_refer_file_name_comes_from_instances(make_data):
    fx = make_data("refer", "refcoco")
    refs = by_id(load_from_config(fx.config()))
    # the pickle's per-ref file_name (COCO_ref_...) is not an image file; instances.json's is
    assert refs[1].file_name == "COCO_train2014_000000000001.png"
    assert refs[9].sentences == [(900, "the right box"), (901, "box two")]
    assert all(r.type == "one" and len(r.ann_ids) == 1 for r in refs.values())


@pytest.mark.parametrize("fmt,dataset,split_by,splits", [
    ("refer", "refcoco", "unc", ["train", "val", "testA", "testB"]),
    ("refer", "refcoco+", "unc", ["train", "val", "testA", "testB"]),
    ("refer", "refcocog", "umd", ["train", "val", "test"]),
    ("refer", "refcocog", "google", ["train", "val"]),
    ("refzom", "ref-zom", "final", ["train", "test"]),
    ("grefcoco", "grefcoco", "unc", ["train", "val", "testA", "testB"]),
])
def test_every_split_name(make_data, fmt, dataset, split_by, splits):
    fx = make_data(fmt, dataset, split_by)
    data = load_refs(fx.root, fmt, dataset, split_by)
    assert data.splits() == splits
    for s in splits:
        assert data.split(s) and all(r.split == s for r in data.split(s))
    assert sum(len(data.split(s)) for s in splits) == len(fx.refs)


def test_default_split_by():
    assert default_split_by("refzom") == "final"
    assert default_split_by("refer", "refcoco") == "unc"
    assert default_split_by("refer", "refcoco+") == "unc"
    assert default_split_by("refer", "refcocog") == "umd"
    assert default_split_by("grefcoco") == "unc"


def test_split_by_none_uses_the_default(make_data):
    fx = make_data("refer", "refcocog")  # writes refs(umd).p
    assert load_from_config(fx.config(split_by=None)).refs_path.name == "refs(umd).p"


def test_root_may_be_the_dataset_folder(make_data):
    fx = make_data("refzom")
    assert len(load_refs(fx.folder, "refzom").refs) == 7


def test_sent_ids_fallback(make_data):
    refs = [dict(ref_id=1, image_id=1, ann_id=1, split="train", sent_ids=[5, 6],
                 sentences=[{"sent": "a box"}, {"raw": "", "sent": "the box"}])]
    fx = make_data("refer", refs=refs, images=False)
    ref = load_from_config(fx.config()).refs[0]
    assert ref.sentences == [(5, "a box"), (6, "the box")]  # empty raw falls back to sent


# --------------------------------------------------------------------------------- errors


def test_unknown_split_names_it_and_the_existing_ones(make_data):
    fx = make_data("refzom")
    data = load_refs(fx.root, "refzom")
    with pytest.raises(DmmiError) as e:
        data.split("val")
    assert "'val'" in str(e.value) and "train, test" in str(e.value) and "refs(final).p" in str(e.value)
    assert one_line(e)


def test_missing_instances_names_the_path(make_data):
    fx = make_data("refzom")
    (fx.folder / "instances.json").unlink()
    with pytest.raises(DmmiError) as e:
        load_refs(fx.root, "refzom")
    assert str(fx.folder / "instances.json") in str(e.value) and one_line(e)


def test_missing_refs_file_names_the_path_and_what_exists(make_data):
    fx = make_data("refer", "refcocog", "google")
    with pytest.raises(DmmiError) as e:
        load_refs(fx.root, "refer", "refcocog", "umd")
    msg = str(e.value)
    assert str(fx.folder / "refs(umd).p") in msg and "refs(google).p" in msg and one_line(e)


def test_missing_root():
    with pytest.raises(DmmiError, match="data.root is not set"):
        load_refs(None, "refzom")


def test_unknown_annotation_names_ref_and_ann(make_data):
    refs = [dict(ref_id=42, image_id=1, ann_id=[1, 777], split="train", sentences=[{"sent": "x", "sent_id": 1}])]
    fx = make_data("refzom", refs=refs, images=False)
    with pytest.raises(DmmiError, match=r"refs\(final\).p: ref 42: ann_id 777 is not in instances.json"):
        load_refs(fx.root, "refzom")


def test_annotation_of_another_image_is_refused(make_data):
    refs = [dict(ref_id=8, image_id=2, ann_id=1, split="train", sentences=[{"sent": "x", "sent_id": 1}])]
    fx = make_data("refzom", refs=refs, images=False)
    with pytest.raises(DmmiError, match="ref 8: ann_id 1 belongs to image 1, not 2"):
        load_refs(fx.root, "refzom")


def test_targetless_ref_not_marked_zero_is_an_error(make_data):
    refs = [dict(ref_id=3, image_id=1, ann_id=[], split="train", sentences=[{"sent": "x", "sent_id": 1}])]
    fx = make_data("refzom", refs=refs, images=False)
    with pytest.raises(DmmiError, match="ref 3: 'ann_id' names no object"):
        load_refs(fx.root, "refzom")


def test_corrupt_refs_pickle_names_the_file(make_data):
    fx = make_data("refzom", images=False)
    fx.refs_path.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(DmmiError) as e:
        load_refs(fx.root, "refzom")
    assert str(fx.refs_path) in str(e.value) and one_line(e)


def test_pickle_with_numpy_values(make_data):
    """Refs written from numpy data (np.int64 ids, an array of ann ids) still load."""
    refs = [dict(ref_id=np.int64(1), image_id=np.int64(1), ann_id=np.array([1, 3]), split="train",
                 sentences=[{"sent": "two", "sent_id": np.int32(4)}]),
            dict(ref_id=2, image_id=2, ann_id=np.int64(4), split="test", sentences=[{"sent": "one", "sent_id": 5}])]
    fx = make_data("refzom", refs=refs, images=False)
    refs = by_id(load_refs(fx.root, "refzom"))
    assert (refs[1].ann_ids, refs[1].type, refs[1].sentences) == ([1, 3], "many", [(4, "two")])
    assert (refs[2].ann_ids, refs[2].type) == ([4], "one")


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_with_code_is_refused(make_data):
    fx = make_data("refzom", images=False)
    fx.refs_path.write_bytes(pickle.dumps([_Evil()]))
    with pytest.raises(DmmiError, match="refusing to load posix.getcwd|refusing to load os.getcwd"):
        load_refs(fx.root, "refzom")


def test_bad_json_names_the_file(make_data):
    fx = make_data("grefcoco", images=False)
    fx.refs_path.write_text("[{")
    with pytest.raises(DmmiError, match="grefs\\(unc\\).json: not valid JSON"):
        load_refs(fx.root, "grefcoco")


def test_cache_sees_a_rewritten_file(make_data):
    fx = make_data("grefcoco", images=False)
    assert len(load_refs(fx.root, "grefcoco").refs) == 6
    fx.refs_path.write_text(json.dumps(fx.refs[:2]))
    assert len(load_refs(fx.root, "grefcoco").refs) == 2
