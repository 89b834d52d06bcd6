"""DMMI's losses as pure functions (paper Eq. 8-11, SPEC §2).

    L = L_ce + w_sim * L_sim + w_con * L_con                    (the paper: paper_loss)
      [+ w_empty * L_empty]                                     (not in the paper, loss.w_empty)

Two parts: the paper's terms and :func:`paper_loss`; then what is not in the paper (L_empty) and
:func:`dmmi_loss`, which adds it where LossConfig asks (the losses' counterpart of build_model;
the model-side extras are in :mod:`dmmi.models.extras`).

delta (B,) is 1 for samples that refer to at least one object and 0 for zero-target
samples; L_sim and L_con ignore delta = 0 samples but still divide by the batch size B.

:func:`dmmi_loss` always computes in fp32: it turns autocast off and upcasts the model's
outputs (under bf16 autocast a ``v @ e.t() / 0.05`` matmul rounds the contrastive logits to
steps of 0.06-0.125, and the class weights would be built in bf16). Under DDP every term is
the loss of this device's micro-batch; DDP averages the gradients over devices (the
class-weighted L_ce normalisation and L_con's in-batch negatives are per device, as in the
authors' release).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ the paper (Eq. 8-11)
def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, class_weights=(0.9, 1.1)) -> torch.Tensor:
    """L_ce: weighted 2-class cross-entropy. logits (B, 2, H, W), target (B, H, W) in {0, 1}.

    PyTorch's weighted mean: sum_i w[y_i] * nll_i / sum_i w[y_i].
    """
    weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    return F.cross_entropy(logits, target.long(), weight=weight)


def similarity_loss(words_final: torch.Tensor, reconstructed: torch.Tensor, word_mask: torch.Tensor,
                    delta: torch.Tensor, *, compat: bool = False) -> torch.Tensor:
    """L_sim (Eq. 8): delta * (1 - cos(detach(E4*), E^)), cosine per token over channels,
    averaged over valid tokens, then over the batch (denominator B).

    words_final, reconstructed: (B, L, Ct); word_mask (B, L); delta (B,).
    ``compat``: the authors' form 1 - mean_b(delta_b * s_b), which adds (#zero samples)/B,
    a constant with the same gradient.
    """
    m = word_mask.to(reconstructed.dtype)  # (B, L)
    target = (words_final.detach() * m[..., None])
    cos = F.cosine_similarity(target, reconstructed * m[..., None], dim=-1, eps=1e-6)  # (B, L)
    per_sample = (cos * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B,)
    d = delta.to(per_sample.dtype)
    if compat:
        return 1.0 - (per_sample * d).mean()
    return (d * (1.0 - per_sample)).mean()


def contrastive_loss(pooled_visual: torch.Tensor, pooled_text: torch.Tensor, delta: torch.Tensor,
                     temperature: float = 0.05) -> torch.Tensor:
    """L_con (Eq. 9-11): symmetric InfoNCE over the batch, diagonal positives.

    pooled_visual, pooled_text (B, C), L2-normalised here; logits = V_o . E_o^T / temperature.
    Each direction: -(1/B) sum_i delta_i log softmax_i(i). Zero-target samples stay negatives.
    """
    v = F.normalize(pooled_visual, dim=1)
    e = F.normalize(pooled_text, dim=1)
    logits = v @ e.t() / temperature  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    d = delta.to(logits.dtype)
    i2t = (F.cross_entropy(logits, labels, reduction="none") * d).mean()
    t2i = (F.cross_entropy(logits.t(), labels, reduction="none") * d).mean()
    return i2t + t2i


@dataclass
class LossTerms:
    total: torch.Tensor
    ce: torch.Tensor
    sim: Optional[torch.Tensor] = None
    con: Optional[torch.Tensor] = None
    empty: Optional[torch.Tensor] = None

    def as_dict(self) -> dict:
        return {k: v for k, v in (("loss", self.total), ("loss_ce", self.ce), ("loss_sim", self.sim),
                                  ("loss_con", self.con), ("loss_empty", self.empty)) if v is not None}


def paper_loss(logits, words_final, reconstructed, pooled_visual, pooled_text, target, word_mask, delta, cfg,
               *, compat: bool = False) -> LossTerms:
    """L_ce + w_sim * L_sim + w_con * L_con from the model's outputs (as they come: no casts).

    logits (B, 2, H, W); words_final, reconstructed (B, L, Ct) or None; pooled_visual, pooled_text
    (B, Ct) or None; target (B, H, W); word_mask (B, L); delta (B,). cfg: LossConfig (ce_weights,
    w_sim, w_con, temperature). Terms whose branch did not run (None: ablations, eval) are left out.
    """
    ce = segmentation_loss(logits, target, cfg.ce_weights)
    total = ce
    sim = con = None
    if reconstructed is not None:
        sim = similarity_loss(words_final, reconstructed, word_mask, delta, compat=compat)
        total = total + cfg.w_sim * sim
    if pooled_visual is not None:
        con = contrastive_loss(pooled_visual, pooled_text, delta, cfg.temperature)
        total = total + cfg.w_con * con
    return LossTerms(total=total, ce=ce, sim=sim, con=con)


# ------------------------------------------------------------------ not in the paper
def empty_mask_loss(logits: torch.Tensor, delta: torch.Tensor, top_share: float = 0.005) -> torch.Tensor:
    """L_empty (not in the paper): softplus of the mean of the top ``top_share`` foreground
    margins (logit 1 - logit 0) of each zero-target sample, summed over those samples and divided
    by the batch size B.

    A zero-target sample counts as right only when *no* pixel is foreground (SPEC §5), but in the
    pixel-averaged L_ce a 50-pixel false blob on a 96 x 96 map weighs 0.5% of that sample: this
    term puts its weight on the worst pixels. logits (B, 2, H, W); delta (B,), 0 = zero target.
    """
    margin = (logits[:, 1] - logits[:, 0]).flatten(1).float()  # (B, HW)
    k = max(1, int(round(margin.shape[1] * top_share)))
    worst = margin.topk(k, dim=1).values.mean(1)  # (B,)
    zero = (delta == 0).to(worst.dtype)
    return (F.softplus(worst) * zero).sum() / logits.shape[0]


def dmmi_loss(out, target: torch.Tensor, word_mask: torch.Tensor, delta: torch.Tensor, cfg,
              *, compat: bool = False) -> LossTerms:
    """The training loss from a DMMIOutput: :func:`paper_loss`, plus ``cfg.w_empty`` * L_empty when
    that weight is set. cfg: LossConfig.

    Computed in fp32 whatever the caller's autocast state (the gradients flow back through the casts).
    """
    device_type = out.logits.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        logits = _float(out.logits)
        terms = paper_loss(logits, _float(out.words_final), _float(out.reconstructed), _float(out.pooled_visual),
                           _float(out.pooled_text), target, word_mask, delta, cfg, compat=compat)
        if not cfg.w_empty:
            return terms
        empty = empty_mask_loss(logits, delta)
        return LossTerms(total=terms.total + cfg.w_empty * empty, ce=terms.ce, sim=terms.sim, con=terms.con,
                         empty=empty)


def _float(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == torch.float32 else t.float()
