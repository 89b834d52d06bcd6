"""`dmmi predict` against hostile input: same-stem images, unwritable outputs, control
characters, the device hint, the pixel cap, 16-bit and EXIF-rotated files, long names."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dmmi.inference
from dmmi.cli import main as cli
from dmmi.config import load_config
from dmmi.models import build_model
from dmmi.models.io import save_model_file

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = load_config("dmmi_tiny", [])
    torch.manual_seed(0)
    return str(save_model_file(tmp_path_factory.mktemp("model") / "tiny.pt", build_model(cfg.model), cfg))


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def error_of(capsys, args) -> str:
    assert cli(args) == 2
    # the tiny model is a synthetic-set model: its one-line domain note may come first (dmmi.inference)
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("dmmi: note:")]
    err = "\n".join(lines)
    assert err.startswith("dmmi: error:") and "\n" not in err, err
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model gets loaded (the error must come first)."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(dmmi.inference.Predictor, "load", load)


def test_same_stem_images_get_their_own_outputs(ckpt, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise(40, 30, 1).save(folder / "x.png")
    noise(50, 20, 2).save(folder / "x.jpg", quality=95)
    assert cli(["predict", str(folder), "the red circle", "--checkpoint", ckpt, "--out", str(tmp_path / "o")]) == 0
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["x.jpg__00_the_red_circle_mask.png", "x.jpg__00_the_red_circle_overlay.png",
                     "x.png__00_the_red_circle_mask.png", "x.png__00_the_red_circle_overlay.png"]
    assert Image.open(tmp_path / "o" / "x.png__00_the_red_circle_mask.png").size == (40, 30)
    assert Image.open(tmp_path / "o" / "x.jpg__00_the_red_circle_overlay.png").size == (50, 20)
    assert capsys.readouterr().out.count("->") == 2


def test_out_that_is_a_file_is_an_error_before_the_model_loads(ckpt, tmp_path, capsys, no_model_load):
    noise(20, 20).save(tmp_path / "a.png")
    (tmp_path / "taken").write_text("a file")
    err = error_of(capsys, ["predict", str(tmp_path / "a.png"), "a cat", "--checkpoint", ckpt,
                            "--out", str(tmp_path / "taken")])
    assert "--out" in err and "taken" in err and "not a folder" in err
    err = error_of(capsys, ["predict", str(tmp_path / "a.png"), "a cat", "--checkpoint", ckpt,
                            "--out", str(tmp_path / "taken" / "sub")])
    assert "not a folder" in err and not (tmp_path / "taken" / "sub").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write in read-only folders")
def test_read_only_out_folder_is_an_error_before_the_model_loads(ckpt, tmp_path, capsys, no_model_load):
    noise(20, 20).save(tmp_path / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        err = error_of(capsys, ["predict", str(tmp_path / "a.png"), "a cat", "--checkpoint", ckpt,
                                "--out", str(locked / "new")])
    finally:
        locked.chmod(0o700)
    assert "cannot write in" in err and "locked" in err


def test_unwritable_out_folder_is_an_error_before_the_model_loads(ckpt, tmp_path, capsys, no_model_load,
                                                                  monkeypatch):
    """As the read-only test, for any user (root writes anywhere): the write probe is refused."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    noise(20, 20).save(tmp_path / "a.png")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    err = error_of(capsys, ["predict", str(tmp_path / "a.png"), "a cat", "--checkpoint", ckpt,
                            "--out", str(tmp_path / "o")])
    assert "cannot write in" in err and "Permission denied" in err and not (tmp_path / "o").exists()


def test_an_output_that_cannot_be_written_is_a_one_line_error(ckpt, tmp_path, capsys):
    noise(20, 20).save(tmp_path / "a.png")
    (tmp_path / "o" / "a.png__00_a_cat_mask.png").mkdir(parents=True)  # a folder where the mask goes
    err = error_of(capsys, ["predict", str(tmp_path / "a.png"), "a cat", "--checkpoint", ckpt,
                            "--out", str(tmp_path / "o")])
    assert "cannot write" in err and "a.png__00_a_cat" in err


