"""Evaluation with both protocols of SPEC §5 (DMMI and GRES) and a per-type breakdown.

    results, skipped = run_evaluation(model, loader, device)

Works under ``torchrun``: each rank evaluates a shard, the per-sample counts are gathered
(duplicates from sampler padding removed by sample index) and every rank ends with the
global figures. Bad samples (missing / corrupt images) are skipped and counted. A
:class:`GalleryCollector` keeps the best and worst examples of each type for overlays.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from dmmi.data.datasets import SkipBadSamples, SkipReport, collate_skip_bad
from dmmi.data.transforms import denormalize
from dmmi.engine.fastpath import autocast
from dmmi.decision import decide_masks
from dmmi.errors import DmmiError
from dmmi.metrics import CombinedEvaluator, mask_counts

TYPES = ("zero", "one", "many")


def evaluation_loader(dataset, cfg, info=None) -> DataLoader:
    """A sharded (under DDP), non-shuffled loader that skips bad samples."""
    if info is not None and info.distributed:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=False)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(SkipBadSamples(dataset), batch_size=cfg.eval.batch_size, sampler=sampler,
                      num_workers=cfg.data.workers, collate_fn=collate_skip_bad,
                      pin_memory=info is not None and info.device.type == "cuda")


def selection_score(results: dict) -> float:
    """What picks the best model on the validation split: mean of oIoU and zero-target Acc
    when the split has zero-target samples, else oIoU (both in %)."""
    d = results["dmmi"]
    o = d["oIoU"] if d["oIoU"] is not None else 0.0
    return o if d["Acc"] is None else 0.5 * (o + d["Acc"])


class GalleryCollector:
    """Keeps the ``k`` best and ``k`` worst samples of each type (by IoU; zero: by predicted area)."""

    def __init__(self, k: int = 4):
        self.k = k
        self.best: dict = {t: [] for t in TYPES}
        self.worst: dict = {t: [] for t in TYPES}
        self._n = 0

    def offer(self, batch: dict, pred: torch.Tensor) -> None:
        inter, union, pred_area, _ = mask_counts(pred, batch["mask"].bool())
        for i, t in enumerate(batch["type"]):
            if t == "zero":
                score = -float(pred_area[i])  # empty prediction is best
            else:
                score = float(inter[i]) / float(union[i]) if union[i] > 0 else 0.0
            self._n += 1
            sample = {"image": batch["image"][i].cpu(), "pred": pred[i].cpu(), "gt": batch["mask"][i].cpu(),
                      "text": batch["sentence"][i], "type": t, "iou": None if t == "zero" else score}
            for heap, key in ((self.best[t], score), (self.worst[t], -score)):
                entry = (key, self._n, sample)
                if len(heap) < self.k:
                    heapq.heappush(heap, entry)
                elif key > heap[0][0]:
                    heapq.heapreplace(heap, entry)

    def write(self, out_dir: str | Path) -> list[Path]:
        """The overlays as ``<type>_<successes|failures>.png``; an unwritable place is a one-line DmmiError."""
        try:
            return self._write(Path(out_dir))
        except OSError as e:
            raise DmmiError(f"--gallery {out_dir}: cannot write the overlays ({e.strerror or e})") from None

    def _write(self, out_dir: Path) -> list[Path]:
        from dmmi.visualize import GalleryItem, gallery

        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for kind, heaps in (("successes", self.best), ("failures", self.worst)):
            for t in TYPES:
                entries = sorted(heaps[t], key=lambda e: -e[0])
                if not entries:
                    continue
                items = [GalleryItem(image=to_uint8(e[2]["image"]), mask=e[2]["pred"].numpy(),
                                     text=e[2]["text"], type=t, iou=e[2]["iou"], gt_mask=e[2]["gt"].numpy())
                         for e in entries]
                written.append(gallery(items, out_dir / f"{t}_{kind}.png", columns=min(4, len(items))))
        return written


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised -> (H, W, 3) uint8."""
    x = denormalize(image.float().cpu()).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95


