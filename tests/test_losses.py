"""Losses against values derived by hand."""

import math

import pytest
import torch

from dmmi.config import LossConfig
from dmmi.errors import DmmiError
from dmmi.losses import contrastive_loss, dmmi_loss, segmentation_loss, similarity_loss
from dmmi.models.dmmi import DMMIOutput


def test_weighted_cross_entropy_by_hand():
    # two pixels: logits (0, 0) -> p = 1/2 each; target 1 (w=1.1) and 0 (w=0.9)
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 1] = math.log(3)  # second pixel: p(fg) = 3/4, p(bg) = 1/4
    target = torch.tensor([[[1, 0]]])
    # pixel 1: -log(1/2) * 1.1; pixel 2: -log(1/4) * 0.9; weighted mean over w = 1.1 + 0.9
    expected = (1.1 * math.log(2) + 0.9 * math.log(4)) / 2.0
    assert segmentation_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_similarity_loss_by_hand_with_a_zero_sample():
    # sample 0 (delta 1): 2 valid tokens, cos = 1 and 0 -> mean 0.5; sample 1 (delta 0)
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    r = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-5.0, -5.0]], [[-1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    delta = torch.tensor([1, 0])
    # ours: mean_b delta_b (1 - s_b) = (1 * (1 - 0.5) + 0) / 2
    assert similarity_loss(e, r, mask, delta).item() == pytest.approx(0.25)
    # authors: 1 - mean_b(delta_b s_b) = 1 - (0.5 + 0) / 2
    assert similarity_loss(e, r, mask, delta, compat=True).item() == pytest.approx(0.75)
    # gradient never reaches E4* (detached)
    e.requires_grad_(True)
    r.requires_grad_(True)
    similarity_loss(e, r, mask, delta).backward()
    assert e.grad is None and r.grad is not None
    assert torch.all(r.grad[1] == 0)  # zero-target sample contributes nothing


def test_contrastive_loss_by_hand():
    # orthonormal vectors: logits = I / t; each row: -log(e^{1/t} / (e^{1/t} + (B-1)))
    v = torch.eye(2)
    t = 0.5
    per = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1))
    assert contrastive_loss(v, v.clone(), torch.tensor([1, 1]), t).item() == pytest.approx(2 * per, rel=1e-6)
    # delta = 0 for sample 1: its terms vanish but B stays the denominator
    assert contrastive_loss(v, v.clone(), torch.tensor([1, 0]), t).item() == pytest.approx(per, rel=1e-6)
    # scaling a vector does not matter (L2-normalised)
    assert contrastive_loss(3 * v, v, torch.tensor([1, 1]), t).item() == pytest.approx(2 * per, rel=1e-6)


def test_total_loss_weights_and_missing_branches():
    logits = torch.zeros(2, 2, 1, 1)
    target = torch.zeros(2, 1, 1, dtype=torch.long)
    words = torch.randn(2, 3, 4)
    out = DMMIOutput(logits=logits, words_final=words, reconstructed=words.clone(),
                     pooled_visual=torch.eye(2, 4), pooled_text=torch.eye(2, 4))
    mask, delta = torch.ones(2, 3), torch.tensor([1, 1])
    cfg = LossConfig(w_sim=0.5, w_con=2.0, temperature=1.0)
    terms = dmmi_loss(out, target, mask, delta, cfg)
    assert terms.sim.item() == pytest.approx(0.0, abs=1e-6)  # perfect reconstruction
    assert terms.total.item() == pytest.approx(terms.ce.item() + 0.5 * terms.sim.item() + 2.0 * terms.con.item())
    plain = dmmi_loss(DMMIOutput(logits=logits, words_final=words), target, mask, delta, cfg)
    assert plain.sim is None and plain.con is None and plain.total.item() == pytest.approx(math.log(2))


