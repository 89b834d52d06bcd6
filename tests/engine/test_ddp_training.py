"""Training under DDP, for real: 2 gloo processes on CPU train ``dmmi_tiny`` and are compared with
each other and with one process. Each test here failed on the engine before the global-batch /
agreed-decisions rewrite (different learning rates per rank, rank 0's RNG on every rank, a hang on
a batch one rank could not fill, per-process batches)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dmmi.config import load_config
from dmmi.data.synthetic import generate

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# no dropout in the random BERT: runs split differently over devices draw different dropout masks
NO_DROPOUT = ["model.text_config.hidden_dropout_prob=0.0", "model.text_config.attention_probs_dropout_prob=0.0"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, n_images=24, seed=4, image_size=64, refs_per_image=2)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def freeze_batch_norm() -> None:
    """BatchNorm always in eval mode (running statistics): SyncBatchNorm needs CUDA, and per-device
    batch statistics would make 2 x 2 differ from 1 x 4 by design."""
    def train(self, mode=True):
        return torch.nn.Module.train(self, False)

    torch.nn.modules.batchnorm._BatchNorm.train = train


def _rank_main(rank, world, port, overrides, out, resume, frozen_bn, fault):
    """One process of a torchrun-like job: train ``dmmi_tiny`` and write this rank's weights + log."""
    torch.set_num_threads(1)
    for key in TORCHRUN_VARS:
        os.environ.pop(key, None)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if frozen_bn:
        freeze_batch_norm()
    if fault is not None:
        _corrupt_for_rank(rank, fault)
    syncs = _count_gradient_syncs() if world > 1 else []
    from dmmi.engine.train import train

    lines: list[str] = []
    result = train(load_config("dmmi_tiny", overrides), resume=resume, progress=False, log=lines.append)
    torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()}, f"{out}/weights{rank}.pt")
    Path(f"{out}/result{rank}.json").write_text(json.dumps({"steps": result.steps, "skipped": result.skipped,
                                                            "log": lines, "gradient_syncs": len(syncs)}))


def _count_gradient_syncs() -> list:
    """Every DDP model made in this process counts its gradient all-reduces (one per bucket)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    calls: list = []
    init = DistributedDataParallel.__init__

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)

        def hook(state, bucket):
            calls.append(1)
            return allreduce_hook(state, bucket)

        self.register_comm_hook(None, hook)

    DistributedDataParallel.__init__ = counting_init
    return calls


def _corrupt_for_rank(rank, fault):
    """``fault = (rank, indices)``: on that rank, those dataset items fail as a corrupt image does."""
    from dmmi.data.datasets import RefDataset
    from dmmi.errors import DmmiError

    bad_rank, bad = fault
    if rank != bad_rank:
        return
    original = RefDataset.__getitem__

    def getitem(self, index):
        i = int(index[0]) if isinstance(index, (tuple, list)) else int(index)
        if self.train and i in bad:
            raise DmmiError(f"ref {i}: cannot read image corrupt.png (cannot identify image file)")
        return original(self, index)

    RefDataset.__getitem__ = getitem


def run_ranks(world, overrides, out, *, resume=None, frozen_bn=False, fault=None, timeout=240):
    """Train on ``world`` processes (1: one process, no process group); -> (weights per rank, results)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_rank_main, args=(world, _free_port(), overrides, str(out), resume, frozen_bn, fault),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} training processes still running after {timeout} s (a rank waits for another)")
    weights = [torch.load(out / f"weights{r}.pt", weights_only=True) for r in range(world)]
    results = [json.loads((out / f"result{r}.json").read_text()) for r in range(world)]
    return weights, results


def _cfg(synth, out, *extra):
    return [f"data.root={synth}", f"train.output_dir={out}", "data.val_split=null", "train.log_every=1", *extra]


def outputs_of(weights: dict, overrides) -> torch.Tensor:
    """The trained model's foreground logits (eval mode) on a fixed batch: (2, 64, 64).

    Compared instead of the raw parameters: a bias right before an InstanceNorm has a zero gradient up to
    rounding noise, and Adam turns any noise into steps of +-lr, but such a bias changes no output."""
    from dmmi.data.tokenize import load_tokenizer
    from dmmi.models import build_model

    cfg = load_config("dmmi_tiny", overrides)
    model = build_model(cfg.model).eval()
    model.load_state_dict(weights)
    enc = load_tokenizer(cfg.model.text_encoder)(["the red circle", "all the shapes on the left"], padding="max_length",
                                                 max_length=cfg.model.max_tokens, return_tensors="pt")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(images, enc["input_ids"], enc["attention_mask"]).logits[:, 1]


def max_output_diff(a: dict, b: dict, overrides) -> float:
    return float((outputs_of(a, overrides) - outputs_of(b, overrides)).abs().max())


def test_budget_schedule_keeps_ranks_bit_identical(synth, tmp_path):
    """schedule=budget: every rank applies the same learning rates (one agreed clock) and stops at the
    same step, so the replicas never drift apart."""
    out = tmp_path / "budget"
    weights, results = run_ranks(2, _cfg(synth, out, "train.batch_size=4", "train.epochs=50", "train.schedule=budget",
                                         "train.max_minutes=0.25"), out)
    assert results[0]["steps"] == results[1]["steps"] > 1
    # parameters; BatchNorm's running statistics are each rank's own on CPU (SyncBatchNorm needs CUDA)
    params = [k for k in weights[0] if "running_" not in k and "num_batches_tracked" not in k]
    assert len(params) > 100
    assert [k for k in params if not torch.equal(weights[0][k], weights[1][k])] == []
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] < records[0]["lr"]  # the budget decayed the learning rate


