"""Pictures: mask overlays, captioned galleries of predictions, and training curves.

Images are RGB uint8 (PIL images or (H, W, 3) arrays); masks are (H, W) bool (numpy or
torch, 0/1 integers accepted). Only Pillow and matplotlib's Agg canvas are used (no pyplot,
no global backend change), so everything works headless.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dmmi.errors import DmmiError

PREDICTION_COLOR = (0, 220, 255)  # cyan: the one prediction colour (CLI, web page, galleries); stands out
#                                   on red, green, blue and yellow objects alike
TARGET_DARK = (0, 0, 0)  # the ground-truth outline: a light line between two dark ones, visible on any colour
TARGET_LIGHT = (255, 255, 255)
NO_TARGET_TEXT = "no target"  # written on overlays of an empty prediction (``label_empty=True``)


def _to_rgb_array(image: Any) -> np.ndarray:
    """PIL image or uint8 array (H, W), (H, W, 3), (H, W, 4) -> (H, W, 3) uint8 copy."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    arr = np.asarray(image.cpu() if hasattr(image, "cpu") else image)
    if arr.dtype != np.uint8:
        raise DmmiError(f"image must be uint8 RGB, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DmmiError(f"image must have shape (H, W, 3), got {arr.shape}")
    return np.array(arr[..., :3])


def _to_mask(mask: Any, size_hw: Optional[tuple[int, int]] = None) -> np.ndarray:
    """bool / 0-1 (H, W) numpy or torch -> (H, W) bool numpy."""
    arr = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
    if arr.ndim != 2:
        raise DmmiError(f"mask must have shape (H, W), got {arr.shape}")
    if size_hw is not None and arr.shape != size_hw:
        raise DmmiError(f"mask shape {arr.shape} does not match image size {size_hw} (H, W)")
    return arr != 0


def mask_boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """(H, W) bool: mask pixels within ``width`` 4-neighbour steps of a non-mask pixel
    (pixels on the image border count as next to the outside)."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask & ~inner


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """(H, W) bool grown by ``steps`` 4-neighbour steps."""
    out = mask.copy()
    for _ in range(steps):
        padded = np.pad(out, 1, constant_values=False)
        out = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return out


def default_outline_width(size_hw: Sequence[int]) -> int:
    """Outline width in px for an image of (H, W): ~1/160 of the longer side, at least 2."""
    return max(2, round(max(size_hw) / 160))


def _label_font_size(size_wh: tuple[int, int]) -> int:
    return max(10, round(max(size_wh) / 20))


def draw_label(image: Image.Image, text: str, size: Optional[int] = None) -> Image.Image:
    """Write ``text`` in the top-left corner of ``image`` (in place): white on a dark box,
    readable on any picture. The font shrinks to fit the width; a picture too small for an
    8 px label is left alone. Returns the image."""
    w, h = image.size
    size = size or _label_font_size((w, h))
    margin = max(2, size // 4)
    draw = ImageDraw.Draw(image)
    while True:
        font = _font(size)
        pad = max(2, size // 4)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        if box_w + 2 * margin <= w and box_h + 2 * margin <= h:
            break
        if size <= 8:
            return image
        size -= 1
        margin = max(1, size // 4)
    x0, y0 = margin, margin
    region = np.asarray(image.crop((x0, y0, x0 + box_w, y0 + box_h)).convert("RGB"), dtype=np.float32)
    image.paste(Image.fromarray((region * 0.25).astype(np.uint8)), (x0, y0))  # a dark box, 75% opaque
    draw.text((x0 + pad - left, y0 + pad - top), text, fill=(255, 255, 255), font=font)
    return image


def overlay(
    image: Any,
    mask: Any,
    color: tuple[int, int, int] = PREDICTION_COLOR,
    alpha: float = 0.5,
    outline: bool = True,
    outline_color: Optional[tuple[int, int, int]] = None,
    outline_width: Optional[int] = None,
    label_empty: bool = False,
) -> Image.Image:
    """Tint the masked pixels and draw the mask's outline.

    Masked pixel = round((1 - alpha) * pixel + alpha * color); the outline (the mask's inner
    boundary, ``outline_width`` px, default :func:`default_outline_width`) is painted
    ``outline_color`` (default ``color``). Unmasked pixels are unchanged, except that with
    ``label_empty`` an empty mask gets :data:`NO_TARGET_TEXT` written in a dark box, top left.
    ``color`` defaults to :data:`PREDICTION_COLOR`, the one prediction colour everywhere.

    Args: image (H, W, 3) uint8 array or PIL image; mask (H, W) bool.
    Returns: an RGB PIL image of size (W, H).
    """
    rgb = _to_rgb_array(image)  # (H, W, 3)
    m = _to_mask(mask, rgb.shape[:2])  # (H, W)
    if not 0.0 <= alpha <= 1.0:
        raise DmmiError(f"overlay: alpha must be in [0, 1], got {alpha}")
    tint = np.asarray(color, dtype=np.float32)
    blended = np.floor((1.0 - alpha) * rgb[m].astype(np.float32) + alpha * tint + 0.5)
    rgb[m] = np.clip(blended, 0, 255).astype(np.uint8)
    if outline and m.any():
        width = outline_width or default_outline_width(m.shape)
        rgb[mask_boundary(m, width)] = outline_color or color
    out = Image.fromarray(rgb)
    if label_empty and not m.any():
        draw_label(out, NO_TARGET_TEXT)
    return out


def outline_target(image: Any, mask: Any, width: Optional[int] = None) -> Image.Image:
    """Draw the ground-truth outline of ``mask``: a :data:`TARGET_LIGHT` line ``width`` px
    wide on the mask's inner boundary, edged by :data:`TARGET_DARK` lines (``width // 2``,
    at least 1 px) outside and inside it, so it shows on objects and backgrounds of any colour
    (and apart from the prediction's own outline). Returns an RGB PIL image."""
    rgb = _to_rgb_array(image)
    m = _to_mask(mask, rgb.shape[:2])
    if not m.any():
        return Image.fromarray(rgb)
    width = width or default_outline_width(m.shape)
    edge = max(1, width // 2)
    light = mask_boundary(m, width)
    rgb[_dilate(m, edge) & ~m] = TARGET_DARK
    rgb[mask_boundary(m, width + edge) & ~light] = TARGET_DARK
    rgb[light] = TARGET_LIGHT
    return Image.fromarray(rgb)


def save_mask_png(mask: Any, path: str | Path) -> Path:
    """Write an (H, W) mask as an 8-bit grey PNG: 255 foreground, 0 background."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_to_mask(mask).astype(np.uint8) * 255, mode="L").save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------- galleries


@dataclass
class GalleryItem:
    """One tile: the image, the predicted mask, the expression and what to say about it.

    ``iou`` is a fraction in [0, 1]; ``gt_mask`` (optional) is drawn with :func:`outline_target`.
    """

    image: Any
    mask: Any
    text: str
    type: Optional[str] = None  # 'zero' | 'one' | 'many'
    iou: Optional[float] = None
    gt_mask: Any = None


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def _info_line(item: GalleryItem) -> str:
    parts = []
    if item.type:
        parts.append(item.type)
    if item.iou is not None:
        parts.append(f"IoU {100 * item.iou:.1f}%")
    if item.type == "zero":
        parts.append("pred: empty" if not _to_mask(item.mask).any() else "pred: not empty")
    return " | ".join(parts)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int, force: bool = False) -> str:
    """``text`` if it fits in ``width`` px (and not ``force``), else its longest prefix + '...'
    that does ('' when not even '...' fits)."""
    if not force and draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits with the ellipsis: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid].rstrip() + "...", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "..." if draw.textlength("...", font=font) <= width else ""


def _break_word(draw: ImageDraw.ImageDraw, word: str, font, width: int) -> list[str]:
    """A word wider than ``width`` px cut into pieces that fit (at least one character each)."""
    pieces = []
    while word:
        n = 1
        while n < len(word) and draw.textlength(word[: n + 1], font=font) <= width:
            n += 1
        pieces.append(word[:n])
        word = word[n:]
    return pieces


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``max_lines`` lines; words wider than a
    line are broken; a cut-off text ends in '...'. Every line fits in ``width``."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        elif draw.textlength(word, font=font) <= width:
            lines.append(word)
        else:
            pieces = _break_word(draw, word, font, width)
            if lines and draw.textlength(f"{lines[-1]} {pieces[0]}", font=font) <= width:
                lines[-1] = f"{lines[-1]} {pieces.pop(0)}"  # fill the line before breaking to the next
                pieces = _break_word(draw, "".join(pieces), font, width) if pieces else []
            lines += pieces
        if len(lines) > max_lines:
            break
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [_fit(draw, lines[max_lines - 1], font, width, force=True)]
    return lines


def _resize_mask(mask: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """(H, W) bool resized to ``size_wh`` (bilinear, then >= 0.5: smooth edges, thin parts kept)."""
    if mask.shape[::-1] == tuple(size_wh):
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize(size_wh, Image.Resampling.BILINEAR)
    return np.asarray(im) >= 128


def caption_panel(item: GalleryItem, tile_width: int = 256, text_lines: int = 3) -> Image.Image:
    """One gallery tile: the overlay fitted in a ``tile_width`` square (drawn at that size, so
    the lines stay sharp), the expression (wrapped to ``text_lines`` lines, ellipsized) and an
    info line (type, IoU) below it. An empty prediction says "no target" on the picture.

    Returns an RGB image of size (tile_width, tile_width + caption height)."""
    rgb = _to_rgb_array(item.image)
    h, w = rgb.shape[:2]
    pred = _to_mask(item.mask, (h, w))
    gt = None if item.gt_mask is None else _to_mask(item.gt_mask, (h, w))
    scale = tile_width / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    line = default_outline_width((tile_width, tile_width))
    shown = overlay(small, _resize_mask(pred, size), outline_width=line)
    if gt is not None:
        shown = outline_target(shown, _resize_mask(gt, size), width=line)
    if not pred.any():
        draw_label(shown, NO_TARGET_TEXT, size=max(10, tile_width // 18))

    font = _font(max(10, tile_width // 20))
    line_height = font.getbbox("Hg")[3] + 4
    caption_height = line_height * (text_lines + 1) + 6
    tile = Image.new("RGB", (tile_width, tile_width + caption_height), (255, 255, 255))
    tile.paste((40, 40, 40), (0, 0, tile_width, tile_width))
    tile.paste(shown, ((tile_width - size[0]) // 2, (tile_width - size[1]) // 2))

    draw = ImageDraw.Draw(tile)
    text_width = tile_width - 8
    lines = _wrap(draw, '"' + ' '.join(item.text.split()) + '"', font, text_width, text_lines)
    y = tile_width + 3
    for text in lines:
        draw.text((4, y), text, fill=(0, 0, 0), font=font)
        y += line_height
    info = _fit(draw, _info_line(item), font, text_width)
    draw.text((4, tile_width + 3 + text_lines * line_height), info, fill=(90, 90, 90), font=font)
    return tile


def _legend_swatches(size: int) -> tuple[Image.Image, Image.Image]:
    """The legend's two samples, ``size`` px squares on grey: a predicted region and a target outline."""
    grey = np.full((size, size, 3), 150, np.uint8)
    square = np.zeros((size, size), bool)
    square[1:-1, 1:-1] = True
    line = max(2, size // 8)
    pred = overlay(grey, square, outline_width=line)
    target = outline_target(grey, np.pad(np.ones((size - 2 * (line // 2 + 1),) * 2, bool), line // 2 + 1),
                            width=line)
    return pred, target


def legend_strip(width: int, tile_width: int = 256, with_target: bool = True) -> Image.Image:
    """The gallery's legend, ``width`` px wide: the prediction's fill, the target's outline and
    what "no target" means; entries wrap onto more lines (and are ellipsized) where narrow.
    Its height is even."""
    font = _font(max(10, tile_width // 18))
    swatch = font.getbbox("Hg")[3] + 4
    pred, target = _legend_swatches(swatch)
    entries = [(pred, "prediction (filled)")]
    if with_target:
        entries.append((target, "target / ground truth (outline)"))
    entries.append((None, f'"{NO_TARGET_TEXT}" = empty prediction'))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, gap = 6, max(12, tile_width // 16)
    placed, x, row = [], pad, 0
    for icon, text in entries:
        icon_w = swatch + 4 if icon is not None else 0
        room = width - 2 * pad - icon_w
        text = _fit(measure, text, font, max(0, room))
        need = icon_w + measure.textlength(text, font=font)
        if x > pad and x + need > width - pad:
            x, row = pad, row + 1
        placed.append((x, row, icon, text))
        x += need + gap
    row_h = swatch + 6
    height = (row + 1) * row_h + 2 * pad - 6
    height += height % 2
    strip = Image.new("RGB", (width, height), (242, 242, 242))
    draw = ImageDraw.Draw(strip)
    for x, r, icon, text in placed:
        y = pad + r * row_h
        if icon is not None:
            strip.paste(icon, (int(x), y))
            x += swatch + 4
        top = draw.textbbox((0, 0), "Hg", font=font)[1]
        draw.text((x, y + (swatch - (font.getbbox("Hg")[3] - top)) // 2 - top), text, fill=(30, 30, 30), font=font)
    draw.line([(0, height - 1), (width, height - 1)], fill=(200, 200, 200))
    return strip


def _as_item(item: Any, index: int) -> GalleryItem:
    if isinstance(item, GalleryItem):
        return item
    if isinstance(item, dict):
        known = {f.name for f in fields(GalleryItem)}
        unknown = set(item) - known
        if unknown:
            raise DmmiError(f"gallery item {index}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
        try:
            return GalleryItem(**item)
        except TypeError:
            raise DmmiError(f"gallery item {index}: needs 'image', 'mask' and 'text'") from None
    raise DmmiError(f"gallery item {index}: expected a GalleryItem or a dict, got {type(item).__name__}")


def gallery(items: Sequence[GalleryItem | dict], path: str | Path, columns: int = 4, tile_width: int = 256) -> Path:
    """Write a PNG grid of :func:`caption_panel` tiles, ``columns`` per row, under a
    :func:`legend_strip`. Items are :class:`GalleryItem` or dicts with its fields. Returns the path."""
    tiles = [caption_panel(_as_item(it, i), tile_width) for i, it in enumerate(items)]
    if not tiles:
        raise DmmiError("gallery: no items to draw")
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    tw, th = tiles[0].size
    with_target = any(_as_item(it, i).gt_mask is not None for i, it in enumerate(items))
    legend = legend_strip(columns * tw, tile_width, with_target=with_target)
    sheet = Image.new("RGB", (columns * tw, legend.size[1] + rows * th), (255, 255, 255))
    sheet.paste(legend, (0, 0))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * tw, legend.size[1] + (i // columns) * th))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------- curves

_AXIS_KEYS = ("step", "epoch")


def _flatten(record: dict, prefix: str = "") -> dict:
    """{"val": {"dmmi": {"oIoU": 1}}} -> {"val.dmmi.oIoU": 1}."""
    out = {}
    for k, v in record.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


def _read_records(source: str | Path | Iterable[dict]) -> tuple[list[dict], str]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DmmiError(f"log file not found: {path}")
        records = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DmmiError(f"{path}:{lineno}: not a JSON object") from None
            if not isinstance(rec, dict):
                raise DmmiError(f"{path}:{lineno}: not a JSON object")
            records.append(rec)
        return [_flatten(r) for r in records], str(path)
    records = list(source)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DmmiError(f"plot_curves: record {i} is a {type(rec).__name__}, not a dict")
    return [_flatten(r) for r in records], "records"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _format_value(v: float) -> str:
    return f"{v:.4g}"


def curve_figure(
    source: str | Path | Iterable[dict],
    keys: Optional[Sequence[str]] = None,
    x: Optional[str] = None,
):
    """The figure :func:`plot_curves` saves (a matplotlib ``Figure`` on the Agg canvas), one
    panel (``fig.axes[i]``) per key, in order; arguments as for :func:`plot_curves`.

    Panels on the same horizontal axis share its range, so a validation logged once sits where
    it happened along the training curve; a series of fewer than 3 points is drawn as big
    markers, each annotated with its value (one validation is no lost dot). A key logged only
    as None gets a panel that says so."""
    from matplotlib.figure import Figure

    records, name = _read_records(source)
    if keys is None:
        keys = []
        for rec in records:
            keys += [k for k, v in rec.items() if _is_number(v) and k not in _AXIS_KEYS and k != x and k not in keys]
    if not keys:
        raise DmmiError(f"plot_curves: {name} has no numeric values to plot")
    series = []
    for key in keys:
        if not any(key in r for r in records):
            raise DmmiError(f"plot_curves: key {key!r} not found in {name}")
        with_key = [r for r in records if _is_number(r.get(key))]
        axis = x or next((a for a in _AXIS_KEYS if with_key and all(_is_number(r.get(a)) for r in with_key)), None)
        if axis is not None and not all(_is_number(r.get(axis)) for r in with_key):
            raise DmmiError(f"plot_curves: some records with {key!r} have no {axis!r} in {name}")
        xs = [r[axis] for r in with_key] if axis else list(range(len(with_key)))
        series.append((key, axis, xs, [r[key] for r in with_key]))
    spans: dict = {}  # axis -> (lo, hi) over every panel on it
    for _, axis, xs, _ in series:
        if xs:
            lo, hi = spans.get(axis, (min(xs), max(xs)))
            spans[axis] = (min(lo, *xs), max(hi, *xs))
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows), dpi=100, layout="constrained")
    for i, (key, axis, xs, ys) in enumerate(series):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.set_title(key)
        ax.set_xlabel(axis or "record")
        ax.grid(alpha=0.3)
        if not xs:
            ax.text(0.5, 0.5, f"{key}: no value logged (None)", transform=ax.transAxes, ha="center", va="center",
                    color="0.4")
            continue
        if len(xs) >= 3:
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, color="C0", label=key)
        else:  # one or two values: big markers, each with its value written next to it
            ax.plot(xs, ys, linestyle="-" if len(xs) > 1 else "none", marker="o", markersize=9, color="C3",
                    markeredgecolor="black", zorder=3, label=key)
            for xv, yv in zip(xs, ys):
                note = f"{_format_value(yv)}\n({axis or 'record'} {_format_value(xv)})"
                ax.annotate(note, (xv, yv),
                            textcoords="offset points", xytext=(-10, 10), ha="right", va="bottom", fontsize=9,
                            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.6", "alpha": 0.9})
            lo, hi = min(ys), max(ys)
            pad = max(abs(hi - lo) * 0.5, abs(hi) * 0.1, 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
        lo, hi = spans[axis]
        margin = (hi - lo) * 0.04 or max(abs(hi) * 0.05, 1.0)
        ax.set_xlim(lo - margin, hi + margin)
    return fig


def plot_curves(
    source: str | Path | Iterable[dict],
    out_png: str | Path,
    keys: Optional[Sequence[str]] = None,
    x: Optional[str] = None,
) -> Path:
    """Plot logged values against step / epoch, one panel per key, into ``out_png``
    (the figure of :func:`curve_figure`).

    Args:
        source: a JSON-lines log (one object per line) or a list of dicts; nested dicts are
            flattened with dots ("val.dmmi.oIoU").
        keys: what to plot; default every numeric key except step / epoch.
        x: the horizontal axis; default per key: "step" if every record with the key has
            one, else "epoch", else the record's position.
    Records without a key (or with None for it) are skipped for that key; a key that no
    record has is an error.
    """
    fig = curve_figure(source, keys, x)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