def test_empty_mask_loss_by_hand():
    """softplus(mean of the top 0.5% foreground margins) per zero-target sample, / B; targeted
    samples add nothing; the gradient reaches only those worst pixels."""
    from dmmi.losses import empty_mask_loss

    logits = torch.zeros(3, 2, 20, 20)  # 400 pixels: the top 2 count
    logits[:, 0] = 3.0  # background everywhere by a margin of 3 ...
    logits[0, 1, 0, :2] = 8.0  # ... but sample 0 has a 2-pixel blob at margin +5
    logits[2, 1, 5, 5] = 13.0  # sample 2 (targeted) has a blob too: ignored
    logits.requires_grad_(True)
    delta = torch.tensor([0, 0, 1])
    loss = empty_mask_loss(logits, delta)
    expected = (math.log1p(math.exp(5.0)) + math.log1p(math.exp(-3.0))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    touched = logits.grad.abs().sum(1) > 0  # (B, H, W)
    assert touched[0].sum() == 2 and touched[0, 0, :2].all()
    assert (logits.grad[0, 1, 0, :2] > 0).all()  # descent pushes the blob's foreground down
    assert touched[1].sum() == 2 and not touched[2].any()
    assert empty_mask_loss(logits.detach(), torch.tensor([1, 1, 1])).item() == 0.0


def test_empty_mask_loss_joins_the_total_only_with_a_weight():
    logits = torch.zeros(2, 2, 4, 4)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    out = DMMIOutput(logits=logits, words_final=torch.randn(2, 3, 4))
    mask, delta = torch.ones(2, 3), torch.tensor([0, 1])
    assert dmmi_loss(out, target, mask, delta, LossConfig()).empty is None  # the paper's loss
    terms = dmmi_loss(out, target, mask, delta, LossConfig(w_empty=0.5))
    assert terms.empty.item() == pytest.approx(math.log(2) / 2)  # margin 0 -> softplus(0), 1 of 2 samples
    assert terms.total.item() == pytest.approx(terms.ce.item() + 0.5 * terms.empty.item())
    assert "loss_empty" in terms.as_dict()
    with pytest.raises(DmmiError, match="loss.w_empty must be >= 0, got -1"):
        LossConfig(w_empty=-1)


def test_paper_loss_is_eq_8_11_only_and_dmmi_loss_adds_l_empty_to_it():
    """The paper's loss ignores loss.w_empty; dmmi_loss is it plus w_empty * L_empty, nothing else."""
    from dmmi.losses import empty_mask_loss, paper_loss

    out, target, mask, delta = _bf16_outputs()
    f = {k: getattr(out, k).float() for k in ("logits", "words_final", "reconstructed", "pooled_visual", "pooled_text")}
    cfg = LossConfig(w_empty=0.5)
    paper = paper_loss(f["logits"], f["words_final"], f["reconstructed"], f["pooled_visual"], f["pooled_text"],
                       target, mask, delta, cfg)
    assert paper.empty is None
    expected = paper.ce + cfg.w_sim * paper.sim + cfg.w_con * paper.con
    assert torch.equal(paper.total, expected)
    full = dmmi_loss(out, target, mask, delta, cfg)
    assert torch.equal(full.empty, empty_mask_loss(f["logits"], delta)) and full.empty > 0
    assert torch.equal(full.total, paper.total + 0.5 * full.empty)
    assert torch.equal(dmmi_loss(out, target, mask, delta, LossConfig()).total, paper.total)


def _bf16_outputs(seed=0, B=6, L=5, C=16):
    """Model outputs as bf16 autocast leaves them (bf16 tensors), with their targets."""
    g = torch.Generator().manual_seed(seed)
    out = DMMIOutput(logits=torch.randn(B, 2, 12, 12, generator=g).bfloat16(),
                     words_final=torch.randn(B, L, C, generator=g).bfloat16(),
                     reconstructed=torch.randn(B, L, C, generator=g).bfloat16(),
                     pooled_visual=torch.randn(B, C, generator=g).bfloat16(),
                     pooled_text=torch.randn(B, C, generator=g).bfloat16())
    target = (torch.rand(B, 12, 12, generator=g) > 0.7).long()
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:, 3:] = 0
    delta = torch.tensor([1, 1, 0, 1, 1, 1])
    return out, target, mask, delta


def test_dmmi_loss_is_fp32_under_bf16_autocast():
    """Called inside autocast (as the training step does), every term equals the loss of fp32 copies
    of the same outputs: the contrastive matmul / 0.05 and the class weights are not rounded to bf16."""
    out, target, mask, delta = _bf16_outputs()
    cfg = LossConfig(w_empty=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = dmmi_loss(out, target, mask, delta, cfg)
    fp32 = DMMIOutput(**{k: getattr(out, k).float() for k in ("logits", "words_final", "reconstructed",
                                                              "pooled_visual", "pooled_text")})
    plain = dmmi_loss(fp32, target, mask, delta, cfg)
    for key, value in plain.as_dict().items():
        got = under.as_dict()[key]
        assert got.dtype == torch.float32, key
        assert got.item() == pytest.approx(value.item(), rel=1e-6), key


def test_dmmi_loss_gradients_reach_bf16_outputs():
    out, target, mask, delta = _bf16_outputs(seed=1)
    for name in ("logits", "reconstructed", "pooled_visual", "pooled_text"):
        getattr(out, name).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dmmi_loss(out, target, mask, delta, LossConfig()).total.backward()
    for name in ("logits", "reconstructed", "pooled_visual", "pooled_text"):
        grad = getattr(out, name).grad
        assert grad is not None and grad.dtype == torch.bfloat16 and grad.abs().sum() > 0, name
