"""Confidence and the no-target decision: Prediction.score / .probability, Predictor(threshold=, min_area=),
dmmi predict --threshold / --min-area."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dmmi.cli import main as cli
from dmmi.config import load_config
from dmmi.errors import DmmiError
from dmmi.inference import Predictor
from dmmi.models import build_model
from dmmi.models.io import save_model_file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("dmmi_tiny")
    model = build_model(cfg.model).eval()
    root = tmp_path_factory.mktemp("t")
    image = root / "x.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(image)
    return model, cfg, image, save_model_file(root / "m.pt", model, cfg)


TEXTS = ["the red circle", "all the shapes on the left", "a blue star"]


def test_score_and_probability(setup):
    model, cfg, image, _ = setup
    for pred in Predictor(model, cfg, device="cpu").predict(image, TEXTS):
        assert pred.probability.shape == (64, 64) and pred.probability.dtype == np.float32
        assert 0.0 <= pred.probability.min() and pred.score == pytest.approx(float(pred.probability.max()))
        assert "score" in pred.describe()


def test_threshold_moves_the_mask_and_half_is_the_argmax(setup):
    model, cfg, image, _ = setup
    argmax = Predictor(model, cfg, device="cpu").predict(image, TEXTS)
    half = Predictor(model, cfg, device="cpu", threshold=0.5).predict(image, TEXTS)
    low = Predictor(model, cfg, device="cpu", threshold=0.05).predict(image, TEXTS)
    high = Predictor(model, cfg, device="cpu", threshold=0.95).predict(image, TEXTS)
    for a, h, lo, hi in zip(argmax, half, low, high):
        assert np.array_equal(a.mask, h.mask)
        assert (lo.mask | a.mask).sum() == lo.mask.sum() and (hi.mask & ~a.mask).sum() == 0  # nested
    assert sum(p.mask.sum() for p in low) > sum(p.mask.sum() for p in argmax) > sum(p.mask.sum() for p in high)
    everything = Predictor(model, cfg, device="cpu", threshold=0.0).predict(image, TEXTS[0])
    nothing = Predictor(model, cfg, device="cpu", threshold=1.0).predict(image, TEXTS[0])
    assert everything.mask.all() and nothing.no_target


def test_min_area_turns_small_masks_into_no_target(setup):
    model, cfg, image, _ = setup
    t = next(t for t in (0.5, 0.3, 0.7, 0.1, 0.9)  # a threshold at which the random model's masks are partial
             if 0 < max(p.foreground for p in Predictor(model, cfg, device="cpu", threshold=t).predict(image, TEXTS))
             < 0.99)
    base = Predictor(model, cfg, device="cpu", threshold=t).predict(image, TEXTS)
    cut = max(p.foreground for p in base) + 1e-6
    none = Predictor(model, cfg, device="cpu", threshold=t, min_area=cut).predict(image, TEXTS)
    assert all(p.no_target and p.foreground == 0.0 for p in none)
    kept = Predictor(model, cfg, device="cpu", threshold=t, min_area=cut / 2).predict(image, TEXTS)
    assert [p.no_target for p in kept] == [p.foreground < cut / 2 for p in base]


@pytest.mark.parametrize("kwargs, message", [({"threshold": 1.5}, "threshold must be a foreground probability in [0, 1]"),
                                             ({"threshold": -0.1}, "threshold must be"),
                                             ({"min_area": 1.0}, "min_area must be a share of the image in [0, 1)")])
def test_bad_settings_are_one_line(setup, kwargs, message):
    model, cfg, _, _ = setup
    with pytest.raises(DmmiError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Predictor(model, cfg, device="cpu", **kwargs)


def test_predict_cli_threshold(setup, tmp_path, capsys):
    _, _, image, ckpt = setup
    args = ["predict", str(image), "the red circle", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]
    assert cli(args + ["--threshold", "1.0"]) == 0
    assert "no target (score" in capsys.readouterr().out
    bad = ["predict", str(image), "the red circle", "--checkpoint", str(ckpt), "--out", str(tmp_path / "bad")]
    assert cli(bad + ["--threshold", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("dmmi: error: --threshold must be a foreground probability in [0, 1] "
                                              "(or None: the argmax), got 2.0")
    assert not (tmp_path / "bad").exists()  # refused before anything is written
