"""Checkpoint round trips, atomic writes, refusal of damaged / unsafe files, RNG resume."""

import argparse
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dmmi.config import Config
from dmmi.engine.checkpoint import (
    capture_rng_state,
    export_metadata,
    load_checkpoint,
    load_weights_safetensors,
    restore_rng_state,
    save_checkpoint,
    save_weights_safetensors,
)
from dmmi.errors import DmmiError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_round_trip():
    torch.cuda.manual_seed_all(5)
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda").tolist()
    restore_rng_state(state)
    assert torch.rand(4, device="cuda").tolist() == first


def small_training_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_round_trip_is_weights_only_loadable(tmp_path):
    model, opt, sched = small_training_state()
    path = tmp_path / "ckpt" / "last.pt"  # missing folder is created
    extra = {"epoch": 3, "step": 120, "config": Config().to_dict(), "rng": capture_rng_state()}
    save_checkpoint(path, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                    scheduler_state=sched.state_dict(), extra=extra)
    raw = torch.load(path, weights_only=True)  # the format promise
    assert raw["format"] == "dmmi-checkpoint"
    ck = load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(ck["model"][k], v)
    assert ck["extra"]["epoch"] == 3 and ck["extra"]["config"] == Config().to_dict()
    model2, opt2, sched2 = small_training_state()
    opt2.load_state_dict(ck["optimizer"])
    sched2.load_state_dict(ck["scheduler"])
    assert sched2.last_epoch == 1
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert [p.name for p in tmp_path.joinpath("ckpt").iterdir()] == ["last.pt"]  # no temp file left


def test_non_plain_data_is_refused_before_writing(tmp_path):
    with pytest.raises(DmmiError, match=r"checkpoint \['extra'\]\['config'\]: a Config cannot be stored"):
        save_checkpoint(tmp_path / "c.pt", model_state={}, extra={"config": Config()})
    with pytest.raises(DmmiError, match=r"\['extra'\]\['best'\]\['oIoU'\]: a float64 cannot be stored"):
        save_checkpoint(tmp_path / "c.pt", model_state={}, extra={"best": {"oIoU": np.float64(61.5)}})
    assert not any(tmp_path.iterdir())


def test_failure_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model_state={"w": torch.ones(3)}, extra={"epoch": 1})
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(DmmiError, match="cannot write .*last.pt: disk full"):  # one line, not a traceback
        save_checkpoint(path, model_state={"w": torch.zeros(3)}, extra={"epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    ck = load_checkpoint(path)
    assert ck["extra"]["epoch"] == 1 and torch.equal(ck["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # temp file cleaned up


def test_process_killed_mid_write_keeps_previous_checkpoint(tmp_path):
    # no cleanup runs when the process dies: the half-written temp file stays, `path` does not change
    path = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import os, torch
        from dmmi.engine.checkpoint import save_checkpoint
        save_checkpoint({str(path)!r}, model_state={{"w": torch.ones(3)}}, extra={{"epoch": 1}})
        def dying_save(obj, f, *a, **k):
            f.write(b"PK\\x03\\x04 half")
            f.flush()
            os._exit(9)
        torch.save = dying_save
        save_checkpoint({str(path)!r}, model_state={{"w": torch.zeros(3)}}, extra={{"epoch": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert load_checkpoint(path)["extra"]["epoch"] == 1
    assert len(list(tmp_path.iterdir())) == 2  # last.pt + the abandoned temp file


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model_state={"w": torch.randn(256)})
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty):
        with pytest.raises(DmmiError, match=f"{bad.name} is not a dmmi checkpoint or is truncated") as e:
            load_checkpoint(bad)
        assert "\n" not in str(e.value)


def test_foreign_missing_and_unsafe_files(tmp_path):
    with pytest.raises(DmmiError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    plain = tmp_path / "state_dict.pt"
    torch.save({"w": torch.ones(1)}, plain)  # a bare state dict: loadable, but not ours
    with pytest.raises(DmmiError, match="is not a dmmi checkpoint"):
        load_checkpoint(plain)
    unsafe = tmp_path / "unsafe.pt"  # like the authors' release: argparse args inside
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, unsafe)
    with pytest.raises(DmmiError, match=r"refusing to load: the file needs unsafe unpickling \(GLOBAL argparse.Namespace\)"):
        load_checkpoint(unsafe)


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's legacy state
    save_checkpoint(tmp_path / "r.pt", model_state={}, extra={"rng": capture_rng_state()})

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
                np.random.standard_normal(), torch.rand(3).tolist(), torch.randint(0, 1000, (4,)).tolist())

    first = draws()
    draws()  # move every generator further on
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["extra"]["rng"])
    assert draws() == first


def test_safetensors_export_round_trip(tmp_path):
    cfg = Config()
    lin = nn.Linear(4, 4)
    state = {"a.weight": lin.weight, "b.weight": lin.weight, "a.bias": lin.bias, "t": torch.arange(6).view(2, 3).t()}
    path = save_weights_safetensors(tmp_path / "model.safetensors", state, export_metadata(cfg))
    loaded, meta = load_weights_safetensors(path)
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k].detach())
    assert meta["preset"] == cfg.preset and json.loads(meta["config"]) == cfg.to_dict()


def test_safetensors_errors(tmp_path):
    with pytest.raises(DmmiError, match="metadata must map str to str; 'epoch'"):
        save_weights_safetensors(tmp_path / "m.safetensors", {"w": torch.ones(1)}, {"epoch": 3})
    with pytest.raises(DmmiError, match="weights file not found"):
        load_weights_safetensors(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DmmiError, match="bad.safetensors is not a safetensors file or is truncated"):
        load_weights_safetensors(bad)


def test_written_files_get_the_umask_mode_not_mkstemps_private_one(tmp_path):
    import os

    from dmmi.engine.checkpoint import atomic_write

    old = os.umask(0o022)
    try:
        path = tmp_path / "model.pt"
        atomic_write(path, lambda tmp: tmp.write_bytes(b"x"))
        assert path.stat().st_mode & 0o777 == 0o644  # as open(path, "w") gives: readable by the group and others
        path.chmod(0o640)
        atomic_write(path, lambda tmp: tmp.write_bytes(b"y"))  # a rewrite keeps the file's own mode
        assert path.stat().st_mode & 0o777 == 0o640 and path.read_bytes() == b"y"
    finally:
        os.umask(old)
