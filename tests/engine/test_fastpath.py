"""Fast mode computes what reference mode computes (dmmi/engine/fastpath.py).

Tolerances (tiny preset, CPU):
* fp32 channels_last vs reference: logits, losses and gradients within 1e-5 (same math,
  another memory layout).
* bf16 autocast (exercised on CPU with ``cpu_bf16=True``) vs fp32 reference, on a tiny model
  briefly fitted to a toy task (a random model's logits sit within bf16's rounding of zero,
  so its masks say nothing): >= 99% of mask pixels agree, max logit error <= 5% of the
  largest logit (measured 2%), loss terms within 5% (measured <= 0.5%).
* bf16 gradients are compared loosely. The deep encoder stages of this 64x64 model are
  ill-conditioned in bf16 (1x1 conv -> InstanceNorm over the 2x2 and 4x4 maps of stages 4
  and 3 cancels most bf16 digits; those weight gradients differ by O(1) relative). We
  require finite fp32 gradients everywhere, relative error <= 0.5 for the parts near the
  loss (decoder, CCR, contrastive head, text encoder; measured 0.06-0.16 with 1 thread, up
  to 0.33 with 2) and an overall cosine >= 0.5 (measured 0.96 with 1 thread, 0.67 with 2).
Speed is never asserted here (see benchmarks/).
"""

import copy

import pytest
import torch

from dmmi.config import load_config
from dmmi.engine import fastpath
from dmmi.engine.fastpath import autocast, autocast_dtype, describe, fused_adamw_ok, prepare_images, prepare_model
from dmmi.engine.optim import build_optimizer
from dmmi.losses import dmmi_loss
from dmmi.models import build_model

pytestmark = [pytest.mark.filterwarnings("ignore:.*random init.*"),
              pytest.mark.filterwarnings("ignore:no pretrained weights.*")]

NO_DROPOUT = ["model.text_config.hidden_dropout_prob=0.0", "model.text_config.attention_probs_dropout_prob=0.0"]
B, S = 4, 64


def _batch(seed: int = 0):
    """A bright square per image; the target is the square."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, 3, S, S, generator=g) * 0.2
    target = torch.zeros(B, S, S, dtype=torch.long)
    for b in range(B):
        i, j = torch.randint(0, S - 20, (2,), generator=g).tolist()
        images[b, :, i:i + 20, j:j + 20] += 0.7
        target[b, i:i + 20, j:j + 20] = 1
    ids = torch.randint(1000, 3000, (B, 20), generator=g)
    mask = torch.ones(B, 20, dtype=torch.long)
    mask[0, 7:] = 0
    mask[1, 12:] = 0
    erased = ids.clone()
    erased[:, 2] = 0
    delta = torch.tensor([1.0, 1.0, 0.0, 1.0])
    return dict(images=images, ids=ids, mask=mask, erased=erased, target=target, delta=delta)


@pytest.fixture(scope="module")
def cfg():
    return load_config("dmmi_tiny", NO_DROPOUT)


@pytest.fixture(scope="module")
def fitted(cfg):
    """The tiny model after 25 AdamW steps on the toy task (decisive logits)."""
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    batch = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(25):
        out = model(batch["images"], batch["ids"], batch["mask"], batch["erased"])
        loss = dmmi_loss(out, batch["target"], batch["mask"], batch["delta"], cfg.loss).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def _train_step(model, batch, cfg, *, fast: bool, cpu_bf16: bool = False):
    """Forward (erased sentence) + loss under the mode's autocast + backward -> (terms, grads)."""
    model.train()
    model.zero_grad(set_to_none=True)
    images = prepare_images(batch["images"], "cpu", fast)
    with autocast("cpu", fast, cpu_bf16=cpu_bf16):
        out = model(images, batch["ids"], batch["mask"], batch["erased"])
        terms = dmmi_loss(out, batch["target"], batch["mask"], batch["delta"], cfg.loss)
    terms.total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().float() for k, v in terms.as_dict().items()}, grads


def _eval_logits(model, batch, *, fast: bool, cpu_bf16: bool = False):
    model.eval()
    with torch.no_grad(), autocast("cpu", fast, cpu_bf16=cpu_bf16):
        out = model(prepare_images(batch["images"], "cpu", fast), batch["ids"], batch["mask"])
    return out.logits.float()


