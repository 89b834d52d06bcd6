"""The DMMI network: shapes, gradients, inference cost, switches, errors."""

import pytest
import torch

from dmmi.config import load_config
from dmmi.errors import DmmiError
from dmmi.losses import dmmi_loss
from dmmi.models import PRESETS, build_model, build_preset
from dmmi.models.io import load_model_file, save_model_file

TINY = "dmmi_tiny"


def _batch(b=2, size=64, length=20):
    torch.manual_seed(0)
    images = torch.randn(b, 3, size, size)
    ids = torch.randint(1000, 3000, (b, length))
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    erased = ids.clone()
    erased[0, 2:4] = 0
    target = torch.zeros(b, size, size, dtype=torch.long)
    target[0, 10:30, 20:40] = 1
    return images, ids, mask, erased, target, torch.tensor([1, 0])


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != TINY])
def test_every_preset_forward_shapes(preset):
    """Every preset at 64x64 with a narrow random text width: logits and skips."""
    cfg = load_config(preset, ["model.image_size=64", "model.backbone_weights=null"])
    model = build_model(cfg.model, text_width=32).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.forward_features(images, torch.randn(2, 20, 32), torch.ones(2, 20))
    assert out.logits.shape == (2, 2, 64, 64)
    assert out.words_final.shape == (2, 20, 32)
    assert [s.shape[-1] for s in out.skips] == [16, 8, 4, 2]
    assert [s.shape[1] for s in out.skips] == list(model.visual.widths)
    assert torch.isfinite(out.logits).all()


def test_tiny_model_trains_every_parameter():
    model = build_preset(TINY).train()
    images, ids, mask, erased, target, delta = _batch()
    out = model(images, ids, mask, erased)
    assert out.logits.shape == (2, 2, 64, 64)
    assert out.reconstructed.shape == (2, 20, 32) and out.pooled_visual.shape == (2, 32)
    loss = dmmi_loss(out, target, mask, delta, load_config(TINY).loss)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert nonfinite == []


@pytest.mark.parametrize("preset", ["ablation_no_i2t", "ablation_no_multiscale", "ablation_no_bidirection",
                                    "ablation_no_con", "lavt_baseline"])
def test_ablations_have_no_dead_parameters(preset):
    base = load_config(TINY).model.__dict__
    cfg = load_config(preset).model
    overrides = [f"model.{k}={v}" for k, v in load_config(preset).model.__dict__.items()
                 if k in ("multi_scale", "bidirectional", "i2t_decoder", "contrastive", "decoder_transformer")]
    model = build_preset(TINY, overrides).train()
    images, ids, mask, erased, target, delta = _batch()
    out = model(images, ids, mask, erased)
    dmmi_loss(out, target, mask, delta, load_config(TINY).loss).total.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert (model.ccr is None) == (not cfg.i2t_decoder)
    assert (model.contrastive is None) == (not cfg.contrastive)
    assert base["backbone"] == "swin"


def test_eval_runs_no_training_branch():
    model = build_preset(TINY).eval()
    calls = []
    model.ccr.register_forward_hook(lambda *a: calls.append("ccr"))
    model.contrastive.register_forward_hook(lambda *a: calls.append("con"))
    encoder_calls = []
    model.text_encoder.register_forward_hook(lambda mod, args, out: encoder_calls.append(args[0].shape[0]))
    images, ids, mask, erased, _, _ = _batch()
    B = ids.shape[0]
    with torch.no_grad():
        out = model(images, ids, mask, erased)
    assert calls == [] and out.reconstructed is None and out.pooled_text is None
    assert encoder_calls == [B]  # the erased sentence is not encoded at inference
    model.train()
    model(images, ids, mask, erased)
    assert calls == ["ccr", "con"] and encoder_calls == [B, 2 * B]  # T and T' in one call


def test_training_encodes_the_erased_sentence_for_ccr():
    """The CCR branch reads T' (not T): its reconstruction changes with the erased ids only."""
    model = build_preset(TINY).train()
    model.text_encoder.eval()  # no dropout: the difference below comes from the ids alone
    images, ids, mask, erased, _, _ = _batch()
    assert not torch.equal(ids, erased)
    torch.manual_seed(0)
    with torch.no_grad():
        a = model(images, ids, mask, erased)
        b = model(images, ids, mask, ids)
    torch.testing.assert_close(a.words_final, b.words_final)
    assert not torch.allclose(a.reconstructed, b.reconstructed)


