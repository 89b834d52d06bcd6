"""torch.compile(fullgraph=True) of the training step and of inference, and CUDA-graph inference
(dmmi/engine/compiled.py).

Backend: ``aot_eager`` unless ``DMMI_COMPILE_BACKEND`` names another. It is dynamo's full-graph
capture (a graph break raises) plus AOTAutograd's joint forward + backward graph (fake kernels,
functionalisation, the partition into forward and backward), run by eager kernels: about a
minute of CI. ``DMMI_COMPILE_BACKEND=inductor`` runs the same tests through inductor's C++
kernels (about 10 minutes with a cold cache on a 2-core CPU).

Tolerances, dmmi_tiny at 64 px, batch 2, fp32, against the eager model (gradients up to 0.42):
* aot_eager: loss terms and logits within 1e-5 (measured <= 2e-7), each gradient within
  1e-5 + 1e-4 relative (measured 1.3e-6 at most), all gradients together within 1e-4 of their
  norm.
* inductor: loss terms within 1e-4 (measured 5e-5), logits 1e-5 (3.5e-6), each gradient within
  1e-2 (measured 3.7e-3), all together within 2e-2 of their norm (measured 6e-5 - 6.7e-3 over
  three batches; eager fp32 itself is 7e-6 - 5.5e-4 from fp64 on them). The gap is inductor's
  CPU kernels' arithmetic, not the graph: the compiled weighted cross-entropy over 8,192 pixels
  is 5e-5 off the eager one on the same logits, and ``aot_eager_decomp_partition`` (inductor's
  decompositions and partitioner, eager kernels) matches eager to 1e-5.
Parameters whose gradient is zero in exact arithmetic (biases before an InstanceNorm: ~1e-11)
fall under the absolute terms.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from dmmi.config import load_config
from dmmi.engine.compiled import GraphedForward, compile_options, loss_step
from dmmi.engine.fastpath import autocast, prepare_model
from dmmi.models import build_model
from dmmi.models.extras import LocationPrior

BACKEND = os.environ.get("DMMI_COMPILE_BACKEND", "aot_eager")
_INDUCTOR = dict(loss=1e-4, logits=1e-5, grad_atol=1e-2, grad_rtol=0.0, grad_norm=2e-2)
TOL = {"aot_eager": dict(loss=1e-5, logits=1e-5, grad_atol=1e-5, grad_rtol=1e-4, grad_norm=1e-4)}.get(BACKEND, _INDUCTOR)
NO_DROPOUT = ["model.text_config.hidden_dropout_prob=0.0", "model.text_config.attention_probs_dropout_prob=0.0"]
B, S, L = 2, 64, 20  # tokens padded to model.max_tokens (20): static shapes


def _batch(seed: int, size: int = S, batch: int = B) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    ids = torch.randint(1000, 3000, (batch, L), generator=g)
    mask = torch.ones(batch, L, dtype=torch.long)
    mask[0, 5 + seed:] = 0  # padding: the values change per batch, the shapes do not
    erased = ids.clone()
    erased[:, 2] = 0
    target = torch.zeros(batch, size, size, dtype=torch.long)
    target[:, 8:8 + size // 2, 4:4 + size // 3] = 1
    delta = torch.ones(batch)
    delta[-1] = 0.0  # a zero-target sample
    return dict(images=images, ids=ids, mask=mask, erased=erased, target=target, delta=delta)


@pytest.fixture(scope="module")
def tiny():
    """dmmi_tiny as the trainer has it on a CPU in fast mode (channels_last)."""
    cfg = load_config("dmmi_tiny", NO_DROPOUT)
    torch.manual_seed(0)
    return cfg, prepare_model(build_model(cfg.model), "cpu", fast=True)


def _run(step, model, batch):
    """One forward + loss + backward -> (loss terms, gradients)."""
    model.train()
    model.zero_grad(set_to_none=True)
    terms = step(batch["images"], batch["ids"], batch["mask"], batch["erased"], batch["target"], batch["delta"])
    terms.total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.as_dict().items()}, grads


def _assert_same(terms, grads, ref_terms, ref_grads):
    assert set(terms) == set(ref_terms) == {"loss", "loss_ce", "loss_sim", "loss_con"}
    for k in ref_terms:
        torch.testing.assert_close(terms[k], ref_terms[k], atol=TOL["loss"], rtol=0, msg=k)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=TOL["grad_atol"], rtol=TOL["grad_rtol"], msg=n)
    flat, ref = torch.cat([grads[n].flatten() for n in ref_grads]), torch.cat([g.flatten() for g in ref_grads.values()])
    assert (flat - ref).norm() <= TOL["grad_norm"] * ref.norm()


def test_compile_options_are_one_static_graph():
    assert compile_options(True) == {"fullgraph": True, "dynamic": False}
    assert compile_options("default") == {"fullgraph": True, "dynamic": False}
    assert compile_options("max-autotune", "aot_eager") == {"fullgraph": True, "dynamic": False,
                                                           "mode": "max-autotune", "backend": "aot_eager"}


def test_training_step_compiles_as_one_graph_and_matches_eager(tiny):
    """Forward + loss as one fullgraph graph (a graph break would raise), backward through
    AOTAutograd; a second batch of the same shapes compiles nothing new."""
    cfg, model = tiny
    eager = loss_step(model, cfg.loss, "cpu", fast=True)
    compiled = loss_step(model, cfg.loss, "cpu", fast=True, compile=True, backend=BACKEND)
    first = _batch(0)
    _assert_same(*_run(compiled, model, first), *_run(eager, model, first))
    second = _batch(1)  # other values, other padding: no data-dependent guard may fail
    with torch._dynamo.config.patch(error_on_recompile=True):
        terms, grads = _run(compiled, model, second)
    ref_terms, ref_grads = _run(eager, model, second)
    _assert_same(terms, grads, ref_terms, ref_grads)
    assert not torch.allclose(terms["loss"], _run(eager, model, first)[0]["loss"])  # it saw the new batch


def test_inference_compiles_as_one_graph_and_matches_eager(tiny):
    cfg, model = tiny
    model.eval()
    try:
        compiled = torch.compile(model, **compile_options(True, BACKEND))
        for seed in (0, 1):
            batch = _batch(seed)
            with torch.no_grad():
                ref = model(batch["images"], batch["ids"], batch["mask"]).logits
                if seed:  # the second call reuses the graph
                    with torch._dynamo.config.patch(error_on_recompile=True):
                        out = compiled(batch["images"], batch["ids"], batch["mask"]).logits
                else:
                    out = compiled(batch["images"], batch["ids"], batch["mask"]).logits
            assert out.shape == (B, 2, S, S)
            torch.testing.assert_close(out, ref, atol=TOL["logits"], rtol=0)
    finally:
        model.train()


def test_object_location_prior_compiles_without_a_graph_break():
    """The candidates' labelling stopped early on a data-dependent ``torch.equal``: a graph break
    (and a host sync per 4 rounds on a GPU). Compiled, all h + w rounds run: the same result."""
    torch.manual_seed(0)
    prior = LocationPrior(8, gain=1.0, mode="object")
    torch.nn.init.normal_(prior.slopes.weight)
    logits = torch.full((2, 2, 16, 16), -3.0)
    logits[:, 0] = 0.0
    logits[:, 1, 2:6, 1:5] = 2.0  # two candidate regions per map
    logits[:, 1, 9:14, 10:15] = 1.5
    logits[1, 1, 0:3, 12:16] = 1.0  # a third one in the second map
    words, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    eager = prior(logits, words, mask)
    compiled = torch.compile(prior, fullgraph=True, dynamic=False, backend=BACKEND)(logits, words, mask)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    assert (eager - logits).abs().amax() > 0.1  # the prior moved the candidates: the comparison means something


def test_graphed_forward_off_cuda_is_the_eager_model(tiny):
    cfg, model = tiny
    model.eval()
    try:
        graphed = GraphedForward(model, "cpu", fast=True)
        batch = _batch(0)
        with torch.no_grad():
            ref = model(batch["images"], batch["ids"], batch["mask"]).logits
        assert not graphed.active
        torch.testing.assert_close(graphed(batch["images"], batch["ids"], batch["mask"]), ref, atol=0, rtol=0)
        assert graphed.captures == 0
    finally:
        model.train()


def test_predictor_cuda_graphs_change_nothing_on_a_cpu(tiny):
    from dmmi.inference import Predictor

    cfg, model = tiny
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    texts = ["the left square", "the big one on the right"]
    plain = Predictor(copy.deepcopy(model), cfg, device="cpu").predict(image, texts)
    graphed_predictor = Predictor(copy.deepcopy(model), cfg, device="cpu", cuda_graphs=True)
    assert graphed_predictor.graphed is None
    for a, b in zip(graphed_predictor.predict(image, texts), plain):
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.probability, b.probability)


# ------------------------------------------------------------------------------ CUDA
def _bf16_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Graph replay vs eager under bf16 autocast: the same kernels, so within bf16 rounding."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-3
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.99


@pytest.mark.gpu
def test_cuda_graph_replays_match_eager_when_batch_and_image_size_change(tiny):
    cfg, cpu_model = tiny
    device = torch.device("cuda")
    model = prepare_model(copy.deepcopy(cpu_model), device, fast=True).eval()
    graphed = GraphedForward(model, device, fast=True)
    shapes = [(1, 64), (3, 64), (1, 64), (1, 96), (3, 64)]
    for seed, (batch, size) in enumerate(shapes):
        inputs = {k: v.to(device) for k, v in _batch(seed, size, batch).items()}  # new values every call
        out = graphed(inputs["images"], inputs["ids"], inputs["mask"])
        with torch.no_grad(), autocast(device, True):
            ref = model(inputs["images"], inputs["ids"], inputs["mask"]).logits
        _bf16_close(out, ref)
        assert out.data_ptr() != graphed._graphs[next(reversed(graphed._graphs))].logits.data_ptr()  # a copy
    assert graphed.captures == 3  # (1, 64), (3, 64), (1, 96): each shape captured once, then replayed
    prepare_model(model, device, fast=False)  # the process-wide flags back to PyTorch's defaults


@pytest.mark.gpu
def test_predictor_with_cuda_graphs_predicts_what_the_eager_one_does(tiny):
    from dmmi.inference import Predictor

    cfg, cpu_model = tiny
    image = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    eager = Predictor(copy.deepcopy(cpu_model), cfg, device="cuda")
    graphed = Predictor(copy.deepcopy(cpu_model), cfg, device="cuda", cuda_graphs=True)
    assert graphed.graphed is not None
    for texts in (["the left square", "a dog", "the big one on the right"], ["the left square"]):
        for a, b in zip(graphed.predict(image, texts), eager.predict(image, texts)):
            assert np.abs(a.probability - b.probability).max() <= 0.02
            assert (a.mask == b.mask).mean() >= 0.99
    assert graphed.graphed.captures == 2  # batch 3, batch 1
