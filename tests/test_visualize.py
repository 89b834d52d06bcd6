"""Overlay pixel values, PNG outputs of masks, galleries and training curves."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dmmi.errors import DmmiError
from dmmi.visualize import (NO_TARGET_TEXT, PREDICTION_COLOR, TARGET_DARK, TARGET_LIGHT, GalleryItem,
                            caption_panel, curve_figure, default_outline_width, gallery, mask_boundary, outline_target,
                            overlay, plot_curves, save_mask_png)

GREEN = (64, 220, 64)  # the target outline's colour before it became two-tone (and a synthetic object's)


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
    assert w == 2 * 96 and h % 2 == 0 and h > 2 * 96  # a legend + 2 rows of square tiles + captions
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


# ---------------------------------------------------------------------------- readable pictures


def _luminance(rgb):
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return c @ np.array([0.2126, 0.7152, 0.0722])


def contrast_ratio(a, b):
    """WCAG contrast ratio of two sRGB colours (1: the same, 21: black on white)."""
    la, lb = _luminance(a), _luminance(b)
    return (np.maximum(la, lb) + 0.05) / (np.minimum(la, lb) + 0.05)


def test_overlay_uses_the_one_prediction_colour_by_default():
    image = np.full((20, 20, 3), 90, np.uint8)
    m = np.zeros((20, 20), bool)
    m[5:15, 5:15] = True
    solid = np.array(overlay(image, m, alpha=1.0, outline=False))
    assert solid[10, 10].tolist() == list(PREDICTION_COLOR) and solid[0, 0].tolist() == [90, 90, 90]
    assert np.array_equal(np.array(overlay(image, m)), np.array(overlay(image, m, color=PREDICTION_COLOR)))
    # gallery tiles too: the prediction's outline is PREDICTION_COLOR
    tile = np.array(caption_panel(GalleryItem(image, m, "x"), tile_width=20))
    assert tile[5, 10].tolist() == list(PREDICTION_COLOR)


@pytest.mark.parametrize("object_color", [GREEN, (255, 255, 255), (0, 0, 0), PREDICTION_COLOR, (250, 230, 40)])
def test_target_outline_is_visible_on_any_object_colour(object_color):
    image = np.full((64, 64, 3), 128, np.uint8)
    target = np.zeros((64, 64), bool)
    target[16:48, 16:48] = True
    image[target] = object_color
    empty = np.zeros((64, 64), bool)
    tile = np.array(caption_panel(GalleryItem(image, empty, "x", gt_mask=target), tile_width=64))[:64]
    direct = np.array(outline_target(image, target))
    width = default_outline_width((64, 64))
    band = mask_boundary(target, 2 * width)  # the outline's part on the object
    for out in (tile, direct):
        changed = np.any(out != image, axis=2)
        assert changed[band].any() and not changed[24:40, 24:40].any()  # a line, not a fill
        # some tone of the outline stands out clearly on the object, all the way round
        strong = contrast_ratio(out[band], object_color) >= 4.5
        assert strong.sum() >= 4 * (32 - 2 * 2 * width)  # at least one whole ring (the band's innermost)
        rows, cols = np.nonzero(band & (contrast_ratio(out, object_color) >= 4.5))
        assert {rows.min(), rows.max(), cols.min(), cols.max()} <= set(range(14, 50))  # on all four sides
        assert rows.min() <= 19 and rows.max() >= 44 and cols.min() <= 19 and cols.max() >= 44
    if object_color == GREEN:  # the old green line vanished here: now its pixels differ clearly
        ring = mask_boundary(target, 1)
        distance = np.linalg.norm(direct[ring].astype(float) - np.array(GREEN, float), axis=1)
        assert distance.min() > 100 and np.linalg.norm(tile[ring].astype(float) - GREEN, axis=1).min() > 100
    assert {tuple(TARGET_DARK), tuple(TARGET_LIGHT)} <= {tuple(c) for c in direct.reshape(-1, 3)}


def test_gallery_has_a_legend_strip_on_top(tmp_path):
    image = np.full((48, 64, 3), 128, np.uint8)
    items = [GalleryItem(image, box(10, 30), "the dog", "one", 0.5, gt_mask=box(12, 32))] * 3
    for columns in (3, 1):  # wide and narrow sheets
        path = gallery(items, tmp_path / f"g{columns}.png", columns=columns, tile_width=96)
        sheet = np.array(Image.open(path).convert("RGB"))
        tile_h = caption_panel(items[0], 96).size[1]
        rows = math.ceil(3 / columns)
        legend_h = sheet.shape[0] - rows * tile_h
        assert legend_h >= 12 and sheet.shape[1] == columns * 96
        strip = sheet[:legend_h]
        colours = {tuple(c) for c in strip.reshape(-1, 3)}
        assert tuple(PREDICTION_COLOR) in colours  # the prediction's swatch
        assert tuple(TARGET_DARK) in colours and tuple(TARGET_LIGHT) in colours  # the target's outline swatch
        assert (strip.sum(axis=2) < 200).sum() > 30  # and written words
        assert np.array_equal(sheet[legend_h:legend_h + tile_h, :96], np.array(caption_panel(items[0], 96)))


def test_no_target_is_written_on_empty_overlays():
    rng = np.random.default_rng(3)
    image = rng.integers(100, 256, size=(120, 160, 3), dtype=np.uint8)
    empty = np.zeros((120, 160), bool)
    assert np.array_equal(np.array(overlay(image, empty)), image)  # the plain call: unchanged, as before
    out = np.array(overlay(image, empty, label_empty=True))
    changed = np.any(out != image, axis=2)
    rows, cols = np.nonzero(changed)
    assert rows.max() < 60 and cols.max() < 120  # a label in the top-left corner ...
    box_px = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1].reshape(-1, 3)
    assert (box_px.max(axis=1) < 70).mean() > 0.4  # ... on a dark box
    assert (box_px.min(axis=1) > 200).sum() > 20  # ... in white letters
    assert NO_TARGET_TEXT == "no target"
    m = np.zeros((120, 160), bool)
    m[50:60, 50:60] = True
    assert np.array_equal(np.array(overlay(image, m, label_empty=True))[:40, :], image[:40, :])  # not when found
    tiny = np.zeros((6, 6, 3), np.uint8)
    assert np.array_equal(np.array(overlay(tiny, np.zeros((6, 6), bool), label_empty=True)), tiny)  # no room
    # gallery tiles: an empty prediction says so on the picture
    plain = np.full((96, 96, 3), 200, np.uint8)
    tile = np.array(caption_panel(GalleryItem(plain, np.zeros((96, 96), bool), "a cat", "zero"), 96))[:96]
    assert (tile[:30, :80].max(axis=2) < 70).sum() > 100 and (tile[:30, :80].min(axis=2) > 240).sum() > 20


def test_captions_fit_their_panel_whatever_the_expression():
    image = np.full((48, 64, 3), 128, np.uint8)
    texts = ["the " + "supercalifragilisticexpialidocious" * 6 + " dog",
             " ".join(["the very long expression about many things"] * 30),
             "x" * 400]
    for text in texts:
        for tile_width in (64, 96, 256):
            item = GalleryItem(image, box(10, 30), text, "many", 0.123456)
            tile = np.array(caption_panel(item, tile_width))
            caption = tile[tile_width:]
            ink = caption.min(axis=2) < 250
            assert ink.any()
            assert not ink[:, -3:].any() and not ink[:, :2].any()  # nothing runs past the panel's sides
            assert not ink[-2:].any()  # nor below it


def test_curves_with_one_validation_show_the_loss_curve_and_mark_the_value(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "epoch": s / 500, "loss": 1.0 / (1 + s / 50), "lr": 1e-4} for s in range(10, 510, 10)]
    lines.append({"step": 500, "epoch": 1.0, "val": {"dmmi": {"oIoU": 75.87, "Acc": None}}, "val_score": 75.87})
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    keys = ["loss", "val.dmmi.oIoU", "val.dmmi.Acc"]
    fig = curve_figure(log, keys=keys)
    loss_ax, val_ax, acc_ax = fig.axes
    (loss_line,) = loss_ax.get_lines()
    assert len(loss_line.get_xdata()) == 50 > 1 and loss_line.get_linestyle() != "None"
    (val_line,) = val_ax.get_lines()
    assert list(val_line.get_xdata()) == [500] and list(val_line.get_ydata()) == [75.87]
    assert val_line.get_marker() not in (None, "", "None", " ") and val_line.get_markersize() >= 8
    assert any("75.87" in t.get_text() and "500" in t.get_text() for t in val_ax.texts)  # annotated
    lo, hi = val_ax.get_xlim()
    assert lo < 10 and hi > 500 and loss_ax.get_xlim() == val_ax.get_xlim()  # where it sits along training
    ylo, yhi = val_ax.get_ylim()
    assert ylo < 75.87 < yhi
    assert any("no value" in t.get_text() for t in acc_ax.texts)  # only None logged: said, not an error
    out = plot_curves(log, tmp_path / "curves.png", keys=keys)
    with Image.open(out) as im:
        assert im.format == "PNG"
