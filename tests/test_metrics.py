"""Golden tests for dmmi.metrics: every expected value is derived by hand in the comments."""

import json

import pytest
import torch

from dmmi.errors import DmmiError
from dmmi.metrics import (
    CombinedEvaluator,
    DMMIEvaluator,
    GRESEvaluator,
    evaluate_all,
    format_table,
    mask_counts,
)


def mask(pixels, size=4):
    """A (size, size) bool mask with the listed (row, col) pixels set."""
    m = torch.zeros(size, size, dtype=torch.bool)
    for r, c in pixels:
        m[r, c] = True
    return m


# Six 4x4 samples. For each: I = |pred & gt|, U = |pred | gt|.
# A one : gt rows 0-1 x cols 0-1 (4 px); pred rows 0-1 x cols 0-2 (6 px): I = 4, U = 6, IoU = 2/3
# B many: gt = object {(0,0),(0,1)} + object {(3,2),(3,3)} = 4 px;
#         pred {(0,0),(0,1),(3,3),(2,0)} = 4 px: I = 3, U = 4 + 4 - 3 = 5, IoU = 3/5 (exactly 0.6)
# C one : gt {(1,1),(1,2)}; pred {(1,1)}: I = 1, U = 2, IoU = 1/2 (exactly 0.5)
# D zero: gt empty, pred empty: I = 0, U = 0 (predicted empty: correct)
# E zero: gt empty, pred {(0,0),(1,1),(2,2)}: I = 0, U = 3 (predicted non-empty: wrong)
# F one : gt empty (object lost at this resolution), pred empty: I = 0, U = 0 -> IoU 0
SAMPLES = {
    "A": ("one", [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)], [(0, 0), (0, 1), (1, 0), (1, 1)]),
    "B": ("many", [(0, 0), (0, 1), (3, 3), (2, 0)], [(0, 0), (0, 1), (3, 2), (3, 3)]),
    "C": ("one", [(1, 1)], [(1, 1), (1, 2)]),
    "D": ("zero", [], []),
    "E": ("zero", [(0, 0), (1, 1), (2, 2)], []),
    "F": ("one", [], []),
}


def batch(names):
    preds = torch.stack([mask(SAMPLES[n][1]) for n in names])  # (B, 4, 4)
    gts = torch.stack([mask(SAMPLES[n][2]) for n in names])  # (B, 4, 4)
    return preds, gts, [SAMPLES[n][0] for n in names]


ALL = list("ABCDEF")


def test_mask_counts_hand_values():
    preds, gts, _ = batch(ALL)
    inter, union, pred_area, gt_area = mask_counts(preds, gts)
    assert inter.dtype == torch.int64 and inter.shape == (6,)
    assert inter.tolist() == [4, 3, 1, 0, 0, 0]
    assert union.tolist() == [6, 5, 2, 0, 3, 0]
    assert pred_area.tolist() == [6, 4, 1, 0, 3, 0]
    assert gt_area.tolist() == [4, 4, 2, 0, 0, 0]


def test_mask_counts_single_and_integer_masks():
    pred, gt = mask(SAMPLES["A"][1]), mask(SAMPLES["A"][2])
    inter, union, pa, ga = mask_counts(pred.long(), gt.to(torch.uint8))  # 0/1 integer masks
    assert inter.shape == () and (inter.item(), union.item(), pa.item(), ga.item()) == (4, 6, 6, 4)


def test_mask_counts_shape_mismatch_is_one_line_error():
    with pytest.raises(DmmiError, match=r"shape \(4, 4\) != ground-truth shape \(4, 5\)"):
        mask_counts(torch.zeros(4, 4), torch.zeros(4, 5))


