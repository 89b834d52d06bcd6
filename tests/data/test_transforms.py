"""Image/mask/sentence transforms, robust image loading, and tokenization (text transform)."""

import numpy as np
import pytest
import torch
from PIL import Image

from dmmi.data.tokenize import encode, load_tokenizer
from dmmi.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, denormalize, flip_sentence, image_to_tensor,
                                  load_image, mask_to_tensor, prepare_sample)
from dmmi.errors import DmmiError

# --------------------------------------------------------------------------------- flip


@pytest.mark.parametrize("text,flipped", [
    ("the man on the left", "the man on the right"),
    ("Left zebra, right giraffe.", "Right zebra, left giraffe."),
    ("LEFT", "RIGHT"),
    ("leftmost cup, right-hand side, rightward", "rightmost cup, left-hand side, leftward"),
    ("bright light, alright, upright, lefty", "bright light, alright, upright, lefty"),
    ("no direction here", "no direction here"),
])
def test_flip_sentence(text, flipped):
    assert flip_sentence(text) == flipped
    assert flip_sentence(flip_sentence(text)) == text


def test_prepare_sample_flip_mirrors_image_and_mask():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    mask = np.zeros((4, 6), np.uint8)
    mask[1:3, 0:2] = 1  # on the left
    img0, m0, s0 = prepare_sample(image, mask, "the cat on the left", 6)
    img1, m1, s1 = prepare_sample(image, mask, "the cat on the left", 6, flip=True)
    assert s0 == "the cat on the left" and s1 == "the cat on the right"
    assert m1[:, 4:].sum() > 0 and m1[:, :2].sum() == 0  # now on the right
    torch.testing.assert_close(m1, m0.flip(-1))
    torch.testing.assert_close(img1, img0.flip(-1))


# --------------------------------------------------------------------------------- tensors


def test_image_to_tensor_normalises_with_imagenet_stats():
    color = (200, 100, 30)
    image = Image.new("RGB", (5, 3), color)
    t = image_to_tensor(image, 8)
    assert t.shape == (3, 8, 8) and t.dtype == torch.float32
    for c in range(3):
        expected = (color[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(t[c], torch.full((8, 8), expected), atol=1e-5)
    assert torch.allclose(denormalize(t)[:, 0, 0], torch.tensor(color) / 255, atol=1e-5)


def test_image_to_tensor_is_bilinear():
    image = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8))  # 1x2
    row = denormalize(image_to_tensor(image, 4))[0, 0]
    # bilinear gives intermediate values between the two pixels (nearest would give only 0 / 1)
    assert ((row > 0.05) & (row < 0.95)).any() and row[0] < row[-1]


def test_mask_to_tensor_nearest_keeps_it_binary():
    mask = np.array([[0, 1], [1, 0]], np.uint8) * 255  # any non-zero is foreground
    t = mask_to_tensor(mask, 4)
    assert t.dtype == torch.long and t.shape == (4, 4)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(t, expected)
    t = mask_to_tensor(np.eye(7, dtype=np.uint8), 5)
    assert set(t.unique().tolist()) == {0, 1}


# --------------------------------------------------------------------------------- loading


def test_load_image_ok_and_grayscale_becomes_rgb(tmp_path):
    Image.new("L", (3, 2), 7).save(tmp_path / "g.png")
    im = load_image(tmp_path / "g.png")
    assert im.mode == "RGB" and im.size == (3, 2)


@pytest.mark.parametrize("content", [b"this is not an image", b"", "truncated"])
def test_corrupt_image_names_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.png")
        data = (tmp_path / "ok.png").read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(DmmiError) as e:
        load_image(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(DmmiError, match="image file not found: .*nope.png"):
        load_image(tmp_path / "nope.png")


# --------------------------------------------------------------------------------- tokenization


def pieces(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_encode_short_sentence_cls_sep_then_zero_padding(tokenizer):
    enc = encode(tokenizer, "The man on the LEFT", 20)
    assert len(enc.input_ids) == len(enc.attention_mask) == len(enc.offsets) == 20
    toks = pieces(tokenizer, enc.input_ids[:7])
    assert toks == ["[CLS]", "the", "man", "on", "the", "left", "[SEP]"]
    assert enc.input_ids[7:] == [0] * 13 and enc.attention_mask == [1] * 7 + [0] * 13
    assert enc.length == 7


def test_encode_truncation_keeps_cls_and_no_trailing_sep(tokenizer):
    sentence = " ".join(["red"] * 30)
    enc = encode(tokenizer, sentence, 20)
    assert len(enc.input_ids) == 20 and enc.attention_mask == [1] * 20
    assert enc.input_ids[0] == tokenizer.cls_token_id
    assert tokenizer.sep_token_id not in enc.input_ids  # not re-added after the cut
    assert pieces(tokenizer, enc.input_ids[1:]) == ["red"] * 19


def test_encode_exact_fit_keeps_sep(tokenizer):
    enc = encode(tokenizer, " ".join(["red"] * 18), 20)
    assert enc.input_ids[-1] == tokenizer.sep_token_id and 0 not in enc.input_ids


def test_offsets_align_with_words_and_word_pieces(tokenizer):
    sentence = "The SKATEBOARDER, unbelievably-striped shirt"
    lower = sentence.lower()
    enc = encode(tokenizer, sentence, 20)
    toks = pieces(tokenizer, enc.input_ids)
    assert enc.offsets[0] == (0, 0)  # [CLS]
    n = enc.length
    assert enc.offsets[n - 1] == (0, 0) and toks[n - 1] == "[SEP]"
    assert all(o == (0, 0) for o in enc.offsets[n:])
    for tok, (a, b) in zip(toks[1:n - 1], enc.offsets[1:n - 1]):
        assert lower[a:b] == tok.removeprefix("##")
    # the pieces of a split word tile exactly that word
    start = lower.index("unbelievably")
    spans = [o for o in enc.offsets if start <= o[0] < start + len("unbelievably")]
    assert len(spans) > 1 and spans[0][0] == start and spans[-1][1] == start + len("unbelievably")
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


@pytest.mark.parametrize("sentence", ["", "   ", "\t\n"])
def test_empty_expression_is_an_error(tokenizer, sentence):
    with pytest.raises(DmmiError, match="empty expression"):
        encode(tokenizer, sentence, 20)


def test_load_tokenizer_errors_are_one_line(tmp_path):
    with pytest.raises(DmmiError) as e:
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))
    assert "no-such-tokenizer" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DmmiError, match="unknown package"):
        load_tokenizer("package:nothing")


def test_package_tokenizer_is_fast_bert_uncased(tokenizer):
    assert tokenizer.is_fast and tokenizer.cls_token_id == 101 and tokenizer.pad_token_id == 0
