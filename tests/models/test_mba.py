"""MBA against direct loop implementations of the formulas we chose (module docstring of mba.py)."""

import math

import torch
from torch import nn

from dmmi.models.mba import MultiScaleBidirectionalAttention, RegionWordAttention, StageFusion, WordWindowPixelAttention

torch.manual_seed(0)


def _instance_norm(x):  # (C, N) over N
    return (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)


def _conv(seq, x):  # 1x1 conv of a Sequential(Conv1d[, IN]) applied to (Cin, N) by hand
    conv = seq[0]
    y = conv.weight[:, :, 0] @ x + conv.bias[:, None]
    return _instance_norm(y) if len(seq) > 1 else y


def _loop_region_attention(mod: RegionWordAttention, v, words, mask):
    """Eq. 2 as we realise it: per pixel, concatenate the k x k reduced neighbours (zeros
    outside), project, dot with every word key, softmax over valid words. One sample."""
    C, H, W = v.shape
    r = mod.region // 2
    reduced = _conv(mod.pixel_reduce, v.reshape(C, H * W)).reshape(-1, H, W)
    cols = []
    for i in range(H):
        for j in range(W):
            feats = []
            for c in range(reduced.shape[0]):
                for di in range(-r, r + 1):
                    for dj in range(-r, r + 1):
                        y, x = i + di, j + dj
                        feats.append(reduced[c, y, x] if 0 <= y < H and 0 <= x < W else torch.tensor(0.0))
            cols.append(torch.stack(feats))
    query = _conv(mod.region_query, torch.stack(cols, 1))  # (C, N)
    key = mod.word_key[0].weight[:, :, 0] @ words + mod.word_key[0].bias[:, None]  # (C, L)
    out = torch.empty(H * W, words.shape[1])
    for n in range(H * W):
        scores = torch.tensor([float(query[:, n] @ key[:, l]) / math.sqrt(C) if mask[l] else -math.inf
                               for l in range(words.shape[1])])
        out[n] = scores.softmax(0)
    return out


def _loop_window_attention(mod: WordWindowPixelAttention, v, words, mask):
    """Eq. 5 as we realise it: token window [l-1, l] (w=2) or [l-1, l, l+1] (w=3), clamped at
    the ends, concatenated, projected, dot with every pixel key, softmax over pixels."""
    C, H, W = v.shape
    L, w = words.shape[1], mod.window
    reduced = _conv(mod.word_reduce, words)  # (c, L)
    offsets = {1: [0], 2: [-1, 0], 3: [-1, 0, 1]}[w]
    cols = []
    for l in range(L):
        parts = [reduced[c, min(max(l + o, 0), L - 1)] for c in range(reduced.shape[0]) for o in offsets]
        cols.append(torch.stack(parts))
    query = _conv(mod.window_query, torch.stack(cols, 1))  # (Ct, L)
    key = _conv(mod.pixel_key, v.reshape(C, H * W))  # (Ct, N)
    out = torch.empty(L, H * W)
    for l in range(L):
        q = query[:, l] * mask[l]
        out[l] = torch.stack([q @ key[:, n] / math.sqrt(C) for n in range(H * W)]).softmax(0)
    return out


def test_region_word_attention_equals_loop():
    C, Ct, L, H, W = 8, 6, 5, 4, 3
    v, words = torch.randn(1, C, H, W), torch.randn(1, Ct, L)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    for k in (1, 3, 5):
        mod = RegionWordAttention(C, Ct, k)
        with torch.no_grad():
            fast = mod(v, words, mask)[0]
            slow = _loop_region_attention(mod, v[0], words[0], mask[0])
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
        assert torch.all(fast[:, 3:] < 1e-6)  # padding words get no attention


def test_word_window_attention_equals_loop():
    C, Ct, L, H, W = 12, 6, 5, 3, 3
    v, words = torch.randn(1, C, H, W), torch.randn(1, Ct, L)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    for w in (1, 2, 3):
        mod = WordWindowPixelAttention(C, Ct, w)
        with torch.no_grad():
            fast = mod(v, words, mask)[0]
            slow = _loop_window_attention(mod, v[0], words[0], mask[0])
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_window_2_uses_previous_token_only():
    mod = WordWindowPixelAttention(8, 4, 2)
    v, words = torch.randn(1, 8, 2, 2), torch.randn(1, 4, 5)
    mask = torch.ones(1, 5)
    with torch.no_grad():
        base = mod(v, words, mask)
        changed = words.clone()
        changed[0, :, 4] += 5.0  # the last token: only windows ending at it see it
        after = mod(v, changed, mask)
    assert torch.allclose(base[0, :4], after[0, :4])
    assert not torch.allclose(base[0, 4], after[0, 4])


