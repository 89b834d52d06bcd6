"""Dataset statistics per split and per target type (``dmmi data stats``).

Counts, for each split and for each type (zero / one / many / all):

* ``images``: distinct images with at least one such ref;
* ``refs``: ref records;
* ``sentences``: expressions (sentences of those refs);
* ``objects``: distinct target annotations (zero-target refs add none).

For Ref-ZOM the paper gives 55,078 images and 74,942 objects (train 43,749 / 58,356,
test 11,329 / 16,586). Only the annotation files are read, never the images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from dmmi.data.refer import TYPES, Ref, load_refs

COLUMNS = ("images", "refs", "sentences", "objects")
ROWS = TYPES + ("all",)


def _count(refs: Iterable[Ref]) -> dict[str, int]:
    refs = list(refs)
    return {
        "images": len({r.image_id for r in refs}),
        "refs": len(refs),
        "sentences": sum(len(r.sentences) for r in refs),
        "objects": len({a for r in refs for a in r.ann_ids}),
    }


def _by_type(refs: list[Ref]) -> dict[str, dict[str, int]]:
    out = {t: _count(r for r in refs if r.type == t) for t in TYPES}
    out["all"] = _count(refs)
    return out


def dataset_stats(root: str | Path, format: str = "refzom", dataset: Optional[str] = None,
                  split_by: Optional[str] = None) -> dict:
    """``{"dataset", "format", "split_by", "files", "splits": {split: {type: counts}}, "total": {type: counts}}``.

    ``type`` is zero / one / many / all, ``counts`` has images, refs, sentences, objects.
    ``total`` counts distinct images/objects over all splits (not the sum, if splits share).
    """
    data = load_refs(root, format, dataset, split_by)
    return {
        "dataset": data.dataset,
        "format": data.format,
        "split_by": data.split_by,
        "files": [str(data.refs_path), str(data.instances_path)],
        "splits": {s: _by_type(data.split(s)) for s in data.splits()},
        "total": _by_type(data.refs),
    }


def format_stats(stats: dict) -> str:
    """A plain-text table of :func:`dataset_stats` (one line per split and type)."""
    head = f"{stats['dataset']} ({stats['format']}, splitBy {stats['split_by']})"
    rows = [("split", "type") + COLUMNS]
    blocks = list(stats["splits"].items()) + [("total", stats["total"])]
    for split, by_type in blocks:
        for t in ROWS:
            c = by_type[t]
            rows.append((split if t == ROWS[0] else "", t) + tuple(f"{c[k]:,}" for k in COLUMNS))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head]
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [v.rjust(w) for v, w in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)
