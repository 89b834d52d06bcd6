"""The shared image loader (dmmi.data.images) and the Predictor that uses it: EXIF, modes,
the pixel cap checked on the header, and masks computed one expression at a time."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import dmmi.inference
from dmmi.config import load_config
from dmmi.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, load_image
from dmmi.errors import DmmiError
from dmmi.inference import Predictor
from dmmi.models import build_model
from dmmi.models.io import save_model_file

pytestmark = pytest.mark.timeout(120)

TEXTS = ["the red circle", "all the shapes", "a blue star", "the left one", "nothing here", "two dogs",
         "the big green square"]


# ---------------------------------------------------------------------------- helpers


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header says width x height but whose pixel data is a few bytes (truncated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def grey16() -> np.ndarray:
    """(3, 4) uint16 ramp over the whole 16-bit range, and its 8-bit values round(v / 257)."""
    return np.array([[0, 257, 1000, 5000], [12850, 32768, 40000, 50000], [60000, 65000, 65279, 65535]], np.uint16)


GREY16_AS_8 = np.array([[0, 1, 4, 19], [50, 128, 156, 195], [233, 253, 254, 255]], np.uint8)


def oriented(orientation: int, fmt: str = "PNG") -> bytes:
    """two_colour() encoded with an EXIF Orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(two_colour(), fmt, exif=exif.tobytes())