def test_fresh_model_backbone_equals_plain_timm_backbone():
    model = build_preset(TINY).eval()
    images, ids, mask, _, _, _ = _batch()
    with torch.no_grad():
        plain = model.visual(images)  # the timm stages without fusion
        words = model.text_encoder(ids, mask)
        x = model.visual.stem(images)
        w = words.transpose(1, 2)
        for i, fusion in enumerate(model.fusions):
            x = model.visual.stage(i, x)
            v, w, _ = fusion(model.visual.to_nchw(x), w, mask)
            torch.testing.assert_close(v, plain[i])  # zero gates: V* = V
            x = model.visual.from_nchw(v)


def test_swin_b_parameter_count_matches_the_authors():
    model = build_model(load_config("dmmi_swin_b", ["model.image_size=64"]).model, text_width=768)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 208e6) / 208e6 < 0.05
    # exactly the authors' 231.7 M minus the unused decoder-layer copies and the unread last gate
    assert n == 231_686_512 - 23_633_664 - 2 * 1024 * 1024


def test_bad_input_errors():
    with pytest.raises(DmmiError, match="unknown preset 'dmmi_nope'"):
        build_preset("dmmi_nope")
    model = build_preset(TINY).eval()
    images, ids, mask, _, _, _ = _batch()
    with pytest.raises(DmmiError, match=r"images must be \(B, 3, H, W\)"):
        model(images[:, :1], ids, mask)
    with pytest.raises(DmmiError, match="multiples of 32"):
        model(torch.randn(2, 3, 60, 64), ids, mask)
    empty = mask.clone()
    empty[0] = 0
    with pytest.raises(DmmiError, match="empty"):
        model(images, ids, empty)


def test_model_file_round_trip_and_wrong_preset(tmp_path):
    cfg = load_config(TINY)
    model = build_model(cfg.model).eval()
    for name in ("m.pt", "m.safetensors"):
        path = save_model_file(tmp_path / name, model, cfg)
        loaded, loaded_cfg = load_model_file(path)
        assert loaded_cfg.preset == TINY
        images, ids, mask, _, _, _ = _batch()
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(images, ids, mask).logits, model(images, ids, mask).logits)
    with pytest.raises(DmmiError, match="preset 'dmmi_tiny', but 'dmmi_lite'"):
        load_model_file(tmp_path / "m.pt", expect_preset="dmmi_lite")
    # a weights file that does not fit the preset
    other = build_preset(TINY, ["model.embed_dim=16"])
    state_path = save_model_file(tmp_path / "other.pt", other, cfg)  # config says embed 32, weights are 16
    with pytest.raises(DmmiError, match="weights do not fit the model"):
        load_model_file(state_path)
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:1000])
    with pytest.raises(DmmiError, match="truncated"):
        load_model_file(tmp_path / "trunc.pt")


def test_efficientnet_runs_in_fp32_under_cpu_bf16_autocast():
    """oneDNN's bf16 depthwise convolutions are slower than fp32 on CPU: the EfficientNet keeps
    fp32 there, the layers after it still run in bf16, and the values match plain fp32."""
    from dmmi.models.backbones import EfficientNetLiteBackbone

    torch.manual_seed(0)
    net = EfficientNetLiteBackbone().eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = net(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net(images)
            after = torch.nn.functional.linear(mixed[-1].flatten(1)[:, :8], torch.randn(3, 8))
    assert [t.dtype for t in mixed] == [torch.float32] * 4
    assert after.dtype == torch.bfloat16  # autocast is back on outside the backbone
    for a, b in zip(mixed, plain):
        torch.testing.assert_close(a, b)


def test_frozen_backbone_stages_get_no_gradient_and_keep_their_statistics():
    from dmmi.models.backbones import EfficientNetLiteBackbone, ResNetBackbone

    net = EfficientNetLiteBackbone()
    net.freeze(1)
    net.train()
    frozen = net.stem_modules() + net.stage_modules(0)
    assert all(not m.training for m in frozen) and net.stage_modules(1)[0].training
    bn = net.body.blocks[0][0].bn1
    before = bn.running_mean.clone()
    outs = net(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in outs).backward()
    assert torch.equal(bn.running_mean, before)  # eval-mode BN in the frozen stage
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in net.body.blocks[2].parameters())
    assert not net.body.blocks[3][0].bn1.running_mean.equal(torch.zeros_like(net.body.blocks[3][0].bn1.running_mean))
    r = ResNetBackbone("resnet26")
    r.freeze(2)
    assert not any(p.requires_grad for p in r.body.layer2.parameters()) and all(
        p.requires_grad for p in r.body.layer3.parameters())
    with pytest.raises(DmmiError, match="backbone_frozen_stages"):
        load_config(TINY, ["model.backbone_frozen_stages=5"])


