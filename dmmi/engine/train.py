"""Training: one process on a laptop, or DDP under ``torchrun`` (gloo on CPU, nccl on GPU).

    result = train(load_config("dmmi_lite", ["data.root=DIR"]))

Per run, in ``train.output_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl``
(one JSON record per log step and per evaluation), ``last.pt`` (written atomically after
every epoch and when a time/step budget stops the run; ``--resume`` continues from it
exactly: model, optimiser, scheduler, sampler position, every rank's RNG), ``best.pt`` (the
model with the best validation score: never selected on the test split) and ``curves.png``.

``train.batch_size`` is the global batch of one optimiser step: each of W devices takes
batch_size / (W x grad_accum) samples per micro-step (:class:`BatchPlan`), and step b trains
on the same samples whatever W and grad_accum are (:class:`ZeroSpreadSampler` deals them out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from dmmi.config import Config, TrainConfig
from dmmi.data.datasets import SkipBadSamples, SkipReport, build_dataset, collate_skip_bad, held_out_image
from dmmi.data.erasure import EntityEraser
from dmmi.data.samplers import ZeroSpreadSampler
from dmmi.data.tokenize import load_tokenizer
from dmmi.engine import checkpoint as ckpt
from dmmi.engine.distributed import DistInfo, agree_max, barrier, cleanup, gather_objects, init_distributed
from dmmi.engine.evaluate import evaluation_loader, run_evaluation, selection_score
from dmmi.engine.compiled import loss_step
from dmmi.engine.fastpath import cpu_has_native_bf16, prepare_model
from dmmi.engine.optim import build_optimizer, poly_scheduler
from dmmi.errors import DmmiError
from dmmi.losses import LossTerms
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
    skipped: int = 0  # bad samples over all ranks
    model: Optional[torch.nn.Module] = field(default=None, repr=False)  # the trained model (unwrapped, this rank's)
    interrupted: Optional[str] = None  # "SIGTERM" / "SIGINT" when a signal stopped the run (last.pt is saved)


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

    def keep_until(self, step: int) -> int:
        """On resume: drop the records of steps after ``step`` (logged by a run killed after its last
        checkpoint; the resumed run logs them again), rewriting the file atomically. -> records dropped."""
        if not self.path.is_file():
            return 0
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in records if int(r.get("step", 0)) <= step]
        self.records = kept
        if self.enabled and len(kept) != len(records):
            ckpt.atomic_write(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        return len(records) - len(kept)


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
    if fraction and cfg.data.val_split:
        raise DmmiError(f"data.val_split={cfg.data.val_split!r} and data.val_from_train={fraction:g} both choose the "
                        "validation images: set data.val_split=null to hold out train images, or "
                        "data.val_from_train=0 to validate on the split")
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
        val_ds = build_dataset(cfg.data, cfg.data.val_split, train=False, **common)  # a missing split: one line
    return train_ds, val_ds


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch of one optimiser step (``train.batch_size``) is split:
    global = per_device x devices x accumulation (micro-steps)."""

    global_batch: int
    per_device: int
    devices: int
    accumulation: int

    @classmethod
    def of(cls, tc, devices: int) -> "BatchPlan":
        share = devices * tc.grad_accum
        if tc.batch_size % share:
            raise DmmiError(f"train.batch_size={tc.batch_size} (the global batch) does not divide into {devices} "
                            f"device(s) x train.grad_accum={tc.grad_accum}: use a multiple of {share}")
        return cls(tc.batch_size, tc.batch_size // share, devices, tc.grad_accum)

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_device} per device x {self.devices} device"
                f"{'s' if self.devices != 1 else ''} x accumulation {self.accumulation}")


def scaled_learning_rates(tc: TrainConfig) -> tuple[TrainConfig, str]:
    """``train.lr_scaling=linear``: lr and text_lr x batch_size / lr_batch. -> (config, log text)."""
    if tc.lr_scaling != "linear" or tc.batch_size == tc.lr_batch:
        return tc, f"lr {tc.lr:g}"
    factor = tc.batch_size / tc.lr_batch
    scaled = dataclasses.replace(tc, lr=tc.lr * factor, text_lr=None if tc.text_lr is None else tc.text_lr * factor)
    return scaled, f"lr {scaled.lr:g} (linear scaling: {tc.lr:g} x {tc.batch_size} / {tc.lr_batch})"