def test_dmmi_protocol_golden():
    ev = DMMIEvaluator()
    ev.process(*batch(ALL))
    r = ev.evaluate()
    # targeted = A, B, C, F: sum I = 4 + 3 + 1 + 0 = 8, sum U = 6 + 5 + 2 + 0 = 13
    assert r["oIoU"] == pytest.approx(100 * 8 / 13)
    # mIoU = (2/3 + 3/5 + 1/2 + 0) / 4
    assert r["mIoU"] == pytest.approx(100 * (2 / 3 + 0.6 + 0.5 + 0) / 4)
    # prec@0.5: A, B, C (C has IoU exactly 0.5: inclusive) -> 3/4
    assert r["prec@0.5"] == pytest.approx(75.0)
    # prec@0.6: A, B (B has IoU exactly 0.6: inclusive) -> 2/4
    assert r["prec@0.6"] == pytest.approx(50.0)
    # prec@0.7 .. 0.9: best IoU is 2/3 < 0.7 -> 0
    assert r["prec@0.7"] == r["prec@0.8"] == r["prec@0.9"] == 0.0
    # zero = D (empty: right), E (3 px: wrong) -> Acc 1/2
    assert r["Acc"] == pytest.approx(50.0)
    assert r["counts"] == {"zero": 2, "one": 3, "many": 1, "targeted": 4, "total": 6}
    one = r["per_type"]["one"]  # A, C, F: I = 4 + 1 + 0 = 5, U = 6 + 2 + 0 = 8
    assert one["oIoU"] == pytest.approx(62.5)
    assert one["mIoU"] == pytest.approx(100 * (2 / 3 + 0.5 + 0) / 3)
    assert one["prec@0.5"] == pytest.approx(100 * 2 / 3)
    assert one["prec@0.6"] == pytest.approx(100 * 1 / 3)
    many = r["per_type"]["many"]  # B alone: 3 / 5
    assert many["oIoU"] == pytest.approx(60.0) and many["mIoU"] == pytest.approx(60.0)
    assert many["prec@0.6"] == 100.0 and many["prec@0.7"] == 0.0
    assert r["per_type"]["zero"] == {"Acc": pytest.approx(50.0)}


def test_gres_protocol_golden():
    ev = GRESEvaluator()
    ev.process(*batch(ALL))
    r = ev.evaluate()
    # all six: sum I = 8 + 0 (D) + 0 (E) = 8; sum U = 13 + 0 (D) + 3 (E's predicted area) = 16
    assert r["cIoU"] == pytest.approx(50.0)
    # per-sample: A 2/3, B 3/5, C 1/2, F 0 (U = 0), D 1 (empty: right), E 0 -> mean over 6
    assert r["gIoU"] == pytest.approx(100 * (2 / 3 + 0.6 + 0.5 + 0 + 1 + 0) / 6)
    assert r["N-acc"] == pytest.approx(50.0)  # D yes, E no
    assert r["T-acc"] == pytest.approx(75.0)  # A, B, C non-empty; F empty -> 3/4
    assert r["per_type"]["one"] == {
        "cIoU": pytest.approx(62.5),  # 5 / 8
        "gIoU": pytest.approx(100 * (2 / 3 + 0.5 + 0) / 3),
        "T-acc": pytest.approx(100 * 2 / 3),  # A, C non-empty; F empty
    }
    assert r["per_type"]["many"] == {"cIoU": pytest.approx(60.0), "gIoU": pytest.approx(60.0), "T-acc": 100.0}
    assert r["per_type"]["zero"] == {"gIoU": pytest.approx(50.0), "N-acc": pytest.approx(50.0)}


def test_zero_sample_predicted_empty_vs_not():
    # D alone: predicted empty -> Acc 100, gIoU 1 -> 100, cIoU undefined (sum U = 0)
    d = evaluate_all(*batch(["D"]))
    assert d["dmmi"]["Acc"] == 100.0 and d["gres"]["gIoU"] == 100.0 and d["gres"]["N-acc"] == 100.0
    assert d["gres"]["cIoU"] is None
    # E alone: predicted 3 px -> Acc 0, gIoU 0, cIoU = 0 / 3 = 0
    e = evaluate_all(*batch(["E"]))
    assert e["dmmi"]["Acc"] == 0.0 and e["gres"]["gIoU"] == 0.0 and e["gres"]["cIoU"] == 0.0


