"""What kind of wording an expression uses, for ``dmmi evaluate --by-wording``.

The categories, tried in this order (the first that applies wins):

* ``union``     two descriptions joined: "the red circle and the big square";
* ``position``  a spatial word: "the leftmost shape", "the star at the top", "man on left";
* ``count``     a number or "both": "two blue triangles", "both squares", "3 dogs";
* ``plural``    "all" / "every" / a plural noun: "all the green shapes", "every star";
* ``attribute`` anything else: a singular description by attributes ("the small red circle").

On the synthetic dataset (:mod:`dmmi.data.synthetic`, a closed vocabulary) this is exactly the
generator's query kind. On real datasets it is a keyword heuristic: useful for spotting which
wordings a model gets wrong, not a linguistic parse ("glass" is not a plural, but "glasses" is
counted as one).
"""

from __future__ import annotations

import re

CATEGORIES = ("attribute", "position", "plural", "count", "union")

POSITION_WORDS = frozenset(
    "left right top bottom leftmost rightmost topmost bottommost highest lowest upper lower middle "
    "center centre front behind back far near nearest closest furthest farthest above below under "
    "beside next corner".split())
COUNT_WORDS = frozenset("two three four five six seven eight nine ten both pair couple".split())
PLURAL_WORDS = frozenset("all every each".split())
# singular words ending in "s" that the plural rule would otherwise take (small list, real data)
NOT_PLURAL = frozenset("is was this his its glass grass bus dress class cross canvas lens plus gas".split())
_TOKEN = re.compile(r"[a-z0-9]+")


def wording_category(sentence: str) -> str:
    """One of :data:`CATEGORIES` for an English expression (see the module docstring)."""
    words = _TOKEN.findall(sentence.lower())
    if "and" in words:
        return "union"
    if any(w in POSITION_WORDS for w in words):
        return "position"
    if any(w in COUNT_WORDS or w.isdigit() for w in words):
        return "count"
    if any(w in PLURAL_WORDS for w in words) or any(
            len(w) > 3 and w.endswith("s") and not w.endswith("ss") and w not in NOT_PLURAL for w in words):
        return "plural"
    return "attribute"
