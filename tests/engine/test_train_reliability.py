"""Training never destroys or mixes a run: re-runs, --resume auto, SIGTERM / Ctrl+C, a kill -9
mid-write, a full disk, outputs that cannot be written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dmmi.config import load_config
from dmmi.data.synthetic import generate
from dmmi.engine import checkpoint as ckpt
from dmmi.engine.train import train
from dmmi.errors import DmmiError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, n_images=24, seed=4, image_size=64, refs_per_image=2)
    return root


def _sets(synth, out, *extra):
    return [f"data.root={synth}", f"train.output_dir={out}", "data.val_split=null", "train.log_every=1",
            "train.batch_size=2", *extra]


def _run(synth, out, *extra, resume=None, log=lambda *a: None):
    return train(load_config("dmmi_tiny", _sets(synth, out, *extra)), resume=resume, progress=False, log=log)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _steps(folder):
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_rerun_into_a_run_folder_is_refused_and_changes_nothing(synth, tmp_path):
    out = tmp_path / "run"
    _run(synth, out, "train.max_steps=2")
    before = _snapshot(out)
    with pytest.raises(DmmiError) as e:
        _run(synth, out, "train.max_steps=2")
    assert str(e.value).startswith(f"train.output_dir {out} already holds a run (best.pt, last.pt, metrics.jsonl): "
                                   "continue it with --resume auto")
    assert _snapshot(out) == before  # best.pt, last.pt, metrics.jsonl, config.yaml untouched


def test_resume_auto(synth, tmp_path):
    lines = []
    fresh = _run(synth, tmp_path / "new", "train.max_steps=2", resume="auto", log=lines.append)
    assert fresh.steps == 2 and any("no last.pt" in line and "a new run" in line for line in lines)
    lines.clear()
    more = _run(synth, tmp_path / "new", "train.max_steps=4", resume="auto", log=lines.append)
    assert more.steps == 4 and any(line.startswith("resumed from") for line in lines)
    again = _run(synth, tmp_path / "new", "train.max_steps=4", resume="auto")  # a finished run: no step more
    assert again.steps == 4
    assert _steps(tmp_path / "new") == [1, 2, 3, 4]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DmmiError, match="--resume auto: .* holds no last.pt but is not empty \\(notes.txt\\)"):
        _run(synth, tmp_path / "other", resume="auto")


def test_killed_mid_write_leftovers_are_removed_and_each_step_is_logged_once(synth, tmp_path):
    """A run killed (kill -9) after logging steps 5-6 but before saving them, in the middle of writing
    last.pt: the resumed run removes the temporary file and logs steps 5-6 once, not twice."""
    out = tmp_path / "run"
    _run(synth, out, "train.max_steps=4", "train.epochs=3")
    with (out / "metrics.jsonl").open("a") as f:  # what the killed run logged after its last checkpoint
        for step in (5, 6):
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
    stale = out / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    lines = []
    result = _run(synth, out, "train.max_steps=7", "train.epochs=3", resume="auto", log=lines.append)
    assert result.steps == 7 and not stale.exists()
    assert _steps(out) == [1, 2, 3, 4, 5, 6, 7]
    assert any("2 metrics records after that step dropped" in line for line in lines)


def test_sigterm_saves_last_pt_at_a_step_boundary_and_resume_continues(synth, tmp_path):
    """A cluster's pre-emption: SIGTERM mid-epoch writes last.pt (it used to keep only the last epoch
    end), exits 143 with one line, and --resume auto carries on from that step."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "dmmi.cli", "train", "--config", "dmmi_tiny", "--no-progress"]
    for item in _sets(synth, out, "train.epochs=50"):
        command += ["--set", item]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dmmi: interrupted by SIGTERM at step ") and "--resume auto" in last
    extra = torch.load(out / "last.pt", weights_only=True)["extra"]
    done = extra["global_step"]
    assert done >= 3 and extra["step_in_epoch"] > 0 and extra["epoch"] == 0  # mid-epoch, not the epoch end
    assert _steps(out) == list(range(1, done + 1))
    result = _run(synth, out, "train.epochs=50", f"train.max_steps={done + 2}", resume="auto")
    assert result.steps == done + 2
    assert _steps(out) == list(range(1, done + 3))


def test_ctrl_c_inside_train_stops_at_the_next_step(synth, tmp_path, monkeypatch):
    from dmmi.engine import train as train_module

    original = train_module.Trainer.step
    calls = []

    def step(self, group, ok):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C during step 2
        return original(self, group, ok)

    monkeypatch.setattr(train_module.Trainer, "step", step)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's, even when run under nohup / &
    try:
        before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        result = _run(synth, tmp_path / "run", "train.epochs=50")
        after = {sig: signal.getsignal(sig) for sig in before}
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert result.interrupted == "SIGINT" and result.steps == 2 and len(calls) == 2
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["extra"]["global_step"] == 2
    assert after == before  # handlers given back


def test_a_sigint_ignored_by_the_parent_stays_ignored(synth, tmp_path, monkeypatch):
    """nohup / a shell's `&` start a job with SIGINT ignored: a Ctrl+C meant for the terminal's
    foreground job must not stop it, as it would not stop any other program started that way."""
    from dmmi.engine import train as train_module

    original = train_module.Trainer.step
    calls = []

    def step(self, group, ok):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, group, ok)

    monkeypatch.setattr(train_module.Trainer, "step", step)
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = _run(synth, tmp_path / "run", "train.epochs=50", "train.max_steps=4")
        during = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert result.interrupted is None and result.steps == 4 and len(calls) == 4
    assert during is signal.SIG_IGN


def test_outputs_that_cannot_be_written_are_one_line_before_any_work(synth, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DmmiError, match=f"train.output_dir {a_file} is a file, not a folder"):
        _run(synth, a_file)
    with pytest.raises(DmmiError, match=f"train.output_dir {a_file}/run: {a_file} is not a folder"):
        _run(synth, a_file / "run")


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "last.pt", model_state={"w": torch.ones(2)}, extra={"step": 1})
    before = path.read_bytes()

    def full(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DmmiError) as e:
        ckpt.save_checkpoint(path, model_state={"w": torch.zeros(2)}, extra={"step": 2})
    assert str(e.value) == f"cannot write {path}: No space left on device (the previous last.pt, if any, is unchanged)"
    assert path.read_bytes() == before and ckpt.temporary_files(tmp_path) == []


def test_a_model_file_with_an_empty_model_is_one_line(tmp_path):
    from dmmi.models.io import load_model_file

    cfg = load_config("dmmi_tiny")
    path = tmp_path / "empty.pt"
    from dmmi.models import io

    torch.save({"format": io.FORMAT, "model": {}, "config": cfg.to_dict()}, path)
    with pytest.raises(DmmiError, match="holds no model weights"):
        load_model_file(path)


def test_the_demo_keeps_an_earlier_run(tmp_path):
    from dmmi.engine.demo import _next_free

    out = tmp_path / "demo"
    assert _next_free(out) == tmp_path / "demo-2"
    (tmp_path / "demo-2").mkdir()
    assert _next_free(out) == tmp_path / "demo-2"  # empty: usable
    (tmp_path / "demo-2" / "best.pt").write_bytes(b"")
    assert _next_free(out) == tmp_path / "demo-3"
