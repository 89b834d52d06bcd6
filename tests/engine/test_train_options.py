"""train.grad_checkpoint (activation checkpointing of the visual stages) and train.compile (the
trainer's step is the fullgraph compiled forward + loss of dmmi/engine/compiled.py).

Checkpointing recomputes the same fp32 operations in backward: loss and gradients equal those
without it within 1e-5 (measured: identical on dmmi_tiny, 1 thread). Each checkpointed block
runs twice per step (forward, then again in backward): counted, so a switch that does nothing fails.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dmmi.config import load_config
from dmmi.data.synthetic import generate
from dmmi.engine import compiled
from dmmi.engine.compiled import loss_step
from dmmi.models import build_model
from dmmi.models.backbones import EfficientNetLiteBackbone, ResNetBackbone

NO_DROPOUT = ["model.text_config.hidden_dropout_prob=0.0", "model.text_config.attention_probs_dropout_prob=0.0"]


def _batch(b: int = 2, s: int = 64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 3000, (b, 20), generator=g)
    mask = torch.ones(b, 20, dtype=torch.long)
    mask[0, 9:] = 0
    erased = ids.clone()
    erased[:, 1] = 0
    target = torch.zeros(b, s, s, dtype=torch.long)
    target[:, 10:40, 20:50] = 1
    return torch.rand(b, 3, s, s, generator=g), ids, mask, erased, target, torch.tensor([1.0, 0.0])[:b]


def _count_calls(modules) -> list:
    """Calls of ``modules``, counted as they start (a checkpoint's recomputation may stop early, once
    it has what backward needs, before a forward hook would fire)."""
    calls = []
    for m in modules:
        m.register_forward_pre_hook(lambda mod, args: calls.append(1))
    return calls


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpoint_keeps_loss_and_gradients_swin():
    cfg = load_config("dmmi_tiny", NO_DROPOUT)
    torch.manual_seed(0)
    plain = build_model(cfg.model).train()
    ckpt = copy.deepcopy(plain)
    ckpt.visual.set_grad_checkpointing(True)
    assert all(layer.grad_checkpointing for layer in ckpt.visual.body.layers)  # timm's own switch
    blocks = [b for layer in ckpt.visual.body.layers for b in layer.blocks]
    calls = _count_calls(blocks)
    batch = _batch()
    results = []
    for model in (plain, ckpt):
        terms = loss_step(model, cfg.loss, "cpu", fast=False)(*batch)
        terms.total.backward()
        results.append((terms.as_dict(), _grads(model)))
    assert len(calls) == 2 * len(blocks)  # each block ran again in backward
    (t0, g0), (t1, g1) = results
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k], atol=1e-5, rtol=0, msg=k)
    assert set(g1) == set(g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-5, msg=n)
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(batch[0], batch[1], batch[2])
    assert len(calls) == len(blocks)  # inference runs each block once


@pytest.mark.parametrize("backbone", [EfficientNetLiteBackbone, ResNetBackbone], ids=["effnet_lite0", "r101"])
def test_grad_checkpoint_of_a_cnn_updates_batchnorm_statistics_once(backbone):
    """CNN stages are checkpointed block by block here (timm's switch covers only its own forward);
    the recomputation in backward must not fold the batch into BatchNorm's statistics twice."""
    torch.manual_seed(0)
    plain = backbone().train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    ckpt.freeze(1)
    plain.freeze(1)
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for model in (plain, ckpt):
        first_conv = next(m for m in model.stage_modules(1)[0].modules() if isinstance(m, torch.nn.Conv2d))
        calls = _count_calls([first_conv])
        feats = model(x)
        sum(f.square().mean() for f in feats).backward()
        outs.append((feats, _grads(model), model.state_dict(), len(calls)))
    (f0, g0, s0, n0), (f1, g1, s1, n1) = outs
    assert n1 == 2 * n0  # stage 2 (trainable) ran again in backward
    for a, b in zip(f0, f1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert set(g1) == set(g0) and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)
    for k in s0:  # running means / variances and batch counts as without checkpointing
        torch.testing.assert_close(s1[k], s0[k], atol=1e-6, rtol=1e-5, msg=k)
    assert not ckpt._checkpointed(0)  # the frozen stage saves nothing: not checkpointed


def test_frozen_swin_stages_are_not_checkpointed():
    cfg = load_config("dmmi_tiny", ["model.backbone_frozen_stages=2"])
    model = build_model(cfg.model)
    model.visual.set_grad_checkpointing(True)
    assert [layer.grad_checkpointing for layer in model.visual.body.layers] == [False, False, True, True]
    model.visual.set_grad_checkpointing(False)
    assert not any(layer.grad_checkpointing for layer in model.visual.body.layers)


def test_trainer_steps_through_the_compiled_step_and_checkpoints(tmp_path, monkeypatch):
    """train.compile=true: the trainer's forward + loss is the one fullgraph torch.compile step
    (compiling itself is tested in test_compile.py; here torch.compile is recorded, not run);
    train.grad_checkpoint=true: the backbone checkpoints."""
    from dmmi.engine.train import Trainer
    from dmmi.engine.distributed import init_distributed

    generate(tmp_path / "synth", n_images=8, seed=1, image_size=64, refs_per_image=1)
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append((fn, kwargs))
        return fn

    monkeypatch.setattr(compiled.torch, "compile", fake_compile)
    cfg = load_config("dmmi_tiny", [f"data.root={tmp_path / 'synth'}", f"train.output_dir={tmp_path / 'run'}",
                                    "data.val_split=null", "train.batch_size=2", "train.compile=true",
                                    "train.grad_checkpoint=true"])
    trainer = Trainer(cfg, init_distributed("cpu"), progress=False, log=lambda *a: None)
    assert len(seen) == 1 and seen[0][1] == {"fullgraph": True, "dynamic": False}
    assert seen[0][0].__name__ == "step" and trainer.loss_step is seen[0][0]  # forward + loss, not the bare model
    assert trainer.core.visual.grad_checkpointing
    trainer.ddp.train()
    trainer.sampler.set_epoch(0)
    trainer.train_ds.set_epoch(0)
    assert trainer.step([next(iter(trainer.loader))], [True])
    assert torch.isfinite(trainer.running["loss"]) and trainer.state.global_step == 1
