"""Checkpoints keep loading and models compute as before: the state-dict keys (and shapes), the
initial weights and a few output checksums of three models with the extras (location prior,
decoder position codes, text cache) on and off, recorded from the code before the extras moved
to dmmi.models.extras (commit 17e03ab). Regenerate only for an intended change:

    python tests/models/test_checkpoint_compat.py tests/models/state_dict_reference.json
"""

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dmmi.config import load_config
from dmmi.models import build_model

REFERENCE = Path(__file__).with_name("state_dict_reference.json")
CASES = {
    # location prior (object mode), position codes, text cache; recorded when the preset froze 1 stage
    "demo_lite": ("demo_lite", ["model.backbone_frozen_stages=1"]),
    "dmmi_tiny": ("dmmi_tiny", []),  # no extras
    "dmmi_tiny_extras": ("dmmi_tiny", ["model.location_prior=true", "model.location_prior_mode=object",
                                       "model.decoder_pos_embed=true", "model.text_frozen=true",
                                       "model.text_cache=8"]),
}


def _batch(size, b=2, length=12):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, size, size, generator=g)
    ids = torch.randint(1000, 3000, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    erased = ids.clone()
    erased[0, 2:4] = 0
    return images, ids, mask, erased


def record(name: str) -> dict:
    preset, sets = CASES[name]
    cfg = load_config(preset, sets)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg.model)
    sd = model.state_dict()
    rec = {"keys": {k: list(v.shape) for k, v in sd.items()},
           "param_sum": float(sum(v.double().sum() for v in sd.values() if v.is_floating_point()))}
    prior = getattr(model, "location_prior", None)
    if prior is not None:  # zero-initialised: give it slopes so that it moves the logits
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            prior.slopes.weight.copy_(torch.randn(prior.slopes.weight.shape, generator=g) * 0.05)
    images, ids, mask, erased = _batch(cfg.model.image_size)
    model.eval()
    with torch.no_grad():
        lg = model(images, ids, mask).logits
        lg2 = model(images, ids, mask).logits  # a second call: cache hits where a cache is on
    rec["eval_logits"] = [float(lg.double().sum()), float(lg.double().abs().sum()), float(lg[0, 1, 5, 7]),
                          float(lg[1, 0, -3, 2])]
    rec["eval_logits_again"] = float(lg2.double().sum())
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        o = model(images, ids, mask, erased)
    rec["train"] = {k: float(getattr(o, k).double().sum())
                    for k in ("logits", "reconstructed", "pooled_visual", "pooled_text") if getattr(o, k) is not None}
    return rec


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_keys_weights_and_outputs_are_as_recorded(name):
    expected = json.loads(REFERENCE.read_text())[name]
    got = record(name)
    assert got["keys"] == expected["keys"]  # same names and shapes: old checkpoints load
    assert math.isclose(got["param_sum"], expected["param_sum"], rel_tol=1e-9)  # same initialisation
    assert all(map(_close, got["eval_logits"], expected["eval_logits"])), (got["eval_logits"], expected["eval_logits"])
    assert _close(got["eval_logits_again"], expected["eval_logits_again"])
    assert got["train"].keys() == expected["train"].keys()
    assert all(_close(got["train"][k], v) for k, v in expected["train"].items()), (got["train"], expected["train"])


def test_the_extras_are_what_the_reference_covers():
    ref = json.loads(REFERENCE.read_text())
    extra_keys = set(ref["dmmi_tiny_extras"]["keys"]) - set(ref["dmmi_tiny"]["keys"])
    assert extra_keys == {"location_prior.slopes.weight", "location_prior.slopes.bias"}
    assert not any(k.startswith("location_prior") for k in ref["dmmi_tiny"]["keys"])


if __name__ == "__main__":
    json.dump({n: record(n) for n in CASES}, open(sys.argv[1], "w"), separators=(",", ":"), sort_keys=True)