def test_batch_of_only_zero_samples_leaves_targeted_metrics_undefined():
    r = evaluate_all(*batch(["D", "E", "D"]))
    dm = r["dmmi"]
    assert dm["oIoU"] is None and dm["mIoU"] is None and dm["prec@0.5"] is None
    assert dm["Acc"] == pytest.approx(100 * 2 / 3)
    assert r["gres"]["T-acc"] is None
    # gIoU: D 1, E 0, D 1 -> 2/3; cIoU: 0 / (0 + 3 + 0) = 0
    assert r["gres"]["gIoU"] == pytest.approx(100 * 2 / 3) and r["gres"]["cIoU"] == 0.0
    table = format_table(r)
    assert "—" in table and "nan" not in table.lower()
    json.dumps(r, allow_nan=False)  # None, never NaN


def test_targeted_sample_with_empty_union_scores_zero():
    r = evaluate_all(*batch(["F"]))
    assert r["dmmi"]["mIoU"] == 0.0 and r["dmmi"]["oIoU"] is None  # 0 / 0 overall is undefined
    assert r["dmmi"]["prec@0.5"] == 0.0 and r["gres"]["gIoU"] == 0.0
    assert r["dmmi"]["Acc"] is None  # no zero sample


def test_batches_accumulate_like_one_batch_and_reset_clears():
    ev = CombinedEvaluator()
    ev.process(*batch(["A", "B"]))
    ev.process(*batch(["C", "D", "E", "F"]))
    assert ev.evaluate() == evaluate_all(*batch(ALL))
    ev.reset()
    r = ev.evaluate()
    assert r["dmmi"]["counts"]["total"] == 0 and r["dmmi"]["oIoU"] is None and r["gres"]["gIoU"] is None


def test_sample_ious_and_records_order():
    ev = DMMIEvaluator()
    ev.process(*batch(ALL))
    assert ev.sample_ious().tolist() == pytest.approx([2 / 3, 0.6, 0.5, 0.0, 0.0, 0.0])
    assert ev.records().shape == (6, 6)


def test_all_reduce_single_process_dedups_ids_and_is_idempotent():
    ev = DMMIEvaluator()
    preds, gts, types = batch(["A", "C"])
    ev.process(preds, gts, types, sample_ids=[0, 1])
    ev.process(preds[:1], gts[:1], types[:1], sample_ids=[0])  # a padded repeat of A
    ev.all_reduce()
    ev.all_reduce()
    # A + C once each: I = 4 + 1, U = 6 + 2
    assert ev.evaluate()["counts"]["total"] == 2
    assert ev.evaluate()["oIoU"] == pytest.approx(100 * 5 / 8)


def test_format_table_layout():
    r = evaluate_all(*batch(ALL))
    text = format_table(r)
    assert "DMMI protocol" in text and "GRES protocol" in text
    assert "61.54" in text  # oIoU 8/13
    assert "46.11" in text  # gIoU 2.7667/6
    dmmi_lines = format_table(r["dmmi"]).splitlines()
    assert [ln.split()[0] for ln in dmmi_lines[2:]] == ["all", "one", "many", "zero"]
    zero_row = dmmi_lines[-1].split()
    assert zero_row[1] == "2" and zero_row[2] == "—" and zero_row[-1] == "50.00"


@pytest.mark.parametrize(
    "types, message",
    [(["one"], "1 types for a batch of 2"), (["one", "some"], "unknown sample type 'some'")],
)
def test_process_rejects_bad_types(types, message):
    preds, gts, _ = batch(["A", "B"])
    with pytest.raises(DmmiError, match=message):
        DMMIEvaluator().process(preds, gts, types)
