"""Device resolution, single-process no-ops, and a real 2-process gloo run (torch.multiprocessing)."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dmmi.engine import distributed as D
from dmmi.errors import DmmiError
from dmmi.metrics import CombinedEvaluator, evaluate_all

WORLD = 2
N_SAMPLES = 9
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def make_samples():
    """N_SAMPLES random 8x8 (pred, gt, type); zero samples have empty ground truth."""
    g = torch.Generator().manual_seed(0)
    types = ["one", "many", "zero", "one", "zero", "many", "one", "one", "zero"]
    gts = torch.rand(N_SAMPLES, 8, 8, generator=g) > 0.5  # (N, 8, 8)
    noise = torch.rand(N_SAMPLES, 8, 8, generator=g) > torch.linspace(0.6, 0.95, N_SAMPLES)[:, None, None]
    preds = gts ^ noise  # (N, 8, 8): more or less wrong predictions, IoUs spread over [0, 1]
    preds[2] = False  # a zero sample predicted empty
    for i, t in enumerate(types):
        if t == "zero":
            gts[i] = False
    return preds, gts, types


def _worker(rank, port, out_dir):
    """One rank of a torchrun-like job: the environment torchrun would set, then our API."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = D.init_distributed("cpu")
    counts = torch.tensor([rank + 1, 10 * (rank + 1)], dtype=torch.int64)
    D.all_reduce_sum(counts)  # [1 + 2, 10 + 20]

    preds, gts, types = make_samples()
    # like a DistributedSampler: rank r takes r, r + 2, ...; 9 samples -> rank 1 pads with sample 0
    ids = list(range(rank, N_SAMPLES, WORLD)) + ([0] if rank == 1 else [])
    ev = CombinedEvaluator()
    for start in range(0, len(ids), 2):  # batches of 2
        chunk = ids[start:start + 2]
        ev.process(preds[chunk], gts[chunk], [types[i] for i in chunk], sample_ids=chunk)
    local_total = ev.evaluate()["dmmi"]["counts"]["total"]
    ev.all_reduce()
    D.barrier()
    result = {
        "info": [info.rank, info.world_size, info.local_rank, str(info.device), info.is_main],
        "is_main": D.is_main(),
        "counts": counts.tolist(),
        "local_total": local_total,
        "metrics": ev.evaluate(),
    }
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    D.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_processes_join_and_all_reduce_counts(two_rank_results):
    r0, r1 = two_rank_results
    assert r0["info"] == [0, 2, 0, "cpu", True] and r0["is_main"]
    assert r1["info"] == [1, 2, 1, "cpu", False] and not r1["is_main"]
    assert r0["counts"] == r1["counts"] == [3, 30]


def test_evaluators_all_reduce_gives_global_metrics_on_every_rank(two_rank_results):
    r0, r1 = two_rank_results
    assert (r0["local_total"], r1["local_total"]) == (5, 5)  # rank 1: 4 own + 1 padded repeat
    expected = json.loads(json.dumps(evaluate_all(*make_samples())))  # one process, all 9 samples
    assert expected["dmmi"]["counts"]["total"] == N_SAMPLES
    for r in (r0, r1):
        assert r["metrics"]["dmmi"]["counts"] == expected["dmmi"]["counts"]  # the repeat is dropped
        assert_close(r["metrics"], expected)


def assert_close(got, want, where="results"):
    """Equal structure; floats equal up to summation order."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            assert_close(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want), where
    else:
        assert got == want, where


def test_single_process_without_torchrun(monkeypatch):
    for key in TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device, info.is_main) == (0, 1, 0, torch.device("cpu"), True)
    assert not info.distributed
    t = torch.tensor([1, 2])
    assert D.all_reduce_sum(t) is t and t.tolist() == [1, 2]
    D.barrier()
    D.cleanup()
    assert D.is_main() and D.get_world_size() == 1


def test_bad_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DmmiError, match="WORLD_SIZE='two' is not an integer"):
        D.init_distributed("cpu")


def test_resolve_device():
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert D.resolve_device("auto").type == expected_auto
    assert D.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DmmiError, match="unknown device 'gpu0'"):
        D.resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_request_without_cuda_is_one_line_error():
    with pytest.raises(DmmiError) as e:
        D.resolve_device("cuda")
    assert str(e.value) == (
        "CUDA was requested (train.device=cuda) but no CUDA device is available; use --set train.device=cpu"
    )
