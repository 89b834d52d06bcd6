"""Referring-segmentation metrics (SPEC §5): pixel counts and two evaluation protocols.

Every sample is reduced to one integer record (I, U, pred_area, gt_area, type, id); both
protocols are computed from these records, so they are exact, cheap to keep, and can be
gathered across ranks. Metric values are percentages (floats); an undefined metric (no
sample to average over) is ``None``, never NaN, so results are JSON-serialisable as is.

- :class:`DMMIEvaluator` — the DMMI paper's protocol: oIoU / mIoU / prec@X over targeted
  samples (``one`` + ``many``), Acc over ``zero`` samples.
- :class:`GRESEvaluator` — the GRES protocol: cIoU / gIoU over all samples, N-acc, T-acc.
- :class:`CombinedEvaluator` and :func:`evaluate_all` — both at once;
  :func:`format_table` prints any of their results.

Distributed use: every rank calls ``process`` on its own samples, then every rank calls
``all_reduce()`` (a collective), after which ``evaluate()`` returns the global metrics on
all ranks.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from dmmi.errors import DmmiError

TYPES = ("zero", "one", "many")
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
_TYPE_INDEX = {name: i for i, name in enumerate(TYPES)}
# columns of a record row
_I, _U, _PRED, _GT, _TYPE, _ID = range(6)


def mask_counts(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel counts of predicted vs ground-truth masks.

    Args:
        pred, gt: (H, W) or (B, H, W) masks, bool or 0/1 integers (any non-zero is foreground).
    Returns:
        (I, U, pred_area, gt_area): int64 tensors of shape () for (H, W) input, (B,) for
        batched input, on the inputs' device.
    """
    if pred.shape != gt.shape:
        raise DmmiError(f"mask_counts: prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
    if pred.dim() not in (2, 3):
        raise DmmiError(f"mask_counts: expected (H, W) or (B, H, W) masks, got shape {tuple(pred.shape)}")
    p = pred.bool()
    g = gt.to(p.device).bool()
    dims = (-2, -1)
    inter = (p & g).sum(dims, dtype=torch.int64)
    union = (p | g).sum(dims, dtype=torch.int64)
    return inter, union, p.sum(dims, dtype=torch.int64), g.sum(dims, dtype=torch.int64)


def _percent(num: float, den: float) -> Optional[float]:
    return None if den == 0 else 100.0 * float(num) / float(den)


def _iou(rec: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU in [0, 1], 0 where U = 0. rec: (N, 6) -> (N,) float64."""
    inter = rec[:, _I].double()
    union = rec[:, _U].double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


class _RecordEvaluator:
    """Keeps one integer record per sample; subclasses turn the records into metrics."""

    protocol = "records"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._local: list[torch.Tensor] = []  # chunks of (b, 6) int64 rows on the CPU
        self._global: Optional[torch.Tensor] = None  # (N, 6) after all_reduce

    def process(
        self,
        pred_masks: torch.Tensor,
        gt_masks: torch.Tensor,
        types: Sequence[str],
        sample_ids: Optional[Sequence[int]] = None,
    ) -> None:
        """Add a batch.

        Args:
            pred_masks: (B, H, W) bool / 0-1 predicted masks, at evaluation resolution.
            gt_masks: (B, H, W) ground truth, same size (resize it nearest beforehand).
            types: B strings, each 'zero', 'one' or 'many'.
            sample_ids: optional B non-negative ints identifying the samples; when given,
                ``all_reduce`` keeps one record per id (a DistributedSampler pads the
                last batch with repeated samples).
        """
        if pred_masks.dim() == 2:
            pred_masks, gt_masks = pred_masks[None], gt_masks[None]
        inter, union, pred_area, gt_area = mask_counts(pred_masks, gt_masks)
        batch = inter.shape[0]
        if len(types) != batch:
            raise DmmiError(f"{type(self).__name__}.process: {len(types)} types for a batch of {batch} masks")
        try:
            type_ids = [_TYPE_INDEX[t] for t in types]
        except KeyError as e:
            raise DmmiError(f"{type(self).__name__}.process: unknown sample type {e.args[0]!r}; expected one of {', '.join(TYPES)}") from None
        if sample_ids is None:
            ids = [-1] * batch
        else:
            ids = [int(i) for i in sample_ids]
            if len(ids) != batch or min(ids, default=0) < 0:
                raise DmmiError(f"{type(self).__name__}.process: sample_ids must be {batch} non-negative ints")
        rows = torch.stack(
            [inter.cpu(), union.cpu(), pred_area.cpu(), gt_area.cpu(),
             torch.tensor(type_ids, dtype=torch.int64), torch.tensor(ids, dtype=torch.int64)],
            dim=1,
        )  # (B, 6)
        self._local.append(rows)
        self._global = None

    def _local_records(self) -> torch.Tensor:
        return torch.cat(self._local) if self._local else torch.zeros(0, 6, dtype=torch.int64)

    def records(self) -> torch.Tensor:
        """(N, 6) int64 rows (I, U, pred_area, gt_area, type index into TYPES, id or -1):
        global after ``all_reduce``, else this process's."""
        return self._global if self._global is not None else self._local_records()

    def sample_ious(self) -> torch.Tensor:
        """(N,) float64 per-sample IoU (0 where U = 0), in the order of :meth:`records`."""
        return _iou(self.records())

    def all_reduce(self) -> None:
        """Gather every rank's records so that ``evaluate`` gives the global metrics.

        A collective: every rank must call it. A no-op without an initialised process group.
        Idempotent: calling it twice does not count a sample twice. Records are ordered by
        rank; with sample ids, a repeated id keeps its first record.
        """
        local = self._local_records()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self._global = _dedup(local)
            return
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        self._global = _dedup(torch.cat([g for g in gathered if g is not None]))

    def evaluate(self) -> dict:
        raise NotImplementedError


def _dedup(rec: torch.Tensor) -> torch.Tensor:
    """Drop rows whose (non-negative) id was already seen; rows with id -1 are all kept."""
    if rec.numel() == 0 or not bool((rec[:, _ID] >= 0).any()):
        return rec
    seen: set[int] = set()
    keep = []
    for i, sid in enumerate(rec[:, _ID].tolist()):
        if sid >= 0:
            if sid in seen:
                continue
            seen.add(sid)
        keep.append(i)
    return rec[keep]


def _counts(rec: torch.Tensor) -> dict:
    types = rec[:, _TYPE]
    out = {name: int((types == i).sum()) for i, name in enumerate(TYPES)}
    out["targeted"] = out["one"] + out["many"]
    out["total"] = int(rec.shape[0])
    return out


def _dmmi_targeted(rec: torch.Tensor) -> dict:
    """oIoU, mIoU, prec@X over targeted rows (N, 6)."""
    n = rec.shape[0]
    iou = _iou(rec)
    out = {
        "oIoU": _percent(int(rec[:, _I].sum()), int(rec[:, _U].sum())),
        "mIoU": None if n == 0 else 100.0 * float(iou.mean()),
    }
    inter, union = rec[:, _I], rec[:, _U]
    for x in THRESHOLDS:
        # IoU >= x, inclusive, in exact integer arithmetic (I/U >= k/100 <=> 100 I >= k U)
        hits = (union > 0) & (inter * 100 >= round(x * 100) * union)
        out[f"prec@{x}"] = _percent(int(hits.sum()), n)
    return out


def _empty_share(rec: torch.Tensor, want_empty: bool) -> Optional[float]:
    empty = rec[:, _PRED] == 0
    hits = empty if want_empty else ~empty
    return _percent(int(hits.sum()), rec.shape[0])


class DMMIEvaluator(_RecordEvaluator):
    """The DMMI paper's protocol (SPEC §5).

    ``evaluate()`` -> {"protocol": "dmmi", "oIoU", "mIoU", "prec@0.5".."prec@0.9" (over
    one + many), "Acc" (zero samples predicted empty), "counts": {zero, one, many, targeted,
    total}, "per_type": {"one": {oIoU, mIoU, prec@..}, "many": {...}, "zero": {"Acc"}}}.
    Values are percentages or None when undefined.
    """

    protocol = "dmmi"

    def evaluate(self) -> dict:
        return _dmmi_results(self.records())


def _dmmi_results(rec: torch.Tensor) -> dict:
    types = rec[:, _TYPE]
    zero = rec[types == _TYPE_INDEX["zero"]]
    targeted = rec[types != _TYPE_INDEX["zero"]]
    acc = _empty_share(zero, want_empty=True)
    return {
        "protocol": "dmmi",
        **_dmmi_targeted(targeted),
        "Acc": acc,
        "counts": _counts(rec),
        "per_type": {
            "one": _dmmi_targeted(rec[types == _TYPE_INDEX["one"]]),
            "many": _dmmi_targeted(rec[types == _TYPE_INDEX["many"]]),
            "zero": {"Acc": acc},
        },
    }


def _gres_scores(rec: torch.Tensor) -> torch.Tensor:
    """Per-sample GRES IoU: I/U for targeted rows (0 if U = 0); zero rows 1 if predicted empty."""
    is_zero = rec[:, _TYPE] == _TYPE_INDEX["zero"]
    zero_score = (rec[:, _PRED] == 0).double()
    return torch.where(is_zero, zero_score, _iou(rec))


def _gres_block(rec: torch.Tensor) -> dict:
    # a zero sample has gt_area 0, so its U is its predicted area and its I is 0
    n = rec.shape[0]
    return {
        "cIoU": _percent(int(rec[:, _I].sum()), int(rec[:, _U].sum())),
        "gIoU": None if n == 0 else 100.0 * float(_gres_scores(rec).mean()),
    }


class GRESEvaluator(_RecordEvaluator):
    """The GRES protocol (SPEC §5).

    ``evaluate()`` -> {"protocol": "gres", "cIoU", "gIoU" (all samples), "N-acc" (zero
    predicted empty), "T-acc" (targeted predicted non-empty), "counts", "per_type":
    {"one": {cIoU, gIoU, T-acc}, "many": {...}, "zero": {gIoU, N-acc}}}. cIoU is undefined
    for zero samples alone (I is always 0) and left out of their breakdown.
    """

    protocol = "gres"

    def evaluate(self) -> dict:
        return _gres_results(self.records())


def _gres_results(rec: torch.Tensor) -> dict:
    types = rec[:, _TYPE]
    zero = rec[types == _TYPE_INDEX["zero"]]
    targeted = rec[types != _TYPE_INDEX["zero"]]
    per_type = {}
    for name in ("one", "many"):
        part = rec[types == _TYPE_INDEX[name]]
        per_type[name] = {**_gres_block(part), "T-acc": _empty_share(part, want_empty=False)}
    n_acc = _empty_share(zero, want_empty=True)
    per_type["zero"] = {"gIoU": n_acc, "N-acc": n_acc}
    return {
        "protocol": "gres",
        **_gres_block(rec),
        "N-acc": n_acc,
        "T-acc": _empty_share(targeted, want_empty=False),
        "counts": _counts(rec),
        "per_type": per_type,
    }


class CombinedEvaluator(_RecordEvaluator):
    """Both protocols from one pass: ``evaluate()`` -> {"dmmi": {...}, "gres": {...}}."""

    protocol = "combined"

    def evaluate(self) -> dict:
        rec = self.records()
        return {"dmmi": _dmmi_results(rec), "gres": _gres_results(rec)}

    def evaluate_groups(self, group_of: Mapping[int, str]) -> dict:
        """Both protocols per group of samples: ``group_of`` maps a sample id to its group name
        (ids missing from it form no group). -> {group: {"dmmi": ..., "gres": ...}}, groups in
        order of first appearance. Needs the sample ids given to ``process``."""
        rec = self.records()
        if rec.numel() and bool((rec[:, _ID] < 0).any()):
            raise DmmiError("evaluate_groups: samples were processed without sample_ids")
        names = [group_of.get(int(i)) for i in rec[:, _ID].tolist()]
        out = {}
        for name in dict.fromkeys(n for n in names if n is not None):
            rows = rec[[i for i, n in enumerate(names) if n == name]]
            out[name] = {"dmmi": _dmmi_results(rows), "gres": _gres_results(rows)}
        return out


def evaluate_all(pred_masks: torch.Tensor, gt_masks: torch.Tensor, types: Sequence[str]) -> dict:
    """One-shot evaluation of (B, H, W) predictions: {"dmmi": {...}, "gres": {...}}."""
    ev = CombinedEvaluator()
    ev.process(pred_masks, gt_masks, types)
    return ev.evaluate()


_COLUMNS = {
    "dmmi": ["oIoU", "mIoU", *[f"prec@{x}" for x in THRESHOLDS], "Acc"],
    "gres": ["cIoU", "gIoU", "N-acc", "T-acc"],
}
_TITLES = {"dmmi": "DMMI protocol", "gres": "GRES protocol"}


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _table(results: dict) -> str:
    protocol = results["protocol"]
    columns = _COLUMNS[protocol]
    counts = results["counts"]
    rows = [("all", counts["total"], {c: results.get(c) for c in columns})]
    for name in ("one", "many", "zero"):
        rows.append((name, counts[name], results["per_type"].get(name, {})))
    header = [_TITLES[protocol], "n", *columns]
    return _render(header, [[label, str(n), *[_fmt(vals.get(c)) for c in columns]] for label, n, vals in rows])


def _render(header: list[str], cells: list[list[str]]) -> str:
    """Aligned text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])])

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *[line(r) for r in cells]])


def format_group_table(groups: dict, title: str = "wording") -> str:
    """One line per group (DMMI protocol: n per type, oIoU, mIoU, prec@0.5, Acc) of
    :meth:`CombinedEvaluator.evaluate_groups`."""
    columns = ["oIoU", "mIoU", "prec@0.5", "Acc"]
    header = [title, "n", "zero", "one", "many", *columns]
    cells = []
    for name, res in groups.items():
        d = res["dmmi"]
        c = d["counts"]
        cells.append([name, str(c["total"]), str(c["zero"]), str(c["one"]), str(c["many"]),
                      *[_fmt(d.get(k)) for k in columns]])
    return _render(header, cells)


def format_table(results: dict) -> str:
    """A readable text table (percentages, 2 decimals, '—' where undefined) of the result
    of any evaluator above, or of :func:`evaluate_all`."""
    if "protocol" in results:
        return _table(results)
    parts = [_table(results[k]) for k in ("dmmi", "gres") if k in results]
    if not parts:
        raise DmmiError("format_table: expected the result of a dmmi.metrics evaluator")
    return "\n\n".join(parts)
