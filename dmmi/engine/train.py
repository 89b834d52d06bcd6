"""Training: one process on a laptop, or DDP under ``torchrun`` (gloo on CPU, nccl on GPU).

    result = train(load_config("dmmi_lite", ["data.root=DIR"]))

Per run, in ``train.output_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl``
(one JSON record per log step and per evaluation), ``last.pt`` (written atomically after
every epoch and when a time/step budget stops the run; ``--resume`` continues from it
exactly: model, optimiser, scheduler, sampler position, RNG), ``best.pt`` (the model with
the best validation score: never selected on the test split) and ``curves.png``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from dmmi.config import Config
from dmmi.data.datasets import SkipBadSamples, SkipReport, build_dataset, collate_skip_bad, held_out_image
from dmmi.data.erasure import EntityEraser
from dmmi.data.samplers import ZeroSpreadSampler
from dmmi.data.tokenize import load_tokenizer
from dmmi.engine import checkpoint as ckpt
from dmmi.engine.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from dmmi.engine.evaluate import evaluation_loader, run_evaluation, selection_score
from dmmi.engine.fastpath import autocast, cpu_has_native_bf16, prepare_model
from dmmi.engine.optim import build_optimizer, poly_scheduler
from dmmi.errors import DmmiError
from dmmi.losses import dmmi_loss
from dmmi.models import build_model
from dmmi.models.io import save_model_file


@dataclass
class TrainResult:
    output_dir: Path
    best_path: Optional[Path]
    last_path: Path
    best_score: Optional[float]
    steps: int
    epochs_done: float
    minutes: float
    history: list = field(default_factory=list)
    skipped: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in batch.items()}


class MetricsLog:
    """Appends JSON lines on the main process only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _tensorboard(output_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # only when tensorboard is installed
    except Exception:  # noqa: BLE001
        return None
    return SummaryWriter(str(output_dir / "tb"))


def build_datasets(cfg: Config, tokenizer, *, seed: int):
    if not cfg.data.root:
        raise DmmiError("data.root is not set: pass --set data.root=DIR (a folder with <dataset>/refs(...).p)")
    eraser = EntityEraser(tokenizer, cfg.data.erase_token) if (cfg.model.i2t_decoder and cfg.data.erase) else None
    common = dict(tokenizer=tokenizer, image_size=cfg.model.image_size, max_tokens=cfg.model.max_tokens)
    fraction = cfg.data.val_from_train
    if fraction:  # e.g. Ref-ZOM (train / test only): validate on held-out train images
        train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=seed, eraser=eraser,
                                 keep_image=lambda i: not held_out_image(i, fraction), **common)
        val_ds = build_dataset(cfg.data, cfg.data.train_split, train=False,
                               keep_image=lambda i: held_out_image(i, fraction), **common)
        return train_ds, val_ds
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=seed, eraser=eraser, **common)
    val_ds = None
    if cfg.data.val_split:
        if cfg.data.val_split == cfg.data.test_split:
            raise DmmiError(f"data.val_split = data.test_split = {cfg.data.val_split!r}: the best model must not be "
                            "selected on the test split")
        try:
            val_ds = build_dataset(cfg.data, cfg.data.val_split, train=False, **common)
        except DmmiError as e:
            if "split" not in str(e):
                raise
            val_ds = None  # e.g. Ref-ZOM has no val split: no best-model selection
    return train_ds, val_ds


def train(cfg: Config, *, resume: Optional[str] = None, progress: bool = True, log=print) -> TrainResult:
    """Train ``cfg`` (see the module docstring). Returns where everything was written."""
    t_start = time.time()
    info: DistInfo = init_distributed(cfg.train.device)
    device = info.device
    try:
        return _train(cfg, info, device, resume=resume, progress=progress, log=log, t_start=t_start)
    finally:
        cleanup()


