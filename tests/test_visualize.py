"""Overlay pixel values, PNG outputs of masks, galleries and training curves."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dmmi.errors import DmmiError
from dmmi.visualize import GalleryItem, gallery, mask_boundary, overlay, plot_curves, save_mask_png


def square_mask(size=8, lo=2, hi=6):
    m = np.zeros((size, size), dtype=bool)
    m[lo:hi, lo:hi] = True  # rows/cols 2..5: boundary ring 2 and 5, interior 3..4
    return m


def test_overlay_tints_mask_outlines_boundary_keeps_the_rest():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image[3:5, 3:5] = 100  # interior pixels, for the hand computation
    m = square_mask()
    out = np.array(overlay(image, m, color=(255, 64, 64), alpha=0.25, outline_width=1))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    # interior: 0.75 * 100 + 0.25 * (255, 64, 64) = (138.75, 91, 91) -> rounded (139, 91, 91)
    assert out[3, 3].tolist() == [139, 91, 91] and out[4, 4].tolist() == [139, 91, 91]
    # the one-pixel boundary ring (rows/cols 2 and 5 of the square) is painted in the color
    assert out[2, 2].tolist() == [255, 64, 64] and out[5, 3].tolist() == [255, 64, 64]
    assert np.array_equal(out[~m], image[~m])  # unmasked pixels untouched


def test_overlay_without_outline_and_input_kinds():
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    m = torch.from_numpy(square_mask()).long()  # 0/1 torch mask
    out = np.array(overlay(Image.fromarray(image), m, color=(0, 0, 0), alpha=0.5, outline=False))
    # 0.5 * 200 + 0.5 * 0 = 100 everywhere inside, boundary included
    assert out[2, 2].tolist() == [100, 100, 100] and out[0, 0].tolist() == [200, 200, 200]
    empty = np.array(overlay(image, np.zeros((8, 8), bool)))
    assert np.array_equal(empty, image)  # an empty mask changes nothing


def test_overlay_rejects_mismatched_mask_and_float_image():
    with pytest.raises(DmmiError, match=r"mask shape \(4, 4\) does not match image size \(8, 8\)"):
        overlay(np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), bool))
    with pytest.raises(DmmiError, match="uint8"):
        overlay(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), bool))


def test_mask_boundary_width():
    m = square_mask(10, 1, 9)  # 8x8 square
    assert mask_boundary(m, 1).sum() == 8 * 8 - 6 * 6
    assert mask_boundary(m, 2).sum() == 8 * 8 - 4 * 4


def test_save_mask_png_round_trip(tmp_path):
    m = square_mask()
    path = save_mask_png(m, tmp_path / "masks" / "m.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        arr = np.array(im)
    assert set(np.unique(arr).tolist()) == {0, 255} and np.array_equal(arr == 255, m)


def box(lo, hi):
    """(48, 64) mask with the square rows/cols lo..hi-1."""
    m = np.zeros((48, 64), dtype=bool)
    m[lo:hi, lo:hi] = True
    return m


def test_gallery_writes_a_grid_png(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    items = [
        GalleryItem(image, box(10, 30), "the two dogs on the left of the sofa next to a very long description",
                    "many", 0.731),
        {"image": image, "mask": np.zeros((48, 64), bool), "text": "a unicorn", "type": "zero"},
        {"image": Image.fromarray(image), "mask": np.ones((48, 64), bool), "text": "everything", "type": "one",
         "iou": 0.5, "gt_mask": box(0, 40)},
    ]
    path = gallery(items, tmp_path / "g" / "gallery.png", columns=2, tile_width=96)
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        im.load()
    assert w == 2 * 96 and h % 2 == 0 and h > 2 * 96  # 2 rows of square tiles + captions
    with pytest.raises(DmmiError, match="gallery item 0: unknown key 'caption'"):
        gallery([{"image": image, "mask": items[1]["mask"], "caption": "x"}], tmp_path / "x.png")


def test_plot_curves_from_jsonl(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": s, "epoch": s // 10, "loss": 1.0 / (s + 1)} for s in range(0, 30, 5)]
    lines += [{"epoch": e, "val": {"dmmi": {"oIoU": 40.0 + e, "Acc": None}}} for e in range(3)]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = plot_curves(log, tmp_path / "plots" / "curves.png", keys=["loss", "val.dmmi.oIoU"])
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100
    # default keys: every numeric value (loss, val.dmmi.oIoU)
    assert plot_curves(lines, tmp_path / "all.png").is_file()


def test_plot_curves_errors(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{broken\n')
    with pytest.raises(DmmiError, match=r"log.jsonl:2: not a JSON object"):
        plot_curves(log, tmp_path / "c.png")
    with pytest.raises(DmmiError, match="key 'oIoU' not found"):
        plot_curves([{"step": 1, "loss": 2.0}], tmp_path / "c.png", keys=["oIoU"])
