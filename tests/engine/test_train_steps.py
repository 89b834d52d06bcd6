"""One process: what a step is (global batch, accumulation, max_steps), learning-rate scaling, the
checks made before anything is written, and (on a GPU) a training step without a host sync."""

from __future__ import annotations

import json

import pytest
import torch

from dmmi.config import load_config
from dmmi.data.synthetic import generate
from dmmi.engine.train import BatchPlan, Trainer, train
from dmmi.errors import DmmiError
from test_ddp_training import NO_DROPOUT, freeze_batch_norm, max_output_diff


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, n_images=24, seed=4, image_size=64, refs_per_image=2)
    return root


def _cfg(synth, out, *extra):
    return [f"data.root={synth}", f"train.output_dir={out}", "data.val_split=null", "train.log_every=1", *extra]


@pytest.fixture
def frozen_bn(monkeypatch):
    monkeypatch.setattr(torch.nn.modules.batchnorm._BatchNorm, "train", torch.nn.modules.batchnorm._BatchNorm.train)
    freeze_batch_norm()


def test_grad_accum_equals_the_whole_batch(synth, tmp_path, frozen_bn):
    """batch 8 in 2 micro-steps of 4 == batch 8 at once, over 3 steps (the gradients of the two halves
    are averaged before the step; nothing is carried into the next step)."""
    common = ["train.batch_size=8", "train.max_steps=3", "loss.ce_weights=[1.0,1.0]", "model.contrastive=false",
              *NO_DROPOUT]
    lines = []
    whole = train(load_config("dmmi_tiny", _cfg(synth, tmp_path / "a", *common)), progress=False, log=lambda *a: None)
    accum = train(load_config("dmmi_tiny", _cfg(synth, tmp_path / "b", *common, "train.grad_accum=2")),
                  progress=False, log=lines.append)
    assert whole.steps == accum.steps == 3
    assert "global batch 8 = 4 per device x 1 device x accumulation 2; lr 0.0001" in lines
    config = _cfg(synth, tmp_path / "a", *common)
    assert max_output_diff(whole.model.state_dict(), accum.model.state_dict(), config) < 1e-5
    half = train(load_config("dmmi_tiny", _cfg(synth, tmp_path / "c", *common, "train.batch_size=4")),
                 progress=False, log=lambda *a: None)
    assert max_output_diff(whole.model.state_dict(), half.model.state_dict(), config) > 1e-3  # the check can fail


def test_an_epoch_not_divisible_by_the_accumulation_carries_nothing(synth, tmp_path):
    """Steps per epoch = items // global batch: every step has all its micro-batches, and the
    gradients are zeroed at each step (an epoch's leftover never reaches the next epoch)."""
    cfg = load_config("dmmi_tiny", _cfg(synth, tmp_path / "e", "train.batch_size=6", "train.grad_accum=3",
                                        "train.epochs=2", "train.log_every=100"))
    result = train(cfg, progress=False, log=lambda *a: None)
    from dmmi.engine.checkpoint import load_checkpoint

    state = load_checkpoint(result.last_path)
    trainer = Trainer(load_config("dmmi_tiny", _cfg(synth, tmp_path / "f", "train.batch_size=6",
                                                    "train.grad_accum=3")), _single(), progress=False,
                      log=lambda *a: None)
    assert trainer.steps_per_epoch == len(trainer.train_ds) // 6 and len(trainer.train_ds) % 6
    assert len(trainer.loader) == trainer.steps_per_epoch * 3  # whole steps only
    assert result.steps == 2 * trainer.steps_per_epoch
    assert state["extra"]["step_in_epoch"] == 0 and state["extra"]["epoch"] == 2


def _single():
    from dmmi.engine.distributed import init_distributed

    return init_distributed("cpu")


def test_max_steps_is_exact(synth, tmp_path):
    result = train(load_config("dmmi_tiny", _cfg(synth, tmp_path / "m", "train.max_steps=3", "train.log_every=10",
                                                 "train.batch_size=2")), progress=False, log=lambda *a: None)
    assert result.steps == 3  # not the next log step (10)
    opt = torch.load(result.last_path, weights_only=True)["optimizer"]
    assert {int(s["step"]) for s in opt["state"].values()} == {3}


def test_linear_learning_rate_scaling(synth, tmp_path):
    lines = []
    cfg = load_config("dmmi_tiny", _cfg(synth, tmp_path / "s", "train.batch_size=8", "train.lr_scaling=linear",
                                        "train.lr_batch=2", "train.max_steps=1", "train.text_lr=1e-5"))
    train(cfg, progress=False, log=lines.append)
    assert "global batch 8 = 8 per device x 1 device x accumulation 1; lr 0.0004 (linear scaling: 0.0001 x 8 / 2)" \
        in lines
    opt = torch.load(tmp_path / "s" / "last.pt", weights_only=True)["optimizer"]
    initial = {g["name"]: g["initial_lr"] for g in opt["param_groups"]}
    assert initial["decay"] == pytest.approx(4e-4) and initial["text_decay"] == pytest.approx(4e-5)


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=6", "train.grad_accum=4"],
     "train.batch_size=6 (the global batch) does not split into train.grad_accum=4 micro-steps: use a multiple of 4"),
    (["train.grad_accum=0"], "train.grad_accum must be >= 1, got 0"),
    (["train.lr_scaling=sqrt"], "train.lr_scaling must be 'none' or 'linear', got 'sqrt'"),
    (["train.max_steps=0"], "train.max_steps must be >= 1 (or null), got 0"),
])
def test_bad_batch_settings_are_one_line(overrides, message):
    with pytest.raises(DmmiError) as e:
        load_config("dmmi_tiny", overrides)
    assert str(e.value) == message


