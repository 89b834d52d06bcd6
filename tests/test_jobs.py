"""Batch inference: Predictor.predict_batch and dmmi predict --jobs (COCO RLE results, resumable, bad lines
reported and skipped)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from dmmi.cli import main as cli
from dmmi.config import load_config
from dmmi.errors import DmmiError
from dmmi.inference import Predictor
from dmmi.models import build_model
from dmmi.models.io import save_model_file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("dmmi_tiny")
    model = build_model(cfg.model).eval()
    root = tmp_path_factory.mktemp("jobs")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (40, 60), "b.png": (33, 47), "c.jpg": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
    return model, cfg, root, save_model_file(root / "m.pt", model, cfg)


def test_predict_batch_equals_one_image_at_a_time(setup):
    model, cfg, root, _ = setup
    predictor = Predictor(model, cfg, device="cpu", expressions_per_call=3)
    images = [root / "a.png", root / "b.png", root / "c.jpg"]
    texts = [["the red circle", "all the shapes"], "a blue star", ["the left one", "two squares", "nothing"]]
    batched = predictor.predict_batch(images, texts)
    assert [len(b) for b in batched] == [2, 1, 3]
    for image, t, preds in zip(images, texts, batched):
        alone = predictor.predict(image, [t] if isinstance(t, str) else t)
        for a, b in zip(alone, preds):
            assert a.text == b.text and a.mask.shape == b.mask.shape
            assert np.array_equal(a.mask, b.mask) and a.score == pytest.approx(b.score, abs=1e-5)
    with pytest.raises(DmmiError, match="2 images but 1 lists"):
        predictor.predict_batch(images[:2], texts[:1])


def _write_jobs(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_jobs_file_results_resume_and_bad_lines(setup, tmp_path, capsys):
    _, _, root, ckpt = setup
    jobs = root / "jobs.jsonl"
    _write_jobs(jobs, [{"image": "a.png", "expressions": ["the red circle", "all the shapes"]},
                       "{not json",
                       {"image": "missing.png", "expressions": ["x"]},
                       {"image": "b.png", "expressions": "a blue star"},
                       {"image": "c.jpg", "expressions": []},
                       {"image": str(root / "c.jpg"), "expressions": ["the left one"]}])
    out = tmp_path / "results.jsonl"
    args = ["predict", "--jobs", str(jobs), "--out", str(out), "--checkpoint", str(ckpt), "--no-progress",
            "--batch-jobs", "2"]
    assert cli(args) == 1  # done, but some lines were skipped: a script can tell
    printed = capsys.readouterr().out
    assert "jobs.jsonl:2: not JSON" in printed and "jobs.jsonl:3:" in printed and "missing.png" in printed
    assert "jobs.jsonl:5: \"expressions\" must be a non-empty list" in printed
    assert "3 job(s) done, 0 already in" in printed and "3 bad line(s) skipped" in printed
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 4, 6]
    first = records[0]["results"][0]
    mask = mask_utils.decode({"size": first["rle"]["size"], "counts": first["rle"]["counts"].encode()})
    assert mask.shape == (40, 60)
    predictor = Predictor.load(ckpt, device="cpu")
    expected = predictor.predict(root / "a.png", "the red circle")
    assert np.array_equal(mask.astype(bool), expected.mask)
    assert first["no_target"] == expected.no_target and first["score"] == pytest.approx(expected.score, abs=1e-5)

    # a killed run: the last result line cut short; the re-run drops it, redoes that job, skips the others
    text = out.read_text()
    out.write_text(text[: len(text) - 20])
    assert cli(args) == 1
    printed = capsys.readouterr().out
    assert "1 job(s) done, 2 already in" in printed
    assert [json.loads(x)["line"] for x in out.read_text().splitlines()] == [1, 4, 6]


def test_jobs_bad_arguments_are_one_line(setup, tmp_path, capsys):
    _, _, root, ckpt = setup
    jobs = root / "jobs.jsonl"
    cases = [(["--jobs", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r.jsonl")], "jobs file not found"),
             (["--jobs", str(jobs)], "--jobs needs --out RESULTS.jsonl"),
             (["--jobs", str(jobs), "--out", str(tmp_path)], "is a folder; with --jobs it is the results file"),
             (["--jobs", str(jobs), "--out", str(jobs)], "is the jobs file itself"),
             ([str(root / "a.png"), "--jobs", str(jobs), "--out", str(tmp_path / "r.jsonl")], "give no IMAGE")]
    for extra, message in cases:
        if not jobs.exists():
            jobs.write_text("")
        assert cli(["predict", *extra, "--checkpoint", str(ckpt)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert cli(["predict", "--checkpoint", str(ckpt)]) == 2
    assert "give an image" in capsys.readouterr().err


def test_results_of_another_jobs_file_are_refused_not_taken_as_done(setup, tmp_path, capsys):
    _, _, root, ckpt = setup
    first, second = root / "first.jsonl", root / "second.jsonl"
    _write_jobs(first, [{"image": "a.png", "expressions": ["the red circle"]}])
    _write_jobs(second, [{"image": "b.png", "expressions": ["the red circle"]}])
    out = tmp_path / "results.jsonl"
    assert cli(["predict", "--jobs", str(first), "--out", str(out), "--checkpoint", str(ckpt), "--no-progress"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert cli(["predict", "--jobs", str(second), "--out", str(out), "--checkpoint", str(ckpt), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "results.jsonl" in err and "second.jsonl:1" in err and "b.png" in err and "a.png" in err
    assert "\n" not in err and out.read_bytes() == before  # nothing lost, nothing taken as done
    _write_jobs(second, [{"image": "a.png", "expressions": ["another expression"]}])  # same image, other words
    assert cli(["predict", "--jobs", str(second), "--out", str(out), "--checkpoint", str(ckpt), "--no-progress"]) == 2
    assert "expressions" in capsys.readouterr().err and out.read_bytes() == before


def test_a_file_that_is_not_a_results_file_is_refused_untouched(setup, tmp_path, capsys):
    _, _, root, ckpt = setup
    jobs = root / "one.jsonl"
    _write_jobs(jobs, [{"image": "a.png", "expressions": ["the red circle"]}])
    for name, content in (("results.json", b'{"results": {"dmmi": {"oIoU": 71.2}}}'),  # evaluate --json's kind
                          ("photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\n\x01\x02"),  # binary, a newline
                          ("notes.txt", b"line one\nline two")):
        out = tmp_path / name
        out.write_bytes(content)
        assert cli(["predict", "--jobs", str(jobs), "--out", str(out), "--checkpoint", str(ckpt), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert str(out) in err and "give another --out" in err and "\n" not in err
        assert out.read_bytes() == content  # nothing lost


def test_results_file_in_a_folder_not_made_yet(setup, tmp_path):
    _, _, root, ckpt = setup
    jobs = root / "one.jsonl"
    _write_jobs(jobs, [{"image": "a.png", "expressions": ["the red circle"]}])
    out = tmp_path / "new" / "deeper" / "results.jsonl"
    assert cli(["predict", "--jobs", str(jobs), "--out", str(out), "--checkpoint", str(ckpt), "--no-progress"]) == 0
    assert json.loads(out.read_text())["line"] == 1


def test_batch_size_sets_the_pairs_per_forward(setup, tmp_path, monkeypatch):
    _, _, root, ckpt = setup
    jobs = root / "two.jsonl"
    _write_jobs(jobs, [{"image": "a.png", "expressions": ["x", "y", "z"]}, {"image": "b.png", "expressions": ["w"]}])
    seen, forwards = [], []
    load = Predictor.load.__func__

    def recording_load(cls, *a, **kw):
        predictor = load(cls, *a, **kw)
        seen.append(predictor.expressions_per_call)
        logits = predictor._logits
        predictor._logits = lambda x, ids, mask: forwards.append(len(x)) or logits(x, ids, mask)
        return predictor

    monkeypatch.setattr(Predictor, "load", classmethod(recording_load))
    args = ["predict", "--jobs", str(jobs), "--checkpoint", str(ckpt), "--no-progress", "--batch-size", "3"]
    assert cli([*args, "--out", str(tmp_path / "r.jsonl")]) == 0
    assert seen == [3] and forwards == [3, 1]  # 4 (image, expression) pairs, 3 per forward
    assert cli(["predict", str(root / "a.png"), "x", "y", "--checkpoint", str(ckpt), "--batch-size", "1",
                "--out", str(tmp_path / "o")]) == 0
    assert seen[-1] == 1 and forwards[-2:] == [1, 1]


@pytest.mark.parametrize("option, value", [("--min-area", "1.5"), ("--batch-size", "0"), ("--batch-jobs", "0"),
                                           ("--threshold", "2")])
def test_bad_numbers_are_refused_before_the_model_loads(setup, tmp_path, capsys, option, value):
    _, _, root, _ = setup
    jobs = root / "one.jsonl"
    _write_jobs(jobs, [{"image": "a.png", "expressions": ["the red circle"]}])
    missing = str(tmp_path / "no-such-model")  # were the model loaded first, the error would name it
    for mode in (["--jobs", str(jobs), "--out", str(tmp_path / "r.jsonl")], [str(root / "a.png"), "a cat"]):
        assert cli(["predict", *mode, "--checkpoint", missing, option, value]) == 2
        err = capsys.readouterr().err.strip()
        assert option in err and "no-such-model" not in err and "\n" not in err
    assert not (tmp_path / "r.jsonl").exists()
