"""One no-target decision for Predictor and dmmi evaluate: decide_masks (threshold, then min_area)
is what both apply, so their masks agree at every threshold, the extremes included, and at the
exact area share."""

from __future__ import annotations

from argparse import Namespace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dmmi.config import load_config
from dmmi.engine.commands import check_decision
from dmmi.decision import decide_masks
from dmmi.engine.evaluate import run_evaluation
from dmmi.errors import DmmiError
from dmmi.inference import Predictor
from dmmi.models import build_model


def _ramp(n: int, side: int) -> torch.Tensor:
    """(n, 2, side, side) logits: background 0, referred from -60 to +60 along the rows (p from ~0 to ~1)."""
    logits = torch.zeros(n, 2, side, side)
    logits[:, 1] = torch.linspace(-60.0, 60.0, side)[:, None]
    return logits


@pytest.fixture(scope="module")
def predictor_and_image(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("dmmi_tiny")
    image = tmp_path_factory.mktemp("d") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(image)
    return build_model(cfg.model).eval(), cfg, image


@pytest.mark.parametrize("threshold", [None, 0.0, 0.3, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("min_area", [0.0, 0.45, 0.55])
def test_predictor_masks_are_decide_masks_at_the_images_size(predictor_and_image, monkeypatch, threshold,
                                                            min_area):
    model, cfg, image = predictor_and_image
    predictor = Predictor(model, cfg, device="cpu", threshold=threshold, min_area=min_area)
    side = cfg.model.image_size
    monkeypatch.setattr(predictor, "_logits", lambda images, ids, mask: _ramp(len(ids), side))
    pred = predictor.predict(image, "the red circle")
    up = F.interpolate(_ramp(1, side), size=(48, 80), mode="bilinear", align_corners=False)
    expected = decide_masks(up, threshold, min_area)[0].numpy()  # measured at the image's (48, 80)
    assert pred.mask.shape == (48, 80) and np.array_equal(pred.mask, expected)
    assert pred.foreground == np.count_nonzero(expected) / expected.size
    if threshold == 1.0 and not min_area:  # p > 1 - 1e-12, compared as logits: the most confident rows only
        assert 0 < pred.foreground < 0.5
    if threshold == 0.0 and not min_area:  # p > 1e-12: not the rows where p is below it
        assert 0.5 < pred.foreground < 1


def test_min_area_is_compared_with_the_exact_share():
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 1, 0, 0] = 3.0  # one pixel of three referred
    assert decide_masks(logits, None, 1 / 3).sum() == 1  # exactly the minimum: kept
    # just above 1/3: no target, as Predictor's count / size < min_area says (float32 would round it to 1/3)
    assert decide_masks(logits, None, float(np.nextafter(1 / 3, 1))).sum() == 0


class _FromTruth(torch.nn.Module):
    """A stand-in model whose logits are +40 (p ~ 1 - 4e-18) on the ground truth, -50 elsewhere."""

    def __init__(self, truth: torch.Tensor):
        super().__init__()
        self.truth = truth

    def forward(self, images, ids, mask):
        logits = torch.zeros(len(images), 2, *self.truth.shape[1:])
        logits[:, 1] = torch.where(self.truth, 40.0, -50.0)
        return SimpleNamespace(logits=logits, masks=lambda: logits.argmax(1).bool())


def _evaluate(threshold, min_area=0.0):
    truth = torch.zeros(2, 8, 8, dtype=torch.bool)
    truth[0, :4] = True  # sample 0: half the image; sample 1: a zero-target expression
    batch = {"image": torch.zeros(2, 3, 8, 8), "input_ids": torch.zeros(2, 4, dtype=torch.long),
             "attention_mask": torch.ones(2, 4, dtype=torch.long), "mask": truth, "type": ["one", "zero"],
             "index": torch.tensor([0, 1])}
    results, _ = run_evaluation(_FromTruth(truth), [batch], torch.device("cpu"), fast=False, progress=False,
                                threshold=threshold, min_area=min_area, sweep=(0.5,))
    return results


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_evaluate_decides_as_predictor_at_the_extreme_thresholds(threshold):
    # Predictor compares p > t as logits with t kept in [1e-12, 1 - 1e-12]: +40 is above both, -50 below
    # both, so the masks are the ground truth (a softmax compared with 1.0 would give nothing, with 0.0 everything)
    argmax = _evaluate(None)["dmmi"]
    assert argmax["oIoU"] == 100.0 and argmax["Acc"] == 100.0
    assert _evaluate(threshold)["dmmi"] == argmax


def test_evaluate_min_area_empties_the_masks_below_the_exact_share():
    above_half = float(np.nextafter(0.5, 1))  # the half-image mask is just below it: no target
    results = _evaluate(None, above_half)
    assert results["dmmi"]["oIoU"] == 0.0 and results["dmmi"]["Acc"] == 100.0
    assert results["sweep"][0]["dmmi"] == results["dmmi"]  # the sweep at 0.5 applies it too
    assert _evaluate(None, 0.5)["dmmi"]["oIoU"] == 100.0  # exactly half: kept


@pytest.mark.parametrize("value", [-1.0, 1.0, True, "0.1"])
def test_min_area_is_checked_once_for_predictor_and_the_options(predictor_and_image, value):
    from dmmi.inference import check_min_area

    model, cfg, _ = predictor_and_image
    with pytest.raises(DmmiError, match=r"^min_area must be a share of the image in \[0, 1\), got "):
        Predictor(model, cfg, device="cpu", min_area=value)
    with pytest.raises(DmmiError, match=r"^--min-area must be a share of the image in \[0, 1\), got "):
        check_decision(Namespace(threshold=None, min_area=value))
    assert check_min_area(0.25) == 0.25 and isinstance(check_min_area(0), float)