def test_frozen_stages_through_the_config_reach_the_model():
    model = build_preset(TINY, ["model.backbone_frozen_stages=2"])
    trainable = {n.split(".")[1] for n, p in model.visual.named_parameters() if p.requires_grad}
    assert model.visual.frozen_stages == 2 and "patch_embed" not in trainable
    assert not any(p.requires_grad for p in model.visual.body.layers[1].parameters())
    assert all(p.requires_grad for p in model.visual.body.layers[2].parameters())


# ------------------------------------------------------------------ decoder position codes
def test_sine_position_codes_separate_rows_and_columns():
    from dmmi.models.extras import sine_position_codes

    codes = sine_position_codes(3, 5, 16).reshape(3, 5, 16)  # (h, w, dim)
    assert codes.abs().max() <= 1.0
    # the first half depends on the row only, the second on the column only
    assert torch.equal(codes[0, :, :8], codes[0, :1, :8].expand(5, 8))
    assert torch.equal(codes[:, 0, 8:], codes[:1, 0, 8:].expand(3, 8))
    flat = codes.reshape(15, 16)
    assert torch.cdist(flat, flat).add(torch.eye(15) * 10).min() > 0.1  # every position its own code
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_codes(2, 2, 6)
    assert sine_position_codes(3, 5, 16) is sine_position_codes(3, 5, 16)  # built once per size


@pytest.mark.parametrize("pos_embed", [False, True])
def test_word_query_layer_sees_position_only_with_codes(pos_embed):
    """Without position codes psi is blind to where a token is (a mirrored image gives the mirrored
    output); with them it is not, which is what "leftmost" needs."""
    from dmmi.models.decoders import WordQueryLayer
    from dmmi.models.extras import SinePositionCodes

    torch.manual_seed(0)
    layer = WordQueryLayer(16, 2, 32, 0.0, token_hook=SinePositionCodes(16) if pos_embed else None).eval()
    x, words = torch.randn(1, 16, 4, 6), torch.randn(1, 3, 16)
    with torch.no_grad():
        out, out_mirrored = layer(x, words, None), layer(x.flip(-1), words, None)
    assert torch.allclose(out.flip(-1), out_mirrored, atol=1e-5) is (not pos_embed)


def test_decoder_pos_embed_is_off_in_the_paper_presets_and_on_in_the_demo():
    assert not any(load_config(p).model.decoder_pos_embed for p in ("dmmi_swin_b", "dmmi_r101", "dmmi_lite"))
    assert load_config("demo_lite").model.decoder_pos_embed
    from dmmi.models.extras import SinePositionCodes

    model = build_preset("dmmi_tiny", ["model.decoder_pos_embed=true"])
    assert isinstance(model.decoder.query_16.token_hook, SinePositionCodes)
    assert isinstance(model.decoder.query_8.token_hook, SinePositionCodes)
    assert build_preset("dmmi_tiny").decoder.query_16.token_hook is None  # the paper's psi
    with pytest.raises(DmmiError, match="decoder_pos_embed needs a decoder width divisible by 4, got 30"):
        build_preset("dmmi_tiny", ["model.decoder_pos_embed=true", "model.decoder_dim=30", "model.decoder_heads=2"])


def test_decoders_use_the_math_attention_kernel_for_short_sequences_on_cpu():
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dmmi.models.decoders import CPU_MATH_ATTENTION_MAX, WordQueryLayer, attention_kernel

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not isinstance(attention_kernel(cpu, 144 * 144), contextlib.nullcontext)
    assert isinstance(attention_kernel(cpu, CPU_MATH_ATTENTION_MAX + 1), contextlib.nullcontext)
    assert isinstance(attention_kernel(cuda, 144 * 144), contextlib.nullcontext)  # PyTorch chooses there
    # same function either way: psi on a 6x6 map through the math kernel vs the flash kernel
    torch.manual_seed(0)
    layer = WordQueryLayer(32, 4, 64, 0.0).eval()
    x, words = torch.randn(2, 32, 6, 6), torch.randn(2, 5, 32)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        chosen = layer(x, words, pad)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            tokens = x.flatten(2).transpose(1, 2)
            flash = layer.layer(tokens, words, memory_key_padding_mask=pad).transpose(1, 2).reshape(2, 32, 6, 6)
    assert torch.allclose(chosen, flash, atol=1e-5)