# ------------------------------------------------------------------------------ the switch
def test_autocast_is_a_no_op_in_reference_mode_and_on_cpu_by_default():
    for device, fast in (("cpu", False), ("cpu", True), (torch.device("cuda"), False)):
        with autocast(device, fast):
            assert not torch.is_autocast_enabled("cpu")
            assert not torch.is_autocast_enabled("cuda")
        assert autocast_dtype(device, fast) is None
    assert autocast_dtype("cuda", True) is torch.bfloat16
    assert autocast_dtype("cpu", False, cpu_bf16=True) is None  # reference mode never autocasts


def test_cpu_bf16_autocast_only_when_asked():
    with autocast("cpu", True, cpu_bf16=True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_prepare_model_keeps_names_and_values(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = prepare_model(model, "cpu", fast=True)
    assert fast is model
    after = fast.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert all(p.is_contiguous() for p in fast.parameters() if p.dim() != 4)


def test_reference_mode_leaves_the_layout_alone(cfg):
    model = prepare_model(build_model(cfg.model), torch.device("cpu"), fast=False)
    assert all(p.is_contiguous() for p in model.parameters())
    images = torch.rand(2, 3, S, S)
    assert prepare_images(images, "cpu", False).is_contiguous()
    assert prepare_images(images, "cpu", True).is_contiguous(memory_format=torch.channels_last)


def test_compile_is_in_place_and_keeps_state_dict_keys():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    keys = list(model.state_dict())
    out = prepare_model(model, "cpu", fast=True, compile=True)  # compiled lazily, at first call
    assert out is model and list(out.state_dict()) == keys
    assert model._compiled_call_impl is not None
    other = prepare_model(torch.nn.Linear(2, 2), "cpu", fast=True, compile="reduce-overhead")
    assert other._compiled_call_impl is not None and list(other.state_dict()) == ["weight", "bias"]


def test_fused_adamw_on_one_device_kind_and_supported_dtypes(cfg):
    model = build_model(cfg.model)
    assert fused_adamw_ok(model)  # all fp32 on CPU
    opt = build_optimizer(model, cfg.train, fused=fused_adamw_ok(model))
    assert all(g.get("fused") for g in opt.param_groups)
    assert not fused_adamw_ok(torch.nn.Module())  # nothing to optimise
    assert not fused_adamw_ok(torch.nn.Linear(2, 2).double())  # float64 has no fused kernel
    meta = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    assert not fused_adamw_ok(meta)  # mixed devices
    fallback = build_optimizer(model, cfg.train, fused=False)
    assert not fallback.defaults.get("fused") and fallback.defaults.get("foreach")


def test_fused_cpu_adamw_steps_like_the_multi_tensor_one(cfg):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 1))
    b, start = copy.deepcopy(a), copy.deepcopy(a)
    opt_a = build_optimizer(a, cfg.train, fused=True)
    opt_b = build_optimizer(b, cfg.train, fused=False)
    assert opt_a.defaults.get("fused") and not opt_b.defaults.get("fused")
    x = torch.randn(8, 6)
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a[0].weight, start[0].weight)  # the steps moved the weights


def test_describe_names_what_the_mode_does():
    assert describe("cpu", False) == dict(mode="reference", autocast=None, channels_last=False, tf32_matmul=False,
                                          cudnn_benchmark=False, fused_adamw=False, compile=False)
    d = describe("cuda", True, compile=True)
    assert d["autocast"] == "bfloat16" and d["channels_last"] and d["fused_adamw"] and d["compile"]
    assert describe("cpu", True, cpu_bf16=True)["autocast"] == "bfloat16"
    assert describe("cuda", True, compile="reduce-overhead")["compile"] == "reduce-overhead"