def test_lambda_mix_is_a_softmax_of_learnable_weights():
    mba = MultiScaleBidirectionalAttention(8, 6)
    assert mba.region_mix.requires_grad and mba.region_mix.shape == (3,)
    v, words, mask = torch.randn(2, 8, 4, 4), torch.randn(2, 6, 5), torch.ones(2, 5)
    with torch.no_grad():
        mba.region_mix.copy_(torch.tensor([100.0, 0.0, 0.0]))  # all weight on 1x1 regions
        only_1x1 = mba.text_to_image(v, words, mask)
        a = mba.region_attn[0](v, words, mask)
        value = mba.word_value(words)
        expected = mba.visual_out(torch.bmm(a, value.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(only_1x1, expected, atol=1e-5, rtol=1e-4)


def test_single_scale_and_one_direction_switches():
    mba = MultiScaleBidirectionalAttention(8, 6, multi_scale=False, bidirectional=False)
    assert len(mba.region_attn) == 1 and not hasattr(mba, "window_attn")
    r_v, r_l = mba(torch.randn(1, 8, 4, 4), torch.randn(1, 6, 3), torch.ones(1, 3))
    assert r_v.shape == (1, 8, 4, 4) and r_l is None


def test_fresh_gate_leaves_the_visual_stream_unchanged_and_can_learn():
    fusion = StageFusion(8, 6)
    v, words, mask = torch.randn(2, 8, 4, 4), torch.randn(2, 6, 5), torch.ones(2, 5)
    v_new, words_new, skip = fusion(v, words, mask)
    assert torch.equal(v_new, v)
    assert not torch.equal(words_new, words)  # the language update runs
    v_new.pow(2).sum().backward()
    assert fusion.visual_gate[2].weight.grad.abs().sum() > 0  # last gate layer gets a gradient


def test_factored_image_to_text_equals_the_direct_path_with_gradients():
    """C < Ct: the (B, Ct, N) keys / values are never built, the function and its gradients
    are the same (padding words included)."""
    torch.manual_seed(1)
    mba = MultiScaleBidirectionalAttention(6, 20)
    for p in mba.parameters():  # away from the init's symmetry
        p.data.add_(0.2 * torch.randn_like(p))
    v = (2.0 * torch.randn(2, 6, 5, 4) + 1.5).requires_grad_()
    words = torch.randn(2, 20, 7, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    results = []
    for factored in (False, True):
        out = mba.image_to_text(v, words, mask, factored=factored)  # (B, Ct, L)
        grads = torch.autograd.grad(out.pow(2).sum(), [v, words, mba.window_attn[2].pixel_key[0].weight,
                                                       mba.pixel_value[0].weight, mba.window_mix])
        results.append((out, grads))
    (direct, g_direct), (factored, g_factored) = results
    torch.testing.assert_close(factored, direct, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_factored, g_direct):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_factored_path_is_chosen_only_where_it_is_cheaper(monkeypatch):
    mba = MultiScaleBidirectionalAttention(6, 20)
    calls = []
    real = type(mba.window_attn[0]).forward_factored
    monkeypatch.setattr(type(mba.window_attn[0]), "forward_factored",
                        lambda self, *a: calls.append(1) or real(self, *a))
    mask = torch.ones(1, 3)
    mba(torch.randn(1, 6, 4, 4), torch.randn(1, 20, 3), mask)  # C=6 < Ct=20, C < N=16
    assert len(calls) == 3
    mba(torch.randn(1, 6, 2, 2), torch.randn(1, 20, 3), mask)  # N=4 < C: direct keys are cheaper
    assert len(calls) == 3
    wide = MultiScaleBidirectionalAttention(24, 20)
    wide(torch.randn(1, 24, 8, 8), torch.randn(1, 20, 3), mask)  # C >= Ct
    assert len(calls) == 3


def test_pointwise_conv_is_the_1x1_convolution_with_its_gradients_and_keys():
    from dmmi.models.mba import PointwiseConv1d

    torch.manual_seed(0)
    fast, conv = PointwiseConv1d(6, 5), nn.Conv1d(6, 5, 1)
    conv.load_state_dict(fast.state_dict())  # same keys and shapes: the authors' weights load as they are
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in conv.state_dict().items()}
    x = torch.randn(3, 6, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, ref = fast(x), conv(x2)
    assert out.shape == (3, 5, 7) and torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert torch.allclose(fast.weight.grad, conv.weight.grad, atol=1e-5)
    assert torch.allclose(fast.bias.grad, conv.bias.grad, atol=1e-5)
    # every 1x1 Conv1d of the network goes through it (MBA stages, the contrastive head)
    from dmmi.models import build_preset

    model = build_preset("dmmi_tiny")
    assert not [m for m in model.modules() if type(m) is nn.Conv1d]
    assert len([m for m in model.fusions[0].modules() if isinstance(m, PointwiseConv1d)]) > 10
    assert isinstance(model.contrastive.text_align, PointwiseConv1d)
