"""Parity with the authors' implementation on the test vectors of ../shared/parity/."""

import numpy as np
import pytest
import torch

from dmmi.config import load_config
from dmmi.convert import convert_state_dicts, map_authors_key
from dmmi.errors import DmmiError
from dmmi.losses import dmmi_loss
from dmmi.models import build_model
from parity_utils import authors_keys, deterministic_authors_state, parity_file

PARITY_SETTINGS = ["model.compat=ris-dmmi", "model.drop_path=0", "model.decoder_dropout=0", "model.image_size=224"]


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(parity_file("golden_swin_t.npz")))


@pytest.fixture(scope="module")
def converted_swin_t():
    cfg = load_config("dmmi_swin_t", PARITY_SETTINGS)
    model = build_model(cfg.model, text_width=768)
    state, report = convert_state_dicts(deterministic_authors_state("swin_t"), None, model.state_dict())
    model.load_state_dict(state, strict=not report["missing"])
    return model, cfg, report


def _inputs(g):
    words = torch.from_numpy(g["l_feats"]).transpose(1, 2)  # (B, L, 768)
    erased = torch.from_numpy(g["l_feats_erased"]).transpose(1, 2)
    return torch.from_numpy(g["image"]), words, torch.from_numpy(g["l_mask"]), erased


def test_conversion_is_complete(converted_swin_t):
    _, _, report = converted_swin_t
    assert report["missing"] == []
    # 3 x 16 tensors of unused decoder-layer copies + the last stage's gate (2) + 6 buffers... all reported
    assert report["dropped_parameters"] == 23_633_664 + 768 * 768 * 2


def test_eval_matches_authors(converted_swin_t, golden):
    model, _, _ = converted_swin_t
    model.eval()
    image, words, mask, _ = _inputs(golden)
    with torch.no_grad():
        out = model.forward_features(image, words, mask)
    for i in range(4):
        np.testing.assert_allclose(out.skips[i].numpy(), golden[f"eval_stage{i + 1}_feature"], atol=1e-4)
    np.testing.assert_allclose(out.words_final.transpose(1, 2).numpy(), golden["eval_lang_final"], atol=1e-4)
    assert np.abs(out.logits.numpy() - golden["eval_logits"]).max() <= 1e-4
    assert out.reconstructed is None and out.pooled_visual is None  # no training branch at eval


def test_train_matches_authors(converted_swin_t, golden):
    model, cfg, _ = converted_swin_t
    model.train()
    image, words, mask, erased = _inputs(golden)
    out = model.forward_features(image, words, mask, erased)
    np.testing.assert_allclose(out.logits.detach().numpy(), golden["train_logits"], atol=1e-4)
    np.testing.assert_allclose(out.reconstructed.detach().transpose(1, 2).numpy(),
                               golden["train_reconstructed_text"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.pooled_visual.detach().numpy(), golden["train_pooled_visual"], rtol=1e-4, atol=1e-5)
    losses = dmmi_loss(out, torch.from_numpy(golden["target"]), mask, torch.from_numpy(golden["delta"]), cfg.loss,
                       compat=True)
    for ours, key in ((losses.ce, "loss_ce"), (losses.sim, "loss_sim"), (losses.con, "loss_con"),
                      (losses.total, "loss_total")):
        assert ours.item() == pytest.approx(float(golden[f"train_{key}"]), rel=1e-4)


@pytest.mark.parametrize("variant,preset", [("swin_b", "dmmi_swin_b"), ("r101", "dmmi_r101")])
def test_every_authors_key_maps_with_the_right_shape(variant, preset):
    model = build_model(load_config(preset, ["model.image_size=64"]).model, text_width=768)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    placed = set()
    dropped = 0
    for name, shape, _ in authors_keys(variant):
        target = map_authors_key(name)
        if target is None or (target not in ours and ".visual_gate." in target):
            dropped += 1
            continue
        assert target in ours, f"{name} -> {target} does not exist"
        assert ours[target] == tuple(shape), f"{name} -> {target}: {shape} vs {ours[target]}"
        placed.add(target)
    leftover = [k for k in ours if k not in placed and not k.endswith("num_batches_tracked")]
    assert leftover == []  # strict: nothing of ours is left unset
    assert dropped > 0


def test_conversion_refuses_mismatch_and_unknown_keys():
    model = build_model(load_config("dmmi_swin_t", PARITY_SETTINGS).model, text_width=768)
    state = deterministic_authors_state("swin_t")
    bad = dict(state)
    bad["classifier.conv1_1.weight"] = torch.zeros(3, 768, 1, 1)
    with pytest.raises(DmmiError, match="shape mismatch for 'classifier.conv1_1.weight'"):
        convert_state_dicts(bad, None, model.state_dict())
    with pytest.raises(DmmiError, match="not part of the authors"):
        convert_state_dicts({"foo.bar": torch.zeros(1)}, None, model.state_dict())
