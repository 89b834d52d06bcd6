"""dataset_stats / format_stats on the tiny fixtures (counts checked by hand)."""

import pytest

from dmmi.data.stats import dataset_stats, format_stats
from dmmi.errors import DmmiError


def row(images, refs, sentences, objects):
    return {"images": images, "refs": refs, "sentences": sentences, "objects": objects}


def test_refzom_counts_per_split_and_type(make_data):
    fx = make_data("refzom", images=False)  # images are never needed
    st = dataset_stats(fx.root)
    assert (st["dataset"], st["format"], st["split_by"]) == ("ref-zom", "refzom", "final")
    assert list(st["splits"]) == ["train", "test"]
    train, test = st["splits"]["train"], st["splits"]["test"]
    # train: ref 1 (one: ann 1, 2 sentences), ref 2 (many: anns 1-3), ref 3 (zero, image 4, 2 sentences)
    assert train == {"zero": row(1, 1, 2, 0), "one": row(1, 1, 2, 1), "many": row(1, 1, 1, 3),
                     "all": row(2, 3, 5, 3)}
    # test: refs 4 (one, ann 4), 5 (many, anns 4+6), 6 (one, ann 5), 7 (zero)
    assert test == {"zero": row(1, 1, 1, 0), "one": row(2, 2, 2, 2), "many": row(1, 1, 1, 2),
                    "all": row(3, 4, 4, 3)}
    assert st["total"]["all"] == row(4, 7, 9, 6)  # image 4 is in both splits: counted once


def test_grefcoco_and_refer_stats(make_data):
    g = dataset_stats(make_data("grefcoco", images=False).root, "grefcoco")
    assert list(g["splits"]) == ["train", "val", "testA", "testB"]
    assert g["splits"]["testB"]["zero"] == row(1, 1, 1, 0) and g["splits"]["testB"]["one"] == row(0, 0, 0, 0)
    fx = make_data("refer", "refcocog", "google", images=False)
    r = dataset_stats(fx.root, "refer", "refcocog", "google")
    assert r["split_by"] == "google" and r["total"]["all"] == row(2, 3, 4, 3)


def test_format_stats_table(make_data):
    text = format_stats(dataset_stats(make_data("refzom", images=False).root))
    lines = text.splitlines()
    assert lines[0] == "ref-zom (refzom, splitBy final)"
    assert lines[1].split() == ["split", "type", "images", "refs", "sentences", "objects"]
    assert lines[3].split() == ["train", "zero", "1", "1", "2", "0"]
    assert lines[-1].split() == ["all", "4", "7", "9", "6"]
    assert sum(line.startswith("test ") for line in lines) == 1


def test_format_stats_thousands():
    counts = {"images": 55078, "refs": 1, "sentences": 2, "objects": 74942}
    st = {"dataset": "ref-zom", "format": "refzom", "split_by": "final", "splits": {},
          "total": {t: counts for t in ("zero", "one", "many", "all")}}
    assert "55,078" in format_stats(st) and "74,942" in format_stats(st)


def test_stats_missing_files(tmp_path):
    with pytest.raises(DmmiError, match="annotation file not found"):
        dataset_stats(tmp_path)