# ------------------------------------------------------------------------------ numerics
def test_fp32_channels_last_matches_reference(fitted, cfg):
    batch = _batch(1)
    ref = copy.deepcopy(fitted)
    fast = prepare_model(copy.deepcopy(fitted), "cpu", fast=True)
    ref_logits, fast_logits = _eval_logits(ref, batch, fast=False), _eval_logits(fast, batch, fast=True)
    torch.testing.assert_close(fast_logits, ref_logits, atol=1e-5, rtol=0)
    ref_terms, ref_grads = _train_step(ref, batch, cfg, fast=False)
    fast_terms, fast_grads = _train_step(fast, batch, cfg, fast=True)
    assert set(ref_terms) == {"loss", "loss_ce", "loss_sim", "loss_con"}
    for k in ref_terms:
        torch.testing.assert_close(fast_terms[k], ref_terms[k], atol=1e-5, rtol=0)
    assert set(fast_grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_autocast_matches_reference_within_tolerance(fitted, cfg):
    batch = _batch(1)
    ref = copy.deepcopy(fitted)
    fast = prepare_model(copy.deepcopy(fitted), "cpu", fast=True)
    ref_logits = _eval_logits(ref, batch, fast=False)
    bf16_logits = _eval_logits(fast, batch, fast=True, cpu_bf16=True)
    scale = ref_logits.abs().max()
    assert scale > 1.0  # the fitted model is decisive: the comparison means something
    assert (bf16_logits - ref_logits).abs().max() <= 0.05 * scale
    agreement = (bf16_logits.argmax(1) == ref_logits.argmax(1)).float().mean()
    assert agreement >= 0.99

    ref_terms, ref_grads = _train_step(ref, batch, cfg, fast=False)
    bf16_terms, bf16_grads = _train_step(fast, batch, cfg, fast=True, cpu_bf16=True)
    for k in ref_terms:
        # L_con divides cosine similarities by a temperature of 0.05: 20x the bf16 rounding
        rtol = 0.1 if k == "loss_con" else 0.05
        torch.testing.assert_close(bf16_terms[k], ref_terms[k], rtol=rtol, atol=1e-3, msg=k)
    assert set(bf16_grads) == set(ref_grads)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in bf16_grads.values())  # fp32 params

    def flat(grads, prefix=""):
        return torch.cat([grads[n].flatten() for n in ref_grads if n.startswith(prefix)])

    for part in ("decoder", "ccr", "contrastive", "text_encoder"):
        a, b = flat(ref_grads, part), flat(bf16_grads, part)
        assert (a - b).norm() <= 0.5 * a.norm(), part
    assert torch.nn.functional.cosine_similarity(flat(ref_grads), flat(bf16_grads), dim=0) >= 0.5


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
def test_cuda_fast_mode_matches_reference(fitted, cfg):
    device = torch.device("cuda")
    batch = {k: v.to(device) for k, v in _batch(1).items()}
    ref = prepare_model(copy.deepcopy(fitted), device, fast=False)
    model = copy.deepcopy(fitted)
    fast = prepare_model(model, device, fast=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    with torch.no_grad():
        ref.eval()
        fast.eval()
        prepare_model(ref, device, fast=False)  # flags back to PyTorch's defaults for the reference
        ref_logits = ref(batch["images"], batch["ids"], batch["mask"]).logits.float()
        prepare_model(fast, device, fast=True)
        seen = []  # the class maps before the upsampling (CUDA autocast upsamples in fp32)
        hook = fast.decoder.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        with autocast(device, True):
            out = fast(prepare_images(batch["images"], device, True), batch["ids"], batch["mask"])
        hook.remove()
        assert seen == [torch.bfloat16]
        fast_logits = out.logits.float()
    assert (fast_logits - ref_logits).abs().max() <= 0.05 * ref_logits.abs().max()
    assert (fast_logits.argmax(1) == ref_logits.argmax(1)).float().mean() >= 0.99
    prepare_model(ref, device, fast=False)


@pytest.mark.gpu
def test_cuda_fused_adamw_step(cfg):
    device = torch.device("cuda")
    model = prepare_model(build_model(cfg.model), device, fast=True)
    assert fused_adamw_ok(model)
    opt = build_optimizer(model, cfg.train, fused=fused_adamw_ok(model))
    assert all(g.get("fused") for g in opt.param_groups)
    batch = {k: v.to(device) for k, v in _batch().items()}
    model.train()
    with autocast(device, True):
        out = model(batch["images"], batch["ids"], batch["mask"], batch["erased"])
        loss = dmmi_loss(out, batch["target"], batch["mask"], batch["delta"], cfg.loss).total
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    prepare_model(model, device, fast=False)  # leave the process-wide flags at PyTorch's defaults
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark


def test_backend_flags_only_touch_cuda():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    fastpath.configure_backends(torch.device("cpu"), True)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == before
