"""The one image loader of every entry point: ``dmmi predict``, ``Predictor``, ``dmmi serve``, datasets.

    image = load_image("photo.jpg")                       # RGB PIL image, upright
    image = load_image(upload_bytes, where="'photo.png'", max_pixels=10_000_000)

What it does, in order:

1. **size first**: ``Image.open`` reads only the header; an image of more than ``max_pixels``
   (width x height; default :data:`DEFAULT_MAX_PIXELS`, ``None`` = no cap of ours) is refused
   with a one-line :class:`ImageTooLarge` before a pixel is decoded. Pillow's own
   decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``, ~179 megapixels) still applies
   above that and is reported the same way;
2. decodes (a truncated file fails here, not later);
3. turns it upright by its EXIF orientation (``exif=False`` keeps the stored pixel order,
   which is what dataset masks are drawn on);
4. converts any mode to 8-bit RGB: 16-bit and 32-bit integer grey ("I;16", "I;16B", "I")
   scale 0..65535 to 0..255 (Pillow's own conversion clips them, so a 16-bit PNG came out
   white); float grey "F" is read as 0..1 when all its values are in [0, 1], else as 0..255;
   transparency (RGBA, LA, P with a transparent colour, ...) is composited on white; CMYK,
   YCbCr, 1, L, P as Pillow converts them.

Every failure is a :class:`~dmmi.errors.DmmiError` with one line naming ``where`` (default:
the file's path, or "the image").
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

from dmmi.errors import DmmiError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: a 36-megapixel camera photo passes, 8000 x 6000 does not
BACKGROUND = (255, 255, 255)  # what transparent pixels become

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageTooLarge(DmmiError):
    """The image has more pixels than the cap (``dmmi serve`` answers 413)."""


def check_max_pixels(value, what: str = "max_pixels") -> Optional[int]:
    """Validate a pixel cap: a whole number > 0, or None (no cap). -> the int or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DmmiError(f"{what} must be a whole number of pixels > 0, got {value!r}")
    return int(value)


def check_size(width: int, height: int, max_pixels: Optional[int], where: str = "the image") -> None:
    """Raise :class:`ImageTooLarge` when ``width * height`` exceeds ``max_pixels`` (None: no cap)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{where} is too large: {width}x{height} pixels = {width * height / 1e6:.1f} megapixels, "
                            f"above the limit of {max_pixels / 1e6:g} megapixels (max_pixels / --max-pixels)")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the rules)."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT:
        arr = np.asarray(im)  # (H, W) uint16 (either byte order) or int32
        arr = np.clip(arr, 0, 65535).astype(np.uint32) if im.mode == "I" else arr.astype(np.uint32)
        grey = ((arr + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.floor(arr + 0.5), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode in _ALPHA or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(source: ImageSource, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, where: Optional[str] = None,
               exif: bool = True) -> Image.Image:
    """A path, encoded bytes or a PIL image -> an upright 8-bit RGB PIL image of size (W, H).

    ``max_pixels`` caps width x height (checked on the header, before decoding; None: no cap);
    ``where`` names the image in error messages; ``exif=False`` skips the EXIF rotation.
    """
    max_pixels = check_max_pixels(max_pixels)
    if isinstance(source, Image.Image):
        where = where or "the image"
        check_size(source.width, source.height, max_pixels, where)
        try:
            image = ImageOps.exif_transpose(source) if exif else source  # a copy: the caller's image stays
            return _to_rgb(image)
        except Exception as e:  # noqa: BLE001 - a mode Pillow cannot convert, a lazy image that fails to load
            raise DmmiError(f"cannot convert {where} to RGB: {type(e).__name__}: {e}") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = where or "the image"
        if not len(source):
            raise DmmiError(f"{where} is empty: give an image file (PNG, JPEG, WebP, ...)")
        fp, path = io.BytesIO(bytes(source)), None
    elif isinstance(source, (str, Path)):
        path = Path(source)
        where = where or f"image {path}"
        fp = path
    else:
        raise DmmiError(f"not an image: {type(source).__name__} (give a path, bytes or a PIL image)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our cap decides, not the warning
            im = Image.open(fp)  # reads the header only
        try:
            check_size(im.width, im.height, max_pixels, where)
            im.load()  # decode now: truncated files fail here, not later
            if exif:
                ImageOps.exif_transpose(im, in_place=True)
            rgb = _to_rgb(im)
        except BaseException:
            im.close()
            raise
        if rgb is not im:
            im.close()
        elif getattr(im, "fp", None) is not None and path is not None:  # a multi-frame file stays open
            rgb = im.copy()
            im.close()
        return rgb
    except DmmiError:
        raise
    except FileNotFoundError:
        raise DmmiError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{where} is too large for Pillow's decompression-bomb guard ({e})") from None
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError...
        reason = "not an image" if isinstance(e, Image.UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise DmmiError(f"cannot read {where}: {reason}") from None