def test_control_characters_are_not_echoed_raw(ckpt, tmp_path, capsys):
    noise(20, 20).save(tmp_path / "evil\x1b[2J.png")
    assert cli(["predict", str(tmp_path / "evil\x1b[2J.png"), "the \x1b]0;owned\x07red\rcircle\u202e",
                "--checkpoint", ckpt, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\u202e" not in out
    assert "evil\\x1b[2J.png" in out and "the \\x1b]0;owned\\x07red\\rcircle\\u202e" in out
    masks = [p.name for p in (tmp_path / "o").glob("*_mask.png")]
    assert masks == ["evil\x1b[2J.png__00_the_0_owned_red_circle_mask.png"]  # a valid file name, kept


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_cuda_request_names_predicts_own_option(ckpt, tmp_path, capsys, no_model_load):
    noise(20, 20).save(tmp_path / "a.png")
    err = error_of(capsys, ["predict", str(tmp_path / "a.png"), "a cat", "--checkpoint", ckpt, "--device", "cuda",
                            "--out", str(tmp_path / "o")])
    assert "no CUDA device" in err and err.endswith("use --device cpu") and "--set" not in err


def test_max_pixels_option(ckpt, tmp_path, capsys):
    noise(40, 30).save(tmp_path / "a.png")  # 1200 pixels
    err = error_of(capsys, ["predict", str(tmp_path / "a.png"), "a cat", "--checkpoint", ckpt, "--max-pixels", "1199",
                            "--out", str(tmp_path / "o")])
    assert "a.png" in err and "40x30" in err and "too large" in err
    assert cli(["predict", str(tmp_path / "a.png"), "a cat", "--checkpoint", ckpt, "--max-pixels", "1200",
                "--out", str(tmp_path / "o")]) == 0
    err = error_of(capsys, ["predict", str(tmp_path / "a.png"), "a cat", "--checkpoint", ckpt, "--max-pixels", "0"])
    assert "--max-pixels must be a whole number" in err


def test_a_too_large_image_in_a_folder_is_skipped(ckpt, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise(40, 30).save(folder / "big.png")
    noise(20, 20).save(folder / "small.png")
    assert cli(["predict", str(folder), "a cat", "--checkpoint", ckpt, "--max-pixels", "1000",
                "--out", str(tmp_path / "o")]) == 1  # some skipped
    out = capsys.readouterr().out
    assert "skipped: image" in out and "big.png is too large" in out and "small.png: \"a cat\"" in out


def test_16_bit_and_exif_rotated_images(ckpt, tmp_path):
    grey = np.linspace(0, 65535, 24 * 16).reshape(16, 24).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")  # I;16: was read as white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned: 40 x 20 stored, 20 x 40 upright
    noise(40, 20).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    for name in ("g16.png", "phone.jpg"):
        assert cli(["predict", str(tmp_path / name), "the left half", "--checkpoint", ckpt,
                    "--out", str(tmp_path / "o")]) == 0
    (mask_path,), (overlay_path,) = (tmp_path / "o").glob("g16*_mask.png"), (tmp_path / "o").glob("g16*_overlay.png")
    mask = np.asarray(Image.open(mask_path)) > 0
    shown = np.asarray(Image.open(overlay_path))
    want = ((grey.astype(np.uint32) + 128) // 257).astype(np.uint8)
    assert (~mask).any() and np.array_equal(shown[~mask][:, 0], want[~mask])  # untinted pixels: the grey itself
    (phone_mask,) = (tmp_path / "o").glob("phone*_mask.png")
    assert Image.open(phone_mask).size == (20, 40)


def test_a_very_long_file_name_gets_a_short_output_name(ckpt, tmp_path):
    long_a, long_b = "a" * 200 + "1.png", "a" * 200 + "2.png"
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise(20, 20, 1).save(folder / long_a)
    noise(20, 20, 2).save(folder / long_b)
    assert cli(["predict", str(folder), "a cat " * 20, "--checkpoint", ckpt, "--out", str(tmp_path / "o")]) == 0
    names = [p.name for p in (tmp_path / "o").iterdir()]
    assert len(names) == 4 and all(len(n.encode()) < 255 for n in names)
    assert len({n.split("__")[0] for n in names}) == 2  # still one name per image


def test_a_long_expression_in_a_wide_script_still_gives_file_names_under_255_bytes(ckpt, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise(20, 20, 1).save(folder / ("a" * 200 + ".png"))
    assert cli(["predict", str(folder), "左边的红色圆圈" * 15, "--checkpoint", ckpt, "--out", str(tmp_path / "o")]) == 0
    names = [p.name for p in (tmp_path / "o").iterdir()]
    assert len(names) == 2 and all(len(n.encode()) < 255 for n in names)
    assert all("左边的红色圆圈" in n for n in names)  # the expression's own words, cut by bytes


def test_a_png_that_is_not_one_names_the_file(ckpt, tmp_path, capsys):
    (tmp_path / "fake.png").write_bytes(io.BytesIO(b"GIF89a nonsense").getvalue())
    err = error_of(capsys, ["predict", str(tmp_path / "fake.png"), "a cat", "--checkpoint", ckpt,
                            "--out", str(tmp_path / "o")])
    assert "cannot read image" in err and "fake.png" in err