def test_location_prior_starts_neutral_and_tilts_the_foreground_by_the_sentence():
    """Zero-initialised it changes nothing; with slopes it adds g_x * x + g_y * y (x, y centred in
    [-1, 1]) to the foreground logit only, g from the masked mean of the words (padding ignored)."""
    from dmmi.models.extras import LocationPrior

    torch.manual_seed(0)
    prior = LocationPrior(8, gain=1.0)
    logits, words = torch.randn(2, 2, 3, 4), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(prior(logits, words, mask), logits)
    with torch.no_grad():
        prior.slopes.weight[0, 0] = 1.0  # g_x = mean of channel 0 over the valid words
        prior.slopes.bias[1] = -2.0  # g_y = -2 for every sentence
    out = prior(logits, words, mask)
    assert torch.equal(out[:, 0], logits[:, 0])  # background untouched
    g_x = torch.stack([words[0, :3, 0].mean(), words[1, :, 0].mean()])  # (2,)
    xs = (torch.arange(4) + 0.5) / 4 * 2 - 1
    ys = (torch.arange(3) + 0.5) / 3 * 2 - 1
    expected = logits[:, 1] + g_x[:, None, None] * xs[None, None, :] - 2.0 * ys[None, :, None]
    assert torch.allclose(out[:, 1], expected, atol=1e-6)
    words_padding_changed = words.clone()
    words_padding_changed[0, 3:] = 100.0
    assert torch.allclose(prior(logits, words_padding_changed, mask), out)


def test_candidate_box_centres_are_constant_over_each_connected_region():
    from dmmi.models.extras import candidate_box_centres

    h, w = 9, 12
    xs, ys = torch.linspace(-1, 1, w), torch.linspace(-1, 1, h)
    cand = torch.zeros(2, h, w, dtype=torch.bool)
    cand[0, 1:4, 1] = True  # an L: column 1 rows 1-3 ...
    cand[0, 3, 1:6] = True  # ... and row 3 columns 1-5: box x 1-5, y 1-3
    cand[0, 5, 6] = True  # touches nothing of the L (4 rows / 1 column away)
    cand[0, 6:9, 7:9] = True  # diagonal neighbour of (5, 6): the same 8-connected region
    cx, cy = candidate_box_centres(cand, xs, ys)
    assert torch.allclose(cx[0][cand[0] & (torch.arange(h)[:, None] <= 3)], (xs[1] + xs[5]) / 2)
    assert torch.allclose(cy[0][cand[0] & (torch.arange(h)[:, None] <= 3)], (ys[1] + ys[3]) / 2)
    assert torch.allclose(cx[0][5:, :][cand[0][5:, :]], (xs[6] + xs[8]) / 2)
    assert torch.allclose(cy[0][5:, :][cand[0][5:, :]], (ys[5] + ys[8]) / 2)
    assert torch.equal(cx[0][~cand[0]], xs.expand(h, w)[~cand[0]])  # elsewhere: the pixel itself
    assert torch.equal(cx[1], xs.expand(h, w)) and torch.equal(cy[1], ys[:, None].expand(h, w))


def test_object_location_prior_raises_the_extreme_candidate_wherever_the_candidates_lie():
    """mode object: each candidate region moves by g . (its box centre - the candidates' mean), the
    mean weighted by probability; the same shifts when the pair sits in the left or the right half
    (a pixel tilt would lower both in the wrong half); background and candidate-free samples stay."""
    from dmmi.models.extras import LocationPrior

    h, w = 12, 24

    def scene(dx: int) -> torch.Tensor:
        logits = torch.full((2, 2, h, w), -3.0)
        logits[:, 0] = 0.0
        logits[0, 1, 2:5, 1 + dx:4 + dx] = 2.0  # A: 3 x 3, left of B
        logits[0, 1, 6:10, 7 + dx:11 + dx] = 2.0  # B: 4 x 4
        return logits  # sample 1: no candidate

    words, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    prior = LocationPrior(4, gain=1.0, mode="object")
    logits = scene(0)
    neutral = prior(logits, words, mask)
    assert torch.equal(neutral, logits)
    neutral[0, 1, 6:10, 7:11].sum().backward()  # lowering B (right of A) asks for a leftward slope
    assert prior.slopes.bias.grad[0] > 0 and prior.slopes.bias.grad[1] > 0  # B is also lower than A
    with torch.no_grad():
        prior.slopes.bias.copy_(torch.tensor([-5.0, 0.0]))  # "leftmost" for every sentence
    xs = (torch.arange(w) + 0.5) / w * 2 - 1
    a_x, b_x = (xs[1] + xs[3]) / 2, (xs[7] + xs[10]) / 2  # box centres
    mean_x = (9 * a_x + 16 * b_x) / 25  # equal probabilities: weighted by area
    for dx in (0, 12):  # the pair in the left half, then in the right half
        logits = scene(dx)
        gain = prior(logits, words, mask)[0, 1] - logits[0, 1]  # (h, w)
        assert torch.allclose(gain[2:5, 1 + dx:4 + dx], (-5.0 * (a_x - mean_x)).expand(3, 3), atol=1e-5)
        assert torch.allclose(gain[6:10, 7 + dx:11 + dx], (-5.0 * (b_x - mean_x)).expand(4, 4), atol=1e-5)
        assert gain[2, 1 + dx] > 1.5 and gain[6, 7 + dx] < -0.9  # A up, B down, in either half
        assert torch.equal(gain[logits[0, 1] < 0], torch.zeros(int((logits[0, 1] < 0).sum())))  # background alone
        assert torch.equal(prior(logits, words, mask)[1], logits[1])
    with pytest.raises(DmmiError, match="location_prior_mode"):
        load_config("demo_lite", ["model.location_prior_mode=nearest"])
    with pytest.raises(DmmiError, match="location_prior_gain"):
        load_config("demo_lite", ["model.location_prior_gain=0"])