@torch.no_grad()
def run_evaluation(model, loader, device, *, fast: bool = True, progress: bool = True, desc: str = "evaluate",
                   gallery: Optional[GalleryCollector] = None, group_of: Optional[Mapping[int, str]] = None,
                   sweep: Optional[Sequence[float]] = None, threshold: Optional[float] = None,
                   min_area: float = 0.0):
    """-> (results {"dmmi": ..., "gres": ...}, SkipReport). ``model``: an unwrapped DMMI.
    ``group_of`` (dataset index -> group name) adds ``results["groups"]``, both protocols per group.
    ``sweep`` (thresholds in (0, 1)) adds ``results["sweep"]``: [{"threshold", "dmmi", "gres"}, ...],
    the masks "foreground probability > threshold" from the same forward passes. ``threshold`` /
    ``min_area``: the no-target decision of the main figures (:func:`decide_masks`; the sweep
    applies ``min_area`` at each of its thresholds)."""
    was_training = model.training
    model.eval()
    evaluator = CombinedEvaluator()
    swept = [(float(t), CombinedEvaluator()) for t in (sweep or ())]
    skips = SkipReport()
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc=desc, dynamic_ncols=True, leave=False)
    for batch in iterator:
        skips.update(batch)
        if batch["index"].numel() == 0:
            continue
        images = batch["image"].to(device, non_blocking=True)
        with autocast(device, fast):
            out = model(images, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        pred = decide_masks(out.logits, threshold, min_area).cpu()  # the argmax by default, as out.masks()
        evaluator.process(pred, batch["mask"], list(batch["type"]), sample_ids=batch["index"])
        for t, ev in swept:
            ev.process(decide_masks(out.logits, t, min_area).cpu(), batch["mask"], list(batch["type"]),
                       sample_ids=batch["index"])
        if gallery is not None:
            gallery.offer(batch, pred)
    evaluator.all_reduce()
    for _, ev in swept:
        ev.all_reduce()
    model.train(was_training)
    results = evaluator.evaluate()
    if swept:
        results["sweep"] = [{"threshold": t, **ev.evaluate()} for t, ev in swept]
    if group_of is not None:
        results["groups"] = evaluator.evaluate_groups(group_of)
    return results, skips


def evaluate_checkpoint(checkpoint, *, data_root=None, split=None, overrides=(), device="auto", fast=True,
                        gallery_dir=None, progress=True, by_wording=False, sweep=None, threshold=None,
                        min_area=0.0):
    """Load a model file, evaluate it on a split. -> (results, SkipReport, info dict).
    ``by_wording``: also both protocols per wording category (:mod:`dmmi.data.wording`) in
    ``results["groups"]``. ``threshold`` / ``min_area``: the no-target decision (:func:`decide_masks`)."""
    from dmmi.config import Config, apply_overrides
    from dmmi.data.datasets import build_dataset
    from dmmi.data.tokenize import load_tokenizer
    from dmmi.engine.distributed import all_reduce_sum, cleanup, init_distributed
    from dmmi.engine.fastpath import prepare_model
    from dmmi.models.io import load_model_file

    if gallery_dir is not None and Path(gallery_dir).exists() and not Path(gallery_dir).is_dir():
        raise DmmiError(f"--gallery {gallery_dir} is a file, not a folder")  # before the long work
    info = init_distributed(device, option="--device", fix="--device cpu")
    try:
        model, cfg = load_model_file(checkpoint)
        if overrides:  # evaluate may change where the data lies and how it is read, not the model
            cfg = Config.from_dict(apply_overrides(cfg.to_dict(), overrides, sections=("data", "eval")),
                                   source="--set")
        if data_root:
            cfg.data.root = str(data_root)
        if not cfg.data.root:
            raise DmmiError("no dataset: pass --data DIR (the folder holding <dataset>/refs(...).p)")
        split = split or cfg.data.test_split
        tokenizer = load_tokenizer(cfg.model.text_encoder)
        dataset = build_dataset(cfg.data, split, tokenizer=tokenizer, image_size=cfg.model.image_size,
                                max_tokens=cfg.model.max_tokens, train=False)
        loader = evaluation_loader(dataset, cfg, info)
        collector = GalleryCollector(cfg.eval.gallery) if gallery_dir else None
        group_of = None
        if by_wording:
            from dmmi.data.wording import CATEGORIES, wording_category

            group_of = {i: wording_category(dataset.sentence_at(i)) for i in range(len(dataset))}
        model = prepare_model(model, info.device, fast=fast)
        results, skips = run_evaluation(model, loader, info.device, fast=fast, progress=progress and info.is_main,
                                        gallery=collector, group_of=group_of, sweep=sweep, threshold=threshold,
                                        min_area=min_area)
        if by_wording:  # in the categories' order
            results["groups"] = {k: results["groups"][k] for k in CATEGORIES if k in results["groups"]}
        if info.distributed:
            skips.count = int(all_reduce_sum(torch.tensor([skips.count], device=info.device)).item())
        meta = {"preset": cfg.preset, "dataset": cfg.data.dataset, "split": split, "samples": len(dataset),
                "checkpoint": str(checkpoint), "is_main": info.is_main, "world_size": info.world_size,
                "threshold": threshold, "min_area": min_area}
        if collector is not None and info.is_main:
            try:
                collector.write(gallery_dir)
            except DmmiError as e:  # an extra: the finished evaluation is still returned (and printed, saved)
                meta["gallery_error"] = str(e)
        return results, skips, meta
    finally:
        cleanup()


def format_sweep(sweep: list[dict]) -> str:
    """The threshold sweep as a table: DMMI oIoU / mIoU / Acc and GRES cIoU / gIoU / N-acc per threshold."""
    from dmmi.metrics import _render

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    rows = [[f"{r['threshold']:.2f}", f(r["dmmi"]["oIoU"]), f(r["dmmi"]["mIoU"]), f(r["dmmi"]["Acc"]),
             f(r["gres"]["cIoU"]), f(r["gres"]["gIoU"]), f(r["gres"]["N-acc"])] for r in sweep]
    return _render(["threshold", "oIoU", "mIoU", "Acc", "cIoU", "gIoU", "N-acc"], rows)


def plot_sweep(sweep: list[dict], out_png: str | Path, title: str = "") -> Path:
    """Two panels: zero-target Acc vs oIoU (DMMI) and N-acc vs cIoU (GRES), one point per threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (x_key, y_key, proto) in zip(axes, (("oIoU", "Acc", "dmmi"), ("cIoU", "N-acc", "gres"))):
        points = [(r[proto][x_key], r[proto][y_key], r["threshold"]) for r in sweep
                  if r[proto][x_key] is not None and r[proto][y_key] is not None]
        if points:
            xs, ys, ts = zip(*points)
            ax.plot(xs, ys, "-o", color="#1f77b4", markersize=4, label="p(foreground) > t")
            half = [(x, y) for x, y, t in points if abs(t - 0.5) < 1e-9]
            if half:
                ax.plot(*half[0], "o", color="#d62728", markersize=8, label="t = 0.5 (the paper's argmax)")
            ax.legend(loc="best", fontsize=8)
            for x, y, t in points:
                if round(t * 20) % 2 == 0 or abs(t - 0.5) < 1e-9:  # label every 0.1 (and 0.5, the argmax)
                    ax.annotate(f"{t:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"{x_key} (%)")
        ax.set_ylabel(f"{y_key} (%)")
        ax.set_title(f"{proto.upper()}: {y_key} vs {x_key}, threshold on p(foreground)")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