def selection_note(cfg: Config) -> str:
    """One line: which images pick ``best.pt``."""
    d = cfg.data
    if d.val_split:
        return f"model selection on split {d.val_split!r}"
    if d.val_from_train:
        why = "; Ref-ZOM has no val split" if d.dataset == "ref-zom" else ""
        return (f"model selection on {d.val_from_train:.0%} of the train images, held out "
                f"(data.val_from_train={d.val_from_train:g}{why})")
    return "no model selection (data.val_split is null, data.val_from_train 0): best.pt is the last model"


@dataclass
class RunState:
    """Where the run is: the next step is step ``step_in_epoch`` of ``epoch``."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: Optional[float] = None
    seconds_before: float = 0.0  # training seconds of earlier segments of a resumed run


RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")


def check_output_dir(output_dir: str | Path, resume: Optional[str]) -> Optional[str]:
    """Decide, before anything is written, what a run may do with ``train.output_dir``.

    -> the checkpoint to resume from (None: a new run). A new run needs an empty or new folder
    (a folder that holds a run is never replaced or mixed); ``resume="auto"`` continues from the
    folder's ``last.pt`` when there is one and starts a new run in an empty folder. Temporary
    files of a write that was killed do not count (they are removed when the run starts).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DmmiError(f"train.output_dir {out} is a file, not a folder")
    ckpt.check_writable_folder(out, "train.output_dir")
    stale = set(ckpt.temporary_files(out)) if out.is_dir() else set()
    held = sorted(p.name for p in out.iterdir() if p not in stale) if out.is_dir() else []
    if resume == "auto":
        if (out / "last.pt").is_file():
            return str(out / "last.pt")
        if not held:
            return None
        raise DmmiError(f"--resume auto: {out} holds no last.pt but is not empty ({', '.join(held[:4])}); "
                        "choose another train.output_dir")
    if resume:
        return resume
    if held:
        what = ", ".join(n for n in held if n in RUN_FILES) or ", ".join(held[:4])
        raise DmmiError(f"train.output_dir {out} already holds a run ({what}): continue it with --resume auto, "
                        "or choose another train.output_dir (nothing was changed)")
    return None


def check_resume_config(state: dict, path: str, cfg: Config) -> None:
    """One-line DmmiError unless checkpoint ``state`` (read from ``path``) holds ``cfg``'s model."""
    extra = state["extra"]
    if extra.get("preset") != cfg.preset or extra.get("config", {}).get("model") != cfg.to_dict()["model"]:
        raise DmmiError(f"{path}: checkpoint of another model (preset {extra.get('preset')!r}, this run is "
                        f"{cfg.preset!r}); resume with the same config")


def train(cfg: Config, *, resume: Optional[str] = None, progress: bool = True, log=print) -> TrainResult:
    """Train ``cfg`` (see the module docstring). Returns where everything was written.

    ``resume``: a ``last.pt``, or ``"auto"`` (the output folder's ``last.pt`` if there is one).
    SIGTERM / SIGINT stop the run at the next step boundary with ``last.pt`` saved
    (``result.interrupted`` names the signal)."""
    info: DistInfo = init_distributed(cfg.train.device)
    try:
        decision = None
        if info.is_main:
            try:
                decision = ("ok", check_output_dir(cfg.train.output_dir, resume))
            except DmmiError as e:
                decision = ("error", str(e))
        kind, value = gather_objects(decision)[0]  # every rank follows rank 0's reading of the folder
        if kind == "error":
            raise DmmiError(value)
        state = None
        if value:  # read and matched with cfg before the Trainer writes into the output folder
            state = ckpt.load_checkpoint(value)
            check_resume_config(state, value, cfg)
        trainer = Trainer(cfg, info, progress=progress, log=log)
        if value:
            trainer.resume(value, state=state)
        elif resume == "auto" and info.is_main:
            log(f"--resume auto: no last.pt in {cfg.train.output_dir}: a new run")
        return trainer.run()
    finally:
        cleanup()