def _train(cfg: Config, info: DistInfo, device, *, resume, progress, log, t_start) -> TrainResult:
    tc = cfg.train
    out_dir = Path(tc.output_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")
    seed_everything(tc.seed + info.rank)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # Adam's tiny second moments otherwise crawl on CPU
        if cfg.data.workers and (os.cpu_count() or 1) > 1:
            # leave the loader workers their cores: oversubscribed OpenMP threads spin and crawl
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.data.workers) // max(1, info.world_size) or 1)

    tokenizer = load_tokenizer(cfg.model.text_encoder)
    train_ds, val_ds = build_datasets(cfg, tokenizer, seed=tc.seed)
    if len(train_ds) < tc.batch_size * info.world_size:
        raise DmmiError(f"split {cfg.data.train_split!r} has {len(train_ds)} items, fewer than one batch "
                        f"({tc.batch_size} x {info.world_size} processes)")
    sampler = ZeroSpreadSampler(train_ds.types if cfg.data.zero_sampler else ["one"] * len(train_ds),
                                num_replicas=info.world_size, rank=info.rank, seed=tc.seed)
    loader = DataLoader(SkipBadSamples(train_ds), batch_size=tc.batch_size, sampler=sampler,
                        num_workers=cfg.data.workers, pin_memory=device.type == "cuda", drop_last=True,
                        collate_fn=collate_skip_bad, persistent_workers=False)
    val_loader = evaluation_loader(val_ds, cfg, info) if val_ds is not None else None

    model = build_model(cfg.model)
    model = prepare_model(model, device, fast=tc.fast, compile=False)
    if info.distributed:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        core = ddp.module
    else:
        ddp, core = model, model
    step_model = torch.compile(ddp) if tc.compile else ddp
    optimizer = build_optimizer(core, tc, fused=tc.fast)
    steps_per_epoch = max(1, len(loader) // tc.grad_accum)
    total_steps = steps_per_epoch * tc.epochs
    budget_s = tc.max_minutes * 60 if tc.max_minutes else math.inf
    seconds_before = 0.0  # training seconds of earlier segments of a resumed run
    t_train = time.time()  # this segment's start (reset when the loop begins)

    def elapsed() -> float:
        return seconds_before + time.time() - t_train

    def budget_progress(step: int) -> float:  # train.schedule=budget: share of max_minutes / max_steps spent
        return max(elapsed() / budget_s, step / tc.max_steps if tc.max_steps else 0.0)

    # schedule=epochs: max_steps / max_minutes cut the run, not the schedule
    scheduler = poly_scheduler(optimizer, total_steps, tc.poly_power,
                               progress=budget_progress if tc.schedule == "budget" else None)
    cpu_bf16 = bool(tc.cpu_bf16 and device.type == "cpu" and tc.fast)
    if cpu_bf16 and not cpu_has_native_bf16():
        cpu_bf16 = False
        if info.is_main:
            log("train.cpu_bf16: this CPU has no native bf16 (AMX / AVX512-BF16): training in fp32")

    start_epoch, start_batch, global_step, best = 0, 0, 0, None
    if resume:
        state = ckpt.load_checkpoint(resume)
        extra = state["extra"]
        if extra.get("preset") != cfg.preset or extra.get("config", {}).get("model") != cfg.to_dict()["model"]:
            raise DmmiError(f"{resume}: checkpoint of another model (preset {extra.get('preset')!r}, this run is "
                            f"{cfg.preset!r}); resume with the same config")
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_batch = int(extra["epoch"]), int(extra["batch_in_epoch"])
        global_step, best = int(extra["global_step"]), extra.get("best_score")
        seconds_before = float(extra.get("train_seconds", 0.0))
        if extra.get("rng") is not None:
            ckpt.restore_rng_state(extra["rng"])
        log(f"resumed from {resume}: epoch {start_epoch}, batch {start_batch}, step {global_step}")

    metrics = MetricsLog(out_dir / "metrics.jsonl", info.is_main)
    tb = _tensorboard(out_dir, info.is_main)
    skips = SkipReport()
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    t_train = time.time()
    stop = False
    epoch = start_epoch
    if info.is_main:
        log(f"training {cfg.preset}: {len(train_ds)} items, {steps_per_epoch} steps/epoch x {tc.epochs} epochs "
            f"on {device} x {info.world_size}" + (f", budget {tc.max_minutes:g} min" if tc.max_minutes else ""))

    def save_last(epoch_: int, batch_: int) -> None:
        if not info.is_main:
            return
        extra = {"preset": cfg.preset, "config": cfg.to_dict(), "epoch": epoch_, "batch_in_epoch": batch_,
                 "global_step": global_step, "best_score": best, "rng": ckpt.capture_rng_state(),
                 "train_seconds": elapsed()}
        ckpt.save_checkpoint(last_path, model_state=core.state_dict(), optimizer_state=optimizer.state_dict(),
                             scheduler_state=scheduler.state_dict(), extra=extra)

    for epoch in range(start_epoch, tc.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        if epoch == start_epoch and start_batch:
            sampler.load_state_dict(sampler.state_dict(position=start_batch * tc.batch_size))
        ddp.train()
        bar = None
        if progress and info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loader), initial=start_batch if epoch == start_epoch else 0,
                       desc=f"epoch {epoch + 1}/{tc.epochs}", dynamic_ncols=True, leave=False)
        batch_index = start_batch if epoch == start_epoch else 0
        running = {}
        for batch in loader:
            skips.update(batch)
            if batch["index"].numel() == 0:
                batch_index += 1
                continue
            batch = to_device(batch, device)
            with autocast(device, tc.fast, cpu_bf16=cpu_bf16):
                out = step_model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["erased_ids"])
                terms = dmmi_loss(out, batch["mask"], batch["attention_mask"], batch["delta"], cfg.loss,
                                  compat=cfg.model.compat == "ris-dmmi")
            (terms.total / tc.grad_accum).backward()
            for k, v in terms.as_dict().items():  # accumulate on device: no host sync per step
                running[k] = running.get(k, 0.0) + v.detach().float()
            running["n"] = running.get("n", 0) + 1
            batch_index += 1
            if batch_index % tc.grad_accum:
                continue
            if tc.clip_grad:
                torch.nn.utils.clip_grad_norm_(core.parameters(), tc.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if bar is not None:
                bar.update(tc.grad_accum)
            if global_step % tc.log_every == 0:
                n = running.pop("n")
                rec = {"step": global_step, "epoch": epoch + batch_index / len(loader),
                       "lr": optimizer.param_groups[0]["lr"], "minutes": elapsed() / 60}
                rec.update({k: float(v) / n for k, v in running.items()})  # one host sync per log step
                running = {}
                metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}")
                if tb is not None:
                    for k, v in rec.items():
                        tb.add_scalar(f"train/{k}", v, global_step)
                # budget checks agree across ranks (checked at log steps only: no per-step sync)
                over = elapsed() > budget_s or (tc.max_steps and global_step >= tc.max_steps)
                flag = torch.tensor([1.0 if over else 0.0], device=device)
                stop = bool(all_reduce_sum(flag).item() > 0) if info.distributed else bool(over)
                if stop:
                    break
        if bar is not None:
            bar.close()
        finished_epoch = not stop or batch_index >= len(loader)
        resume_at = (epoch + 1, 0) if finished_epoch else (epoch, batch_index)
        if val_loader is not None and ((epoch + 1) % tc.eval_every == 0 or stop or epoch + 1 == tc.epochs):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                # evaluation must not move the training RNG: a resumed run continues exactly
                results, vskips = run_evaluation(core, val_loader, device, fast=tc.fast,
                                                 progress=progress and info.is_main, desc="validation")
            score = selection_score(results)
            rec = {"step": global_step, "epoch": epoch + batch_index / max(1, len(loader)),
                   "minutes": elapsed() / 60, "val": results, "val_score": score,
                   "val_skipped": vskips.count}
            metrics.write(rec)
            if info.is_main:
                log(f"epoch {epoch + 1}: validation score {score:.2f} "
                    f"(oIoU {_fmt(results['dmmi']['oIoU'])}, Acc {_fmt(results['dmmi']['Acc'])})")
                if best is None or score > best:
                    best = score
                    save_model_file(best_path, core, cfg, extra={"val": results, "step": global_step})
        save_last(*resume_at)
        if stop:
            break
    barrier()
    if info.is_main and not best_path.exists():
        save_model_file(best_path, core, cfg, extra={"step": global_step, "note": "no validation split: last model"})
    if info.is_main and metrics.records:
        try:
            from dmmi.visualize import plot_curves

            logged = {k for r in metrics.records for k in r}
            if "val" in logged:
                logged |= {"val.dmmi.oIoU", "val.dmmi.Acc"}
            # ablations without CCR / contrastive head log no loss_sim / loss_con: plot what exists
            keys = [k for k in ("loss", "loss_ce", "loss_sim", "loss_con", "loss_empty", "val.dmmi.oIoU", "val.dmmi.Acc")
                    if k in logged]
            plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png", keys=keys)
        except Exception as e:  # noqa: BLE001 - a plot never fails a run
            log(f"(could not draw curves: {e})")
    if skips.count and info.is_main:
        log(skips.summary())
    minutes = (time.time() - t_start) / 60
    return TrainResult(output_dir=out_dir, best_path=best_path if best_path.exists() else None,
                       last_path=last_path, best_score=best, steps=global_step,
                       epochs_done=epoch + (1 if not stop else 0), minutes=minutes,
                       history=metrics.records, skipped=skips.count)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"