def two_colour(width=40, height=20) -> Image.Image:
    """Left half red, right half blue: which way it was turned is visible."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    cfg = load_config("dmmi_tiny", [])
    torch.manual_seed(0)
    path = save_model_file(tmp_path_factory.mktemp("model") / "tiny.pt", build_model(cfg.model), cfg)
    return Predictor.load(path, device="cpu")


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------- modes


def test_16_bit_grey_png_is_scaled_to_8_bit_not_white(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(grey16()).save(path)  # mode I;16
    assert Image.open(path).mode == "I;16"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (4, 3)
    assert np.array_equal(np.asarray(image), np.repeat(GREY16_AS_8[..., None], 3, axis=2))


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_big_endian_16_bit_and_32_bit_grey_tiffs_are_scaled(tmp_path, mode):
    a = grey16()
    if mode == "I;16B":
        source = Image.frombytes("I;16B", (4, 3), a.astype(">u2").tobytes())
    else:
        source = Image.fromarray(a.astype(np.int32))  # mode I, as Pillow opens many 16-bit TIFFs
    path = tmp_path / "g.tif"
    source.save(path)
    assert Image.open(path).mode == mode
    assert np.array_equal(np.asarray(load_image(path))[..., 0], GREY16_AS_8)


def test_the_predictor_reads_a_16_bit_png_as_grey_not_white(predictor, tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(grey16()).save(path)
    assert np.array_equal(np.asarray(predictor._image(path))[..., 0], GREY16_AS_8)


@pytest.mark.parametrize("case", ["P transparent", "LA", "RGBA", "CMYK", "1", "F 0..1", "F 0..255", "L"])
def test_every_mode_becomes_8_bit_rgb(case):
    if case == "P transparent":
        src = Image.new("P", (2, 1))
        src.putpalette([0, 0, 0, 255, 0, 0])
        src.putpixel((1, 0), 1)
        src = Image.open(io.BytesIO(encoded(src, transparency=0)))  # index 0 transparent
        want = [[255, 255, 255], [255, 0, 0]]  # transparent -> white
    elif case == "LA":
        src, want = Image.frombytes("LA", (2, 1), bytes([10, 0, 10, 255])), [[255, 255, 255], [10, 10, 10]]
    elif case == "RGBA":
        src = Image.frombytes("RGBA", (2, 1), bytes([0, 0, 0, 0, 200, 100, 0, 128]))
        want = [[255, 255, 255], [227, 177, 127]]  # half-transparent orange over white
    elif case == "CMYK":
        src, want = Image.new("CMYK", (2, 1), (0, 255, 255, 0)), [[255, 0, 0], [255, 0, 0]]
    elif case == "1":
        src = Image.new("1", (2, 1))
        src.putpixel((1, 0), 1)
        want = [[0, 0, 0], [255, 255, 255]]
    elif case == "F 0..1":
        src, want = Image.fromarray(np.array([[0.0, 0.5]], np.float32)), [[0, 0, 0], [128, 128, 128]]
    elif case == "F 0..255":
        src, want = Image.fromarray(np.array([[3.0, 300.0]], np.float32)), [[3, 3, 3], [255, 255, 255]]
    else:
        src, want = Image.new("L", (2, 1), 7), [[7, 7, 7], [7, 7, 7]]
    out = load_image(src)
    assert out.mode == "RGB" and np.asarray(out).tolist() == [want]


# ---------------------------------------------------------------------------- EXIF


def test_exif_orientation_turns_the_image_upright():
    data = oriented(6)  # 6: stored turned 90 degrees anticlockwise, shown turned back
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6
    upright = load_image(data)
    assert upright.size == (20, 40)
    assert np.array_equal(np.asarray(upright), np.asarray(two_colour().transpose(Image.Transpose.ROTATE_270)))
    assert np.array_equal(np.asarray(upright), np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))))
    assert load_image(data, exif=False).size == (40, 20)  # datasets: the pixels as stored
    jpeg = load_image(oriented(8, "JPEG"))  # 8: turned the other way, the blue half ends on top
    assert jpeg.size == (20, 40) and np.asarray(jpeg)[0, 10, 2] > 200 and np.asarray(jpeg)[-1, 10, 0] > 200


def test_the_predictor_turns_image_files_upright_but_takes_pil_images_as_they_are(predictor, tmp_path):
    path = tmp_path / "phone.png"
    path.write_bytes(oriented(6))
    assert predictor.predict(path, "the red half").mask.shape == (40, 20)  # (H, W) of the upright image
    assert predictor.predict(path.read_bytes(), "the red half").mask.shape == (40, 20)
    opened = Image.open(path)  # a PIL image: the mask lines up with the pixels given
    assert predictor.predict(opened, "the red half").mask.shape == (20, 40)


# ---------------------------------------------------------------------------- the pixel cap


def test_too_many_pixels_are_refused_from_the_header_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(header_only_png(9000, 5000))
    with pytest.raises(ImageTooLarge) as e:
        load_image(path)
    message = str(e.value)
    assert str(path) in message and "9000x5000" in message and "45.0 megapixels" in message and "40" in message
    assert "\n" not in message
    # the file holds no pixels: decoding it would fail as truncated, so the refusal came from the header
    with pytest.raises(DmmiError, match="truncated"):
        load_image(path, max_pixels=None)


def test_a_36_megapixel_photo_is_under_the_default_cap():
    assert 7348 * 4899 <= DEFAULT_MAX_PIXELS < 8000 * 6000
    with pytest.raises(DmmiError) as e:  # passes the cap, then fails as truncated (no pixels in the file)
        load_image(header_only_png(7348, 4899))
    assert not isinstance(e.value, ImageTooLarge) and "truncated" in str(e.value)


def test_pillows_decompression_bomb_error_is_one_line():
    with pytest.raises(ImageTooLarge) as e:
        load_image(header_only_png(20000, 20000), max_pixels=None, where="'bomb.png'")
    assert "'bomb.png'" in str(e.value) and "decompression" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [0, -5, 1.5, "10", True])
def test_a_bad_pixel_cap_is_a_one_line_error(bad):
    with pytest.raises(DmmiError, match="max_pixels must be a whole number"):
        load_image(two_colour(), max_pixels=bad)


def test_the_predictor_cap_is_configurable(predictor, tmp_path):
    small = Predictor(predictor.model, predictor.cfg, device="cpu", tokenizer=predictor.tokenizer, max_pixels=799)
    path = tmp_path / "p.png"
    two_colour().save(path)  # 40 x 20 = 800 pixels
    for image in (path, path.read_bytes(), two_colour(), np.asarray(two_colour())):
        with pytest.raises(ImageTooLarge, match="40x20"):
            small.predict(image, "a cat")
    assert predictor.predict(path, "a cat").mask.shape == (20, 40)  # the default cap
    with pytest.raises(DmmiError, match="max_pixels"):
        Predictor(predictor.model, predictor.cfg, device="cpu", tokenizer=predictor.tokenizer, max_pixels=0)


@pytest.mark.parametrize("data, words", [(b"", "is empty"), (b"not an image at all", "not an image"),
                                         ("truncated", "truncated")])
def test_unreadable_bytes_are_one_line_errors_naming_the_source(data, words):
    if data == "truncated":
        data = encoded(two_colour())[:60]
    with pytest.raises(DmmiError) as e:
        load_image(data, where="'up.png'")
    assert "'up.png'" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- masks in bounded chunks


def test_chunked_masks_equal_one_by_one_and_all_at_once(predictor, photo):
    chunked = Predictor(predictor.model, predictor.cfg, device="cpu", tokenizer=predictor.tokenizer,
                        expressions_per_call=3)
    together = chunked.predict(photo, TEXTS)  # forwards of 3, 3 and 1 expressions
    alone = [chunked.predict(photo, t) for t in TEXTS]
    # the previous implementation: one forward for all, full-size logits for all, argmax
    from dmmi.data.tokenize import encode
    from dmmi.data.transforms import image_to_tensor

    enc = [encode(predictor.tokenizer, t, predictor.max_tokens) for t in TEXTS]
    x = image_to_tensor(photo, predictor.size)[None]
    with torch.no_grad():
        logits = predictor.model(x.expand(len(TEXTS), -1, -1, -1), torch.tensor([e.input_ids for e in enc]),
                                 torch.tensor([e.attention_mask for e in enc])).logits
        old = F.interpolate(logits.float(), size=(45, 70), mode="bilinear", align_corners=False).argmax(1).bool()
    assert len({m.mask.tobytes() for m in together}) > 1  # the expressions do change the masks
    for t, a, b, o in zip(TEXTS, together, alone, old.numpy()):
        assert a.text == b.text == t and a.mask.shape == (45, 70) and a.mask.dtype == bool
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.mask, o)
        assert a.foreground == b.foreground == pytest.approx(float(o.mean()), abs=0)


def test_memory_does_not_grow_with_the_number_of_expressions(predictor, photo, monkeypatch):
    """Full-size logits exist for one expression at a time; the model sees at most k per call."""
    upsampled, forwards = [], []
    real_interpolate = F.interpolate
    real_forward = type(predictor.model).forward

    def interpolate(x, *args, **kwargs):
        out = real_interpolate(x, *args, **kwargs)
        if out.shape[-2:] == (45, 70):
            upsampled.append(out.shape[0])
        return out

    def forward(self, images, *args, **kwargs):
        forwards.append(images.shape[0])
        return real_forward(self, images, *args, **kwargs)

    monkeypatch.setattr(dmmi.inference.F, "interpolate", interpolate)
    monkeypatch.setattr(type(predictor.model), "forward", forward)
    chunked = Predictor(predictor.model, predictor.cfg, device="cpu", tokenizer=predictor.tokenizer,
                        expressions_per_call=3)
    stream = chunked.iter_predict(photo, TEXTS * 3)  # 21 expressions
    first = next(stream)
    assert first.text == TEXTS[0] and upsampled == [1] and forwards == [3]  # lazy: one mask so far
    rest = list(stream)
    assert len(rest) == 20 and upsampled == [1] * 21 and forwards == [3] * 7
    forwards.clear()
    with pytest.raises(DmmiError, match="empty expression"):  # every expression checked before any forward
        list(chunked.iter_predict(photo, ["a cat", "   "]))
    assert forwards == []