class Trainer:
    """One training run, in phases::

        trainer = Trainer(cfg, info)        # set-up: data, model, optimiser, schedule, output folder
        trainer.resume("runs/x/last.pt")    # optional: model, optimiser, schedule, position, RNG per rank
        result = trainer.run()              # epochs of steps; validation + last.pt at each epoch end

    Every rank takes the same decisions: skipping a micro-batch that some rank could not fill,
    the budget schedule's clock and the stop come from one host-side agreement per step
    (:func:`dmmi.engine.distributed.agree_max`, no device sync).
    """

    def __init__(self, cfg: Config, info: DistInfo, *, progress: bool = True, log=print):
        self.cfg, self.tc, self.info, self.device = cfg, cfg.train, info, info.device
        self.progress, self.log = progress, log
        self.t_start = time.time()
        self.plan = BatchPlan.of(cfg.train, info.world_size)
        if cfg.model.i2t_decoder and not cfg.data.erase:
            raise DmmiError("data.erase=false with model.i2t_decoder=true: the CCR branch would reconstruct the "
                            "sentence from itself (L_sim compares it with itself); turn model.i2t_decoder off for "
                            "that ablation")
        self.out_dir = Path(self.tc.output_dir)
        self.clock = 0.0  # training seconds at the start of the current step, agreed by all ranks
        self._t_segment = time.time()  # this segment's start (reset when the loop begins)
        self._setup_process()
        self._setup_data()
        self._setup_model()
        self.state = RunState()
        self.skips, self.dropped, self.skipped_steps = SkipReport(), 0, 0
        self.running: dict = {}
        self.signal: Optional[str] = None  # set by SIGTERM / SIGINT, acted on at the next step boundary
        self.interrupted: Optional[str] = None
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for tmp in ckpt.temporary_files(self.out_dir):  # left by a process killed mid-write
                tmp.unlink(missing_ok=True)
            cfg.save(self.out_dir / "config.yaml")
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", info.is_main)
        self.tb = _tensorboard(self.out_dir, info.is_main)
        self.last_path, self.best_path = self.out_dir / "last.pt", self.out_dir / "best.pt"
        self.model_dir = self.out_dir / "model"  # best.pt as a Hub-style model directory, written at the end

    # ------------------------------------------------------------------ set-up
    def _setup_process(self) -> None:
        seed_everything(self.tc.seed + self.info.rank)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # Adam's tiny second moments otherwise crawl on CPU
            workers, cores = self.cfg.data.workers, os.cpu_count() or 1
            if workers and cores > 1:
                # leave the loader workers their cores: oversubscribed OpenMP threads spin and crawl
                torch.set_num_threads(max(1, cores - workers) // max(1, self.info.world_size) or 1)

    def _setup_data(self) -> None:
        cfg, plan, info = self.cfg, self.plan, self.info
        tokenizer = load_tokenizer(cfg.model.text_encoder)
        self.train_ds, val_ds = build_datasets(cfg, tokenizer, seed=self.tc.seed)
        if len(self.train_ds) < plan.global_batch:
            raise DmmiError(f"split {cfg.data.train_split!r} has {len(self.train_ds)} items, fewer than one global "
                            f"batch (train.batch_size={plan.global_batch})")
        types = self.train_ds.types if cfg.data.zero_sampler else ["one"] * len(self.train_ds)
        self.sampler = ZeroSpreadSampler(types, num_replicas=info.world_size, rank=info.rank, seed=self.tc.seed,
                                         batch_size=plan.per_device, global_batch=plan.global_batch)
        self.loader = DataLoader(SkipBadSamples(self.train_ds), batch_size=plan.per_device, sampler=self.sampler,
                                 num_workers=cfg.data.workers, pin_memory=self.device.type == "cuda", drop_last=True,
                                 collate_fn=collate_skip_bad, persistent_workers=False)
        self.steps_per_epoch = len(self.train_ds) // plan.global_batch
        self.val_loader = evaluation_loader(val_ds, cfg, info) if val_ds is not None else None

    def _setup_model(self) -> None:
        tc, info = self.tc, self.info
        model = prepare_model(build_model(self.cfg.model), self.device, fast=tc.fast, compile=False)
        model.visual.set_grad_checkpointing(tc.grad_checkpoint)
        if info.distributed:
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.core = self.ddp.module
        else:
            self.ddp = self.core = model
        scaled, self.lr_note = scaled_learning_rates(tc)
        self.optimizer = build_optimizer(self.core, scaled, fused=tc.fast)
        self.budget_s = tc.max_minutes * 60 if tc.max_minutes else math.inf
        # schedule=epochs: max_steps / max_minutes cut the run, not the schedule
        self.scheduler = poly_scheduler(self.optimizer, self.steps_per_epoch * tc.epochs, tc.poly_power,
                                        progress=self._budget_progress if tc.schedule == "budget" else None)
        self.cpu_bf16 = bool(tc.cpu_bf16 and self.device.type == "cpu" and tc.fast)
        if self.cpu_bf16 and not cpu_has_native_bf16():
            self.cpu_bf16 = False
            if info.is_main:
                self.log("train.cpu_bf16: this CPU has no native bf16 (AMX / AVX512-BF16): training in fp32")
        # forward + loss of a micro-batch; train.compile: one fullgraph torch.compile graph (DDP: its
        # DDPOptimizer splits it at the gradient buckets)
        self.loss_step = loss_step(self.ddp, self.cfg.loss, self.device, fast=tc.fast, cpu_bf16=self.cpu_bf16,
                                   compat=self.cfg.model.compat == "ris-dmmi", compile=tc.compile)

    def _budget_progress(self, step: int) -> float:
        """train.schedule=budget: the share of max_minutes / max_steps spent, on the agreed clock."""
        return max(self.clock / self.budget_s, step / self.tc.max_steps if self.tc.max_steps else 0.0)

    def elapsed(self) -> float:
        """Training seconds of this run, earlier segments included (this rank's own clock)."""
        return self.state.seconds_before + time.time() - self._t_segment

    # ------------------------------------------------------------------ resume
    def resume(self, path: str, state: Optional[dict] = None) -> None:
        """Continue from ``last.pt``: exact when the device count and global batch are the same.
        ``state``: the checkpoint already read (:func:`train` reads it before anything is written)."""
        state = ckpt.load_checkpoint(path) if state is None else state
        extra = state["extra"]
        check_resume_config(state, path, self.cfg)
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "step_in_epoch" in extra:
            step_in_epoch = int(extra["step_in_epoch"])
        else:  # written before the step count was stored: micro-batches of the loader
            old_accum = int(extra.get("config", {}).get("train", {}).get("grad_accum", 1))
            step_in_epoch = int(extra["batch_in_epoch"]) // max(1, old_accum)
        self.state = RunState(epoch=int(extra["epoch"]), step_in_epoch=step_in_epoch,
                              global_step=int(extra["global_step"]), best=extra.get("best_score"),
                              seconds_before=float(extra.get("train_seconds", 0.0)))
        saved_world, saved_batch = extra.get("world_size"), extra.get("global_batch")
        ranks = extra.get("rng_ranks")
        same = saved_world == self.info.world_size and saved_batch == self.plan.global_batch and ranks
        if same:
            ckpt.restore_rng_state(ranks[self.info.rank])
        elif saved_world is None and self.info.world_size == 1 and extra.get("rng") is not None:
            ckpt.restore_rng_state(extra["rng"])  # a single-process checkpoint of an earlier version
        else:
            seed_everything(self.tc.seed + 1_000_003 * self.state.global_step + self.info.rank)
            if self.info.is_main:
                self.log(f"resuming a run saved on {saved_world} device(s) with global batch {saved_batch} on "
                         f"{self.info.world_size} device(s) with global batch {self.plan.global_batch}: it continues "
                         f"from step {self.state.global_step}, but not bit-exactly (new random streams per device"
                         f"{'' if saved_batch == self.plan.global_batch else ', another data order'})")
        dropped = self.metrics.keep_until(self.state.global_step)  # each step once in metrics.jsonl
        if self.info.is_main:
            self.log(f"resumed from {path}: epoch {self.state.epoch}, step {self.state.step_in_epoch} of the epoch, "
                     f"step {self.state.global_step} in all"
                     + (f" ({dropped} metrics records after that step dropped: they are logged again)" if dropped
                        else ""))

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        self._announce()
        self._t_segment = time.time()
        with self._signals_stop_at_a_step_boundary():
            for epoch in range(self.state.epoch, self.tc.epochs):
                if epoch != self.state.epoch:
                    self.state.epoch, self.state.step_in_epoch = epoch, 0
                stopped = self._train_epoch(epoch)
                self._end_epoch(epoch, stopped)
                if stopped:
                    break
        return self._finish()

    @contextlib.contextmanager
    def _signals_stop_at_a_step_boundary(self):
        """SIGTERM (a cluster's pre-emption) and SIGINT (Ctrl+C) set a flag: the ranks agree on it at
        the next step, save last.pt and stop. A second signal gets the default behaviour. A signal
        ignored by whoever started the run stays ignored (nohup and a shell's ``&`` ignore SIGINT, so
        a Ctrl+C meant for the terminal's foreground job does not stop a background run)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handler(signum, frame):
            self.signal = signal.Signals(signum).name
            for sig, old in previous.items():  # a second Ctrl+C / SIGTERM is not caught
                signal.signal(sig, old)

        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _announce(self) -> None:
        if not self.info.is_main:
            return
        tc = self.tc
        self.log(f"training {self.cfg.preset}: {len(self.train_ds)} items, {self.steps_per_epoch} steps/epoch x "
                 f"{tc.epochs} epochs on {self.device} x {self.info.world_size}"
                 + (f", budget {tc.max_minutes:g} min" if tc.max_minutes else ""))
        self.log(f"{self.plan.describe()}; {self.lr_note}")
        if self.cfg.model.contrastive and self.plan.per_device < 2:
            self.log("model.contrastive: 1 sample per device and micro-step leaves L_con no negatives (it is 0); "
                     "raise train.batch_size (train.lr_scaling=linear) or use fewer devices")
        self.log(selection_note(self.cfg))

    def _train_epoch(self, epoch: int) -> bool:
        """The steps of ``epoch`` from ``state.step_in_epoch`` on. -> True when a budget stopped the run."""
        plan, state = self.plan, self.state
        self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        if state.step_in_epoch:
            position = state.step_in_epoch * plan.per_device * plan.accumulation  # this rank's indices consumed
            self.sampler.load_state_dict(self.sampler.state_dict(position=position))
        self.ddp.train()
        bar = self._bar(epoch)
        micro_batches = iter(self.loader)
        try:
            while state.step_in_epoch < self.steps_per_epoch:
                if self.tc.max_steps and state.global_step >= self.tc.max_steps:
                    return True  # a resumed run that had already reached its step budget
                group = [next(micro_batches) for _ in range(plan.accumulation)]
                ok, self.clock, signalled = self._agree(group)
                if signalled:
                    self.interrupted = self.signal or "a signal to another rank"
                    return True
                if self.clock > self.budget_s:
                    return True
                stepped = self.step(group, ok)
                state.step_in_epoch += 1
                if bar is not None:
                    bar.update(1)
                if stepped:
                    self._log_step(epoch, bar)
                if self.tc.max_steps and state.global_step >= self.tc.max_steps:
                    return True
            return False
        finally:
            if bar is not None:
                bar.close()

    def _bar(self, epoch: int):
        if not (self.progress and self.info.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps_per_epoch, initial=self.state.step_in_epoch,
                    desc=f"epoch {epoch + 1}/{self.tc.epochs}", dynamic_ncols=True, leave=False)

    def _agree(self, group: list[dict]) -> tuple[list[bool], float, bool]:
        """One host-side agreement per step: which micro-batches every rank could fill, the clock, and
        whether any rank was sent SIGTERM / SIGINT."""
        empty = [1.0 if b["index"].numel() == 0 else 0.0 for b in group]
        *flags, clock, signalled = agree_max(empty + [self.elapsed(), 1.0 if self.signal else 0.0])
        return [f == 0.0 for f in flags], clock, signalled > 0

    def step(self, group: list[dict], ok: list[bool]) -> bool:
        """One optimiser step over the micro-batches of ``group`` that every rank could fill (``ok``):
        gradients all-reduced once, on the last of them. -> False when none was left (no step)."""
        for batch, good in zip(group, ok):
            self.skips.update(batch)
            if not good:
                self.dropped += int(batch["index"].numel())  # good samples beside another rank's empty batch
        todo = [b for b, good in zip(group, ok) if good]
        if not todo:
            self.skipped_steps += 1
            return False
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(todo):
            last = i == len(todo) - 1
            with contextlib.nullcontext() if last or not self.info.distributed else self.ddp.no_sync():
                terms = self._forward_backward(batch, 1.0 / len(todo))
            for k, v in terms.as_dict().items():  # accumulated on the device: no host sync per step
                self.running[k] = self.running.get(k, 0.0) + v.detach()
            self.running["n"] = self.running.get("n", 0) + 1
        if self.tc.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.core.parameters(), self.tc.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.state.global_step += 1
        return True

    def _forward_backward(self, batch: dict, scale: float) -> LossTerms:
        batch = to_device(batch, self.device)
        terms = self.loss_step(batch["image"], batch["input_ids"], batch["attention_mask"], batch["erased_ids"],
                               batch["mask"], batch["delta"])  # fp32 terms whatever the autocast
        (terms.total * scale).backward()
        return terms

    def _log_step(self, epoch: int, bar) -> None:
        step = self.state.global_step
        if step % self.tc.log_every or not self.running:
            return
        n = self.running.pop("n")
        rec = {"step": step, "epoch": epoch + self.state.step_in_epoch / self.steps_per_epoch,
               "lr": self.optimizer.param_groups[0]["lr"], "minutes": self.elapsed() / 60}
        rec.update({k: float(v) / n for k, v in self.running.items()})  # one host sync per log step
        self.running = {}
        self.metrics.write(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if self.tb is not None:
            for k, v in rec.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    # ------------------------------------------------------------------ validation + checkpoints
    def _end_epoch(self, epoch: int, stopped: bool) -> None:
        tc = self.tc
        due = (epoch + 1) % tc.eval_every == 0 or stopped or epoch + 1 == tc.epochs
        if self.val_loader is not None and due and not self.interrupted:  # interrupted: save and go
            self._validate(epoch)
        if self.state.step_in_epoch >= self.steps_per_epoch:
            self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        self._save_last()

    def _validate(self, epoch: int) -> None:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            # evaluation must not move the training RNG: a resumed run continues exactly
            results, vskips = run_evaluation(self.core, self.val_loader, self.device, fast=self.tc.fast,
                                             progress=self.progress and self.info.is_main, desc="validation")
        score = selection_score(results)
        state = self.state
        self.metrics.write({"step": state.global_step, "epoch": epoch + state.step_in_epoch / self.steps_per_epoch,
                            "minutes": self.elapsed() / 60, "val": results, "val_score": score,
                            "val_skipped": vskips.count})
        if self.info.is_main:
            self.log(f"epoch {epoch + 1}: validation score {score:.2f} "
                     f"(oIoU {_fmt(results['dmmi']['oIoU'])}, Acc {_fmt(results['dmmi']['Acc'])})")
        if state.best is None or score > state.best:  # the same on every rank (global figures)
            state.best = score
            if self.info.is_main:
                save_model_file(self.best_path, self.core, self.cfg, extra={"val": results, "step": state.global_step,
                                                                            "trained_on": self.cfg.data.dataset})

    def _save_last(self) -> None:
        """``last.pt`` from rank 0, with every rank's RNG state (a collective: all ranks call it)."""
        rng_ranks = gather_objects(ckpt.capture_rng_state())
        if not self.info.is_main:
            return
        s = self.state
        extra = {"preset": self.cfg.preset, "config": self.cfg.to_dict(), "epoch": s.epoch,
                 "step_in_epoch": s.step_in_epoch, "batch_in_epoch": s.step_in_epoch * self.plan.accumulation,
                 "global_step": s.global_step, "best_score": s.best, "rng": rng_ranks[0], "rng_ranks": rng_ranks,
                 "world_size": self.info.world_size, "global_batch": self.plan.global_batch,
                 "train_seconds": self.elapsed()}
        ckpt.save_checkpoint(self.last_path, model_state=self.core.state_dict(),
                             optimizer_state=self.optimizer.state_dict(), scheduler_state=self.scheduler.state_dict(),
                             extra=extra)

    def _finish(self) -> TrainResult:
        barrier()
        info, state = self.info, self.state
        if info.is_main and not self.best_path.exists() and not self.interrupted:
            save_model_file(self.best_path, self.core, self.cfg,
                            extra={"step": state.global_step, "note": "no model selection: last model",
                                   "trained_on": self.cfg.data.dataset})
        if info.is_main and self.best_path.exists() and not self.interrupted:
            self._write_model_dir()
        if info.is_main and self.metrics.records:
            self._plot()
        count, dropped, messages = self._gather_skips()
        if count and info.is_main:
            self.log(f"skipped {count} bad sample{'s' if count != 1 else ''}"
                     + (f" ({dropped} good ones dropped with them: a micro-batch some device could not fill)"
                        if dropped else "") + (": " + "; ".join(messages[:3]) if messages else ""))
        return TrainResult(output_dir=self.out_dir, best_path=self.best_path if self.best_path.exists() else None,
                           last_path=self.last_path, best_score=state.best, steps=state.global_step,
                           epochs_done=state.epoch + state.step_in_epoch / self.steps_per_epoch,
                           minutes=(time.time() - self.t_start) / 60, history=self.metrics.records,
                           skipped=count, model=self.core, interrupted=self.interrupted)

    def _write_model_dir(self) -> None:
        """``<output_dir>/model/``: best.pt as a Hub-style model directory (config.json, model.safetensors,
        README.md model card) for ``--model`` / ``Predictor.from_pretrained`` / ``push_to_hub``."""
        from dmmi.hub import save_state_pretrained

        payload = torch.load(self.best_path, map_location="cpu", weights_only=True)
        save_state_pretrained(payload["model"], self.cfg, self.model_dir, extra=payload.get("extra") or {})
        self.log(f"model directory: {self.model_dir}")

    def _gather_skips(self) -> tuple[int, int, list[str]]:
        """Bad samples and dropped good ones over all ranks, and the first reasons."""
        reports = gather_objects((self.skips.count, self.dropped, self.skips.messages[:3]))
        return (sum(r[0] for r in reports), sum(r[1] for r in reports), [m for r in reports for m in r[2]])

    def _plot(self) -> None:
        try:
            from dmmi.visualize import plot_curves

            logged = {k for r in self.metrics.records for k in r}
            if "val" in logged:
                logged |= {"val.dmmi.oIoU", "val.dmmi.Acc"}
            # ablations without CCR / contrastive head log no loss_sim / loss_con: plot what exists
            keys = [k for k in ("loss", "loss_ce", "loss_sim", "loss_con", "loss_empty", "val.dmmi.oIoU",
                                "val.dmmi.Acc") if k in logged]
            plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png", keys=keys)
        except Exception as e:  # noqa: BLE001 - a plot never fails a run
            self.log(f"(could not draw curves: {e})")


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"