def test_resume_with_two_processes_continues_exactly(synth, tmp_path):
    """2 epochs straight == 1 epoch, --resume, 1 more: each rank gets its own RNG stream back (the random
    BERT's dropout draws differ per rank)."""
    common = ["train.batch_size=4", "train.epochs=2"]
    straight, done = run_ranks(2, _cfg(synth, tmp_path / "a", *common), tmp_path / "a")
    per_epoch = done[0]["steps"] // 2
    run_ranks(2, _cfg(synth, tmp_path / "b", *common, f"train.max_steps={per_epoch}"), tmp_path / "b")
    resumed, results = run_ranks(2, _cfg(synth, tmp_path / "b", *common), tmp_path / "b",
                                 resume=str(tmp_path / "b" / "last.pt"))
    assert results[0]["steps"] == done[0]["steps"]
    assert [k for k in straight[0] if not torch.equal(straight[0][k], resumed[0][k])] == []


def test_resume_on_another_device_count_continues_and_says_so(synth, tmp_path):
    run_ranks(2, _cfg(synth, tmp_path / "r", "train.batch_size=4", "train.epochs=1"), tmp_path / "r")
    _, results = run_ranks(1, _cfg(synth, tmp_path / "r", "train.batch_size=4", "train.epochs=2"), tmp_path / "r",
                           resume=str(tmp_path / "r" / "last.pt"))
    notes = [line for line in results[0]["log"] if "not bit-exactly" in line]
    assert len(notes) == 1 and "saved on 2 device(s)" in notes[0] and "on 1 device(s)" in notes[0]
    assert results[0]["steps"] > 0


def test_a_batch_one_rank_cannot_fill_is_skipped_by_all(synth, tmp_path):
    """Rank 1's first micro-batch is all corrupt images: both ranks skip it (no hang), the run
    finishes and rank 0 reports the bad samples of every rank."""
    from dmmi.data.samplers import ZeroSpreadSampler
    from dmmi.data.tokenize import load_tokenizer
    from dmmi.engine.train import build_datasets

    overrides = _cfg(synth, tmp_path / "bad", "train.batch_size=4", "train.epochs=1")
    cfg = load_config("dmmi_tiny", overrides)
    train_ds, _ = build_datasets(cfg, load_tokenizer(cfg.model.text_encoder), seed=cfg.train.seed)
    rank1 = ZeroSpreadSampler(train_ds.types, num_replicas=2, rank=1, seed=cfg.train.seed, batch_size=2,
                              global_batch=4)
    bad = list(rank1)[:2]  # its first micro-batch
    _, results = run_ranks(2, overrides, tmp_path / "bad", fault=(1, bad), timeout=180)
    steps_per_epoch = len(train_ds) // 4
    assert results[0]["steps"] == results[1]["steps"] == steps_per_epoch - 1  # one step had nothing to train
    assert results[0]["skipped"] == 2
    assert any(line.startswith("skipped 2 bad samples (2 good ones dropped with them") for line in results[0]["log"])


def test_two_processes_equal_one_process_with_the_global_batch(synth, tmp_path):
    """train.batch_size is global: 2 processes x 2 == 1 process x 4 over 3 optimiser steps (BatchNorm
    frozen, since SyncBatchNorm needs CUDA; uniform class weights and no contrastive head, whose
    normalisation / negatives are per device)."""
    common = ["train.batch_size=4", "train.max_steps=3", "loss.ce_weights=[1.0,1.0]", "model.contrastive=false",
              *NO_DROPOUT]
    one, _ = run_ranks(1, _cfg(synth, tmp_path / "one", *common), tmp_path / "one", frozen_bn=True)
    two, results = run_ranks(2, _cfg(synth, tmp_path / "two", *common), tmp_path / "two", frozen_bn=True)
    assert results[0]["steps"] == 3
    assert any(line.startswith("global batch 4 = 2 per device x 2 devices x accumulation 1") for line in
               results[0]["log"])
    config = _cfg(synth, tmp_path / "one", *common)
    assert max_output_diff(one[0], two[0], config) < 1e-5
    assert max_output_diff(one[0], two[1], config) < 1e-5
    # 2 processes x 1 sample x 2 micro-steps: the same model, with the gradients all-reduced once per step
    accum, accum_results = run_ranks(2, _cfg(synth, tmp_path / "acc", *common, "train.grad_accum=2"),
                                     tmp_path / "acc", frozen_bn=True)
    assert max_output_diff(one[0], accum[0], config) < 1e-5
    assert accum_results[0]["gradient_syncs"] == results[0]["gradient_syncs"] > 0  # no_sync on the first micro-step
    # the same check sees a different split of the samples: one process trained on batch 2 for 3 steps
    other, _ = run_ranks(1, _cfg(synth, tmp_path / "b2", *common, "train.batch_size=2"), tmp_path / "b2",
                         frozen_bn=True)
    assert max_output_diff(one[0], other[0], config) > 1e-3