def test_location_prior_is_off_in_the_paper_presets_and_reaches_the_logits_when_on():
    assert not any(load_config(p).model.location_prior for p in ("dmmi_swin_b", "dmmi_r101", "dmmi_lite"))
    assert not any(load_config(p).loss.w_empty for p in ("dmmi_swin_b", "dmmi_r101", "dmmi_lite"))
    assert load_config("demo_lite").model.location_prior and load_config("demo_lite").loss.w_empty > 0
    assert load_config("demo_lite").model.location_prior_mode == "object"
    assert load_config("dmmi_lite").model.location_prior_mode == "pixel"  # the default, as older checkpoints
    from dmmi.models.extras import LocationPrior

    plain = build_preset(TINY)
    assert plain.logit_hooks == () and not any(isinstance(m, LocationPrior) for m in plain.modules())
    model = build_preset(TINY, ["model.location_prior=true"]).eval()
    assert model.logit_hooks == ("location_prior",) and isinstance(model.location_prior, LocationPrior)
    assert not any(k.startswith("location_prior") for k in build_preset(TINY).state_dict())  # parity keys unchanged
    images, ids, mask, *_ = _batch()
    with torch.no_grad():
        before = model(images, ids, mask).logits
        model.location_prior.slopes.bias.copy_(torch.tensor([4.0, 0.0]) / model.location_prior.gain)  # all lean right
        after = model(images, ids, mask).logits
    gain = (after[:, 1] - after[:, 0]) - (before[:, 1] - before[:, 0])  # (B, H, W)
    assert (gain[:, :, -1] > 3.0).all() and (gain[:, :, 0] < -3.0).all()
    assert torch.allclose(gain[:, 5], gain[:, 40], atol=1e-4)  # a tilt along x only


def test_the_paper_modules_carry_no_extras_and_read_no_config():
    """What is not in the paper lives in dmmi.models.extras and is injected by build_model: the
    modules of Fig. 2 import neither it nor the configuration."""
    import ast
    from pathlib import Path

    import dmmi.models

    root = Path(dmmi.models.__file__).parent
    for name in ("decoders.py", "mba.py", "dmmi.py", "text_encoder.py", "backbones.py"):
        tree = ast.parse((root / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & {"dmmi.config", "dmmi.models.extras"}, (name, imported)
    source = "".join((root / n).read_text() for n in ("decoders.py", "mba.py", "dmmi.py", "text_encoder.py"))
    for extra in ("LocationPrior", "location_prior", "sine_position_codes", "pos_embed", "cache_size", "OrderedDict"):
        assert extra not in source, extra


def test_a_logit_hook_may_not_replace_a_part_of_the_network():
    from torch import nn

    from dmmi.models import DMMI

    m = build_preset(TINY)
    parts = dict(text_encoder=None, visual=m.visual, fusions=m.fusions, decoder=m.decoder)
    with pytest.raises(DmmiError, match="logit hook 'decoder' would replace"):
        DMMI(**parts, logit_hooks={"decoder": nn.Identity()})
    assert DMMI(**parts, logit_hooks={"tilt": nn.Identity()}).logit_hooks == ("tilt",)
