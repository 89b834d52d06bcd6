"""Wording categories: exact on the synthetic generator's vocabulary, sensible on real text."""

import itertools

import pytest
import torch

from dmmi.data.synthetic import COLOURS, DIRECTIONS, SHAPES, SIZES, Part, Query, wordings
from dmmi.data.wording import CATEGORIES, wording_category
from dmmi.errors import DmmiError
from dmmi.metrics import CombinedEvaluator, format_group_table


def _parts(position=None):
    for size, colour, shape in itertools.product((None, *SIZES), (None, *COLOURS), (None, *SHAPES)):
        yield Part(size, colour, shape, position)


def test_every_synthetic_wording_gets_its_query_kind():
    seen = {c: 0 for c in CATEGORIES}
    for p in _parts():
        cases = [(Query("single", (p,)), 1, "attribute"), (Query("plural", (p,)), 3, "plural"),
                 (Query("plural", (p,), 2), 2, "count"), (Query("plural", (p,), 3), 3, "count")]
        cases += [(Query("single", (Part(p.size, p.colour, p.shape, d),)), 1, "position") for d in DIRECTIONS]
        if p.shape and p.colour:
            cases.append((Query("union", (p, Part(None, None, "star" if p.shape != "star" else "circle"))), 2, "union"))
        for query, n, expected in cases:
            for text in wordings(query, n):
                assert wording_category(text) == expected, text
                seen[expected] += 1
    assert all(seen.values())  # every category was exercised


@pytest.mark.parametrize("text, expected", [
    ("man on left", "position"), ("the guy in the middle", "position"), ("2 dogs", "count"),
    ("both of the zebras", "count"), ("all people", "plural"), ("the dogs", "plural"),
    ("the glass", "attribute"), ("woman in red dress", "attribute"), ("cat and dog", "union"),
    ("THE LEFTMOST Bus", "position"),
])
def test_real_expressions(text, expected):
    assert wording_category(text) == expected


def test_evaluate_groups_by_hand():
    ev = CombinedEvaluator()
    pred = torch.zeros(4, 2, 2, dtype=torch.bool)
    gt = torch.zeros(4, 2, 2, dtype=torch.long)
    gt[0, 0] = 1            # one: 2 gt pixels
    pred[0, 0, 0] = True    #      1 predicted, inside: I=1, U=2
    gt[1] = 1               # many: 4 gt pixels, all predicted: I=4, U=4
    pred[1] = True
    pred[2, 1, 1] = True    # zero, predicted non-empty: a miss
    ev.process(pred, gt, ["one", "many", "zero", "zero"], sample_ids=[10, 11, 12, 13])
    ev.all_reduce()
    groups = ev.evaluate_groups({10: "a", 12: "a", 11: "b", 13: "b"})
    assert list(groups) == ["a", "b"]
    a, b = groups["a"]["dmmi"], groups["b"]["dmmi"]
    assert a["oIoU"] == pytest.approx(50.0) and a["Acc"] == 0.0 and a["counts"]["total"] == 2
    assert b["oIoU"] == pytest.approx(100.0) and b["Acc"] == 100.0
    assert groups["b"]["gres"]["gIoU"] == pytest.approx(100.0)  # many IoU 1, zero predicted empty: 1
    table = format_group_table(groups)
    assert table.splitlines()[0].split()[:5] == ["wording", "n", "zero", "one", "many"]
    assert "50.00" in table.splitlines()[2] and len(table.splitlines()) == 4
    no_ids = CombinedEvaluator()
    no_ids.process(pred, gt, ["one", "many", "zero", "zero"])
    with pytest.raises(DmmiError, match="sample_ids"):
        no_ids.evaluate_groups({})