def test_a_global_batch_that_does_not_divide_by_the_devices(tmp_path):
    tc = load_config("dmmi_tiny", ["train.batch_size=6", "train.grad_accum=2"]).train
    assert BatchPlan.of(tc, 3).describe() == "global batch 6 = 1 per device x 3 devices x accumulation 2"
    with pytest.raises(DmmiError) as e:
        BatchPlan.of(tc, 4)
    assert str(e.value) == ("train.batch_size=6 (the global batch) does not divide into 4 device(s) x "
                            "train.grad_accum=2: use a multiple of 8")


def test_ccr_without_erasure_is_refused_before_writing(synth, tmp_path):
    out = tmp_path / "noerase"
    with pytest.raises(DmmiError, match="data.erase=false with model.i2t_decoder=true"):
        train(load_config("dmmi_tiny", _cfg(synth, out, "data.erase=false")), progress=False)
    assert not out.exists()
    ok = train(load_config("dmmi_tiny", _cfg(synth, out, "data.erase=false", "model.i2t_decoder=false",
                                             "model.contrastive=false", "train.max_steps=1")), progress=False,
               log=lambda *a: None)
    assert ok.steps == 1


def test_paper_presets_select_on_held_out_train_images():
    for preset in ("dmmi_swin_b", "dmmi_swin_t", "ablation_no_i2t", "lavt_baseline"):
        data = load_config(preset).data
        assert data.dataset == "ref-zom" and data.val_split is None and data.val_from_train == 0.05
    from dmmi.engine.train import selection_note

    assert selection_note(load_config("dmmi_swin_b")) == (
        "model selection on 5% of the train images, held out (data.val_from_train=0.05; Ref-ZOM has no val split)")
    assert selection_note(load_config("dmmi_tiny", ["data.val_split=null"])).startswith("no model selection")


def test_a_missing_validation_split_stops_before_training(tmp_path):
    """Ref-ZOM-like data (train / test only) with data.val_split=val: one line, no silent "last model"."""
    root = tmp_path / "synth"
    generate(root, n_images=8, seed=1, image_size=64, refs_per_image=2)
    import pickle

    refs_path = root / "synthetic" / "refs(final).p"
    refs = pickle.loads(refs_path.read_bytes())
    refs = [dict(r, split="train" if r["split"] == "val" else r["split"]) for r in refs]
    refs_path.write_bytes(pickle.dumps(refs))
    with pytest.raises(DmmiError, match="split 'val' not in .*its splits are train, test"):
        train(load_config("dmmi_tiny", [f"data.root={root}", f"train.output_dir={tmp_path / 'o'}"]), progress=False)


@pytest.mark.gpu
def test_training_steps_make_no_host_sync(synth, tmp_path):
    """Forward, fp32 loss, backward, clip, fused AdamW and the schedule, three times, under
    ``torch.cuda.set_sync_debug_mode("error")``: any host sync in the step raises."""
    from dmmi.engine.distributed import init_distributed

    cfg = load_config("dmmi_tiny", _cfg(synth, tmp_path / "g", "train.batch_size=4", "train.device=cuda",
                                        "train.clip_grad=1.0", "train.log_every=1000"))
    trainer = Trainer(cfg, init_distributed("cuda"), progress=False, log=lambda *a: None)
    trainer.ddp.train()
    trainer.sampler.set_epoch(0)
    trainer.train_ds.set_epoch(0)
    batches = iter(trainer.loader)
    group = [next(batches)]
    trainer.step(group, [True])  # warm-up: cuDNN autotuning and lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            assert trainer.step([next(batches)], [True])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert trainer.state.global_step == 4
    assert all(torch.isfinite(p).all() for p in trainer.core.parameters())


def test_the_ccr_branch_refuses_to_train_without_erased_ids():
    """It used to compare the sentence with itself (L_sim of T against T) without a word."""
    from dmmi.models import build_model

    model = build_model(load_config("dmmi_tiny").model).train()
    ids = torch.full((2, 20), 101)
    mask = torch.ones(2, 20, dtype=torch.long)
    with pytest.raises(DmmiError, match="the CCR branch .* no erased_ids were given"):
        model(torch.randn(2, 3, 64, 64), ids, mask)
    assert model.eval()(torch.randn(2, 3, 64, 64), ids, mask).logits.shape == (2, 2, 64, 64)  # inference needs none


def test_training_writes_a_model_directory(synth, tmp_path):
    from dmmi.hub import from_pretrained

    result = train(load_config("dmmi_tiny", _cfg(synth, tmp_path / "m", "train.max_steps=2", "train.batch_size=2",
                                                 "data.dataset=synthetic")), progress=False, log=lambda *a: None)
    model_dir = result.output_dir / "model"
    assert {p.name for p in model_dir.iterdir()} == {"config.json", "model.safetensors", "README.md", "text_encoder"}
    model, cfg = from_pretrained(model_dir)
    best = torch.load(result.best_path, weights_only=True)["model"]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())  # the selected model, exactly
    assert cfg.data.dataset == "synthetic" and "synthetic set of coloured shapes" in (model_dir / "README.md").read_text()
    assert json.loads((model_dir / "config.json").read_text())["extra"]["trained_on"] == "synthetic"
