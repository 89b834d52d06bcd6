"""Entity-phrase erasure for the image-to-text (CCR) branch (SPEC §2, paper §3.1).

The sentence is POS-tagged, runs of consecutive ``NN``/``NNS`` words are collected (the
"entity phrases", as the authors did), ONE run is chosen with the caller's random generator
and every word-piece token of that run is replaced by ``[PAD]`` (id 0) or ``[MASK]``.

Differences from the authors' release (flaws the SPEC asks to fix):

* chosen per call (the data pipeline calls it per sample per epoch), seeded through the
  ``numpy.random.Generator`` it is given;
* aligned through the tokenizer's character offsets, so a word split into several pieces
  ("skateboarder" -> skate ##board ##er) is erased completely and nothing else is touched.

The tagger is TextBlob's bundled *pattern* tagger (``textblob.en.taggers.PatternTagger``),
which works offline; NLTK's default averaged-perceptron tagger needs a corpus download and
is never used here. Tagging is cached per sentence.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import numpy as np

from dmmi.errors import DmmiError

NOUN_TAGS = ("NN", "NNS")
PAD_ID = 0  # SPEC §2: [PAD] is id 0 in the BERT vocabulary

_tagger = None


def _get_tagger():
    global _tagger
    if _tagger is None:
        from textblob.en.taggers import PatternTagger  # offline: pattern's own lexicon

        _tagger = PatternTagger()
    return _tagger


def tag(sentence: str) -> list[tuple[str, str]]:
    """``[(word, tag), ...]`` from TextBlob's pattern tagger (offline)."""
    if not sentence.strip():
        return []
    return [(str(w), str(t)) for w, t in _get_tagger().tag(sentence, tokenize=True)]


@functools.lru_cache(maxsize=65536)
def noun_runs(sentence: str) -> tuple[tuple[int, int], ...]:
    """Character spans ``(start, end)`` in ``sentence`` of every run of consecutive NN/NNS words.

    A run's span goes from its first word's first character to its last word's last
    character. Words are located in the sentence left to right; a tagger token that cannot
    be found verbatim (should not happen with the pattern tokenizer) ends the current run.
    """
    runs: list[tuple[int, int]] = []
    cursor = 0
    current: list[int] | None = None  # [start, end] of the open run
    for word, pos in tag(sentence):
        at = sentence.find(word, cursor) if word else -1
        if at < 0:
            if current is not None:
                runs.append((current[0], current[1]))
                current = None
            continue
        start, end = at, at + len(word)
        cursor = end
        if pos in NOUN_TAGS and re.search(r"\w", word):
            if current is None:
                current = [start, end]
            else:
                current[1] = end
        elif current is not None:
            runs.append((current[0], current[1]))
            current = None
    if current is not None:
        runs.append((current[0], current[1]))
    return tuple(runs)


def _field(encoded: Any, name: str):
    if isinstance(encoded, dict):
        return encoded[name]
    return getattr(encoded, name)


def _as_list(x) -> list:
    if hasattr(x, "tolist"):
        x = x.tolist()
    return list(x)


def run_positions(offsets: Sequence[Sequence[int]], span: tuple[int, int]) -> list[int]:
    """Token positions whose character offsets overlap ``span`` (special / pad tokens, whose
    offsets are empty, never match)."""
    a, b = span
    out = []
    for i, (s, e) in enumerate(offsets):
        s, e = int(s), int(e)
        if e > s and s < b and e > a:
            out.append(i)
    return out


class EntityEraser:
    """``eraser(sentence_lower, encoded, rng) -> list[int]``: the erased input ids.

    ``encoded`` has ``input_ids`` and ``offsets`` (character offsets into
    ``sentence_lower`` per token position, ``(0, 0)`` for special and pad tokens), as
    returned by :func:`dmmi.data.tokenize.encode` (a dict with those keys works too).
    ``token='pad'`` writes id 0; ``token='mask'`` writes ``tokenizer.mask_token_id``.
    Only runs with at least one token inside the (possibly truncated) encoding are
    candidates; with none the ids come back unchanged (and ``rng`` is not consumed).
    """

    def __init__(self, tokenizer=None, token: str = "pad"):
        if token not in ("pad", "mask"):
            raise DmmiError(f"data.erase_token must be 'pad' or 'mask', got {token!r}")
        self.token = token
        if token == "mask":
            mask_id = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
            if mask_id is None:
                raise DmmiError("data.erase_token='mask' needs a tokenizer with a [MASK] token")
            self.erase_id = int(mask_id)
        else:
            self.erase_id = PAD_ID

    def candidates(self, sentence_lower: str, offsets) -> list[list[int]]:
        """Token positions of every noun run that is (at least partly) inside the encoding."""
        offsets = [tuple(o) for o in _as_list(offsets)]
        out = []
        for span in noun_runs(sentence_lower):
            pos = run_positions(offsets, span)
            if pos:
                out.append(pos)
        return out

    def __call__(self, sentence_lower: str, encoded, rng: np.random.Generator) -> list[int]:
        ids = [int(i) for i in _as_list(_field(encoded, "input_ids"))]
        runs = self.candidates(sentence_lower, _field(encoded, "offsets"))
        if not runs:
            return ids
        chosen = runs[int(rng.integers(len(runs)))]
        for p in chosen:
            ids[p] = self.erase_id
        return ids
