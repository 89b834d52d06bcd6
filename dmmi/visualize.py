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

RED = (255, 64, 64)
GREEN = (64, 220, 64)


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


def overlay(
    image: Any,
    mask: Any,
    color: tuple[int, int, int] = RED,
    alpha: float = 0.5,
    outline: bool = True,
    outline_color: Optional[tuple[int, int, int]] = None,
    outline_width: Optional[int] = None,
) -> Image.Image:
    """Tint the masked pixels and draw the mask's outline.

    Masked pixel = round((1 - alpha) * pixel + alpha * color); the outline (the mask's inner
    boundary, ``outline_width`` px, default ~1/200 of the longer side) is painted
    ``outline_color`` (default ``color``). Unmasked pixels are unchanged.

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
        width = outline_width or max(1, round(max(m.shape) / 200))
        rgb[mask_boundary(m, width)] = outline_color or color
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

    ``iou`` is a fraction in [0, 1]; ``gt_mask`` (optional) is outlined in green.
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


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a cut-off text ends in '...'."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


def caption_panel(item: GalleryItem, tile_width: int = 256, text_lines: int = 3) -> Image.Image:
    """One gallery tile: the overlay fitted in a ``tile_width`` square, the expression
    (wrapped to ``text_lines`` lines) and an info line (type, IoU) below it.

    Returns an RGB image of size (tile_width, tile_width + caption height)."""
    rgb = _to_rgb_array(item.image)
    shown = overlay(rgb, item.mask)
    if item.gt_mask is not None:
        gt = _to_mask(item.gt_mask, rgb.shape[:2])
        arr = np.array(shown)
        arr[mask_boundary(gt, max(1, round(max(gt.shape) / 200)))] = GREEN
        shown = Image.fromarray(arr)
    h, w = rgb.shape[:2]
    scale = tile_width / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    shown = shown.resize(size, Image.Resampling.BILINEAR)

    font = _font(max(10, tile_width // 20))
    line_height = font.getbbox("Hg")[3] + 4
    caption_height = line_height * (text_lines + 1) + 6
    tile = Image.new("RGB", (tile_width, tile_width + caption_height), (255, 255, 255))
    tile.paste((40, 40, 40), (0, 0, tile_width, tile_width))
    tile.paste(shown, ((tile_width - size[0]) // 2, (tile_width - size[1]) // 2))

    draw = ImageDraw.Draw(tile)
    lines = _wrap(draw, f'"{item.text}"', font, tile_width - 8, text_lines)
    y = tile_width + 3
    for line in lines:
        draw.text((4, y), line, fill=(0, 0, 0), font=font)
        y += line_height
    draw.text((4, tile_width + 3 + text_lines * line_height), _info_line(item), fill=(90, 90, 90), font=font)
    return tile


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
    """Write a PNG grid of :func:`caption_panel` tiles, ``columns`` per row. Items are
    :class:`GalleryItem` or dicts with its fields. Returns the path."""
    tiles = [caption_panel(_as_item(it, i), tile_width) for i, it in enumerate(items)]
    if not tiles:
        raise DmmiError("gallery: no items to draw")
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    tw, th = tiles[0].size
    sheet = Image.new("RGB", (columns * tw, rows * th), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * tw, (i // columns) * th))
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


def plot_curves(
    source: str | Path | Iterable[dict],
    out_png: str | Path,
    keys: Optional[Sequence[str]] = None,
    x: Optional[str] = None,
) -> Path:
    """Plot logged values against step / epoch, one panel per key, into ``out_png``.

    Args:
        source: a JSON-lines log (one object per line) or a list of dicts; nested dicts are
            flattened with dots ("val.dmmi.oIoU").
        keys: what to plot; default every numeric key except step / epoch.
        x: the horizontal axis; default per key: "step" if every record with the key has
            one, else "epoch", else the record's position.
    Records without a key (or with None for it) are skipped for that key.
    """
    from matplotlib.figure import Figure

    records, name = _read_records(source)
    if keys is None:
        keys = []
        for rec in records:
            keys += [k for k, v in rec.items() if _is_number(v) and k not in _AXIS_KEYS and k != x and k not in keys]
    if not keys:
        raise DmmiError(f"plot_curves: {name} has no numeric values to plot")
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows), dpi=100, layout="constrained")
    for i, key in enumerate(keys):
        with_key = [r for r in records if _is_number(r.get(key))]
        if not with_key:
            raise DmmiError(f"plot_curves: key {key!r} not found in {name}")
        axis = x or next((a for a in _AXIS_KEYS if all(_is_number(r.get(a)) for r in with_key)), None)
        if axis is not None and not all(_is_number(r.get(axis)) for r in with_key):
            raise DmmiError(f"plot_curves: some records with {key!r} have no {axis!r} in {name}")
        xs = [r[axis] for r in with_key] if axis else list(range(len(with_key)))
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.plot(xs, [r[key] for r in with_key], marker="o" if len(xs) <= 30 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel(axis or "record")
        ax.grid(alpha=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
