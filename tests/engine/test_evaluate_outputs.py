"""dmmi evaluate: outputs checked before the evaluation, and a finished evaluation is printed and
saved even when an extra (the gallery) then fails."""

from __future__ import annotations

import json

import pytest

from dmmi.cli import main as cli
from dmmi.config import load_config
from dmmi.data.synthetic import generate
from dmmi.engine.train import train


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, n_images=12, seed=2, image_size=64, refs_per_image=2)
    run = tmp_path_factory.mktemp("run") / "r"
    result = train(load_config("dmmi_tiny", [f"data.root={root}", f"train.output_dir={run}", "train.max_steps=1",
                                             "data.val_split=null", "train.batch_size=4"]),
                   progress=False, log=lambda *a: None)
    return str(result.best_path), root


def _evaluate(model_and_data, *extra):
    ckpt, root = model_and_data
    return cli(["evaluate", "--checkpoint", ckpt, "--data", str(root), "--split", "test", "--no-progress", *extra])


def test_a_gallery_that_fails_keeps_the_printed_and_saved_evaluation(model_and_data, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for t in ("zero", "one", "many"):  # the overlays cannot be written where a folder holds their name
        (gallery / f"{t}_successes.png").mkdir()
    assert _evaluate(model_and_data, "--gallery", str(gallery), "--json", str(tmp_path / "res.json")) == 2
    captured = capsys.readouterr()
    assert "oIoU" in captured.out and f"results written to {tmp_path / 'res.json'}" in captured.out
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["results"]["dmmi"]["counts"]["total"] == saved["samples"] > 0
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith(f"dmmi: error: --gallery {gallery}: cannot write the overlays")


def test_unwritable_outputs_are_refused_before_the_evaluation(model_and_data, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for extra, message in ((["--json", str(a_file / "res.json")], f"--json {a_file}: it is not a folder"),
                           (["--json", str(tmp_path)], f"--json {tmp_path} is a folder, not a file"),
                           (["--gallery", str(a_file)], f"--gallery {a_file}: it is not a folder")):
        assert _evaluate(model_and_data, *extra) == 2
        captured = capsys.readouterr()
        assert "oIoU" not in captured.out  # nothing was evaluated
        assert captured.err.strip() == f"dmmi: error: {message}"


def test_a_cuda_request_without_cuda_names_evaluates_own_option(model_and_data, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    assert _evaluate(model_and_data, "--device", "cuda") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("no CUDA device is available; use --device cpu") and "--set" not in err


def test_predict_on_a_folder_of_unreadable_images_fails(model_and_data, tmp_path, capsys):
    ckpt, _ = model_and_data
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"not an image")
    assert cli(["predict", str(folder), "a cat", "--checkpoint", ckpt, "--out", str(tmp_path / "out")]) == 2
    assert "none of the 2 images" in capsys.readouterr().err


def test_threshold_sweep_table_png_and_json(model_and_data, tmp_path, capsys):
    png = tmp_path / "sweep" / "test.png"
    assert _evaluate(model_and_data, "--sweep-threshold", str(png), "--json", str(tmp_path / "res.json")) == 0
    out = capsys.readouterr().out
    assert "threshold sweep" in out and "N-acc" in out
    sweep = json.loads(png.with_suffix(".json").read_text())["sweep"]
    assert [r["threshold"] for r in sweep] == [round(0.05 * i, 2) for i in range(1, 20)]
    assert png.is_file() and png.stat().st_size > 10_000
    saved = json.loads((tmp_path / "res.json").read_text())["results"]
    at_half = next(r for r in sweep if r["threshold"] == 0.5)
    assert at_half["dmmi"] == saved["dmmi"] and at_half["gres"] == saved["gres"]  # > 0.5 is the paper's argmax
    accs = [r["dmmi"]["Acc"] for r in sweep]
    assert accs == sorted(accs)  # a higher threshold predicts fewer pixels: more zero-target samples empty
    assert _evaluate(model_and_data, "--sweep-threshold", str(tmp_path / "x.txt")) == 2
    assert "give a .png path" in capsys.readouterr().err


def test_threshold_masks():
    import torch

    from dmmi.decision import threshold_masks

    logits = torch.tensor([[[[0.0, 1.0, -1.0]], [[0.0, 0.0, 0.0]]]])  # p(fg) = 0.5, 0.27, 0.73
    assert threshold_masks(logits, None).tolist() == [[[False, False, True]]]
    assert threshold_masks(logits, 0.5).tolist() == [[[False, False, True]]]
    assert threshold_masks(logits, 0.2).tolist() == [[[True, True, True]]]
    assert threshold_masks(logits, 0.8).tolist() == [[[False, False, False]]]


def test_decide_masks_applies_the_threshold_and_the_minimum_area():
    import torch

    from dmmi.decision import decide_masks

    logits = torch.zeros(2, 2, 4, 4)
    logits[0, 1, :1, :1] = 3.0  # image 0: one pixel of 16 referred (6%)
    logits[1, 1, :, :2] = 3.0  # image 1: half the image referred
    assert torch.equal(decide_masks(logits), logits.argmax(dim=1).bool())  # None: the argmax
    assert decide_masks(logits).flatten(1).sum(1).tolist() == [1, 8]
    assert decide_masks(logits, None, 0.1).flatten(1).sum(1).tolist() == [0, 8]  # the small one: no target
    assert decide_masks(logits, 0.99, 0.1).flatten(1).sum(1).tolist() == [0, 0]  # p = 0.95 < 0.99


def test_evaluate_threshold_and_min_area_decide_no_target(model_and_data, tmp_path, capsys):
    # the train split: the 12-image set's test split holds two zero-target expressions only
    assert _evaluate(model_and_data, "--split", "train", "--json", str(tmp_path / "plain.json")) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["threshold"] is None and plain["min_area"] == 0.0
    assert "(mask = argmax" in capsys.readouterr().out
    png = tmp_path / "sweep.png"
    assert _evaluate(model_and_data, "--split", "train", "--min-area", "0.999", "--json", str(tmp_path / "none.json"),
                     "--sweep-threshold", str(png)) == 0
    out = capsys.readouterr().out
    assert "no target below 99.9% of the image" in out
    nothing = json.loads((tmp_path / "none.json").read_text())
    assert nothing["min_area"] == 0.999 and nothing["samples"] == plain["samples"]
    assert nothing["results"]["dmmi"]["Acc"] == 100.0  # every zero-target expression answered empty
    assert nothing["results"]["dmmi"]["oIoU"] == 0.0  # and every target missed
    assert plain["results"]["dmmi"]["oIoU"] > 0.0 and plain["results"]["dmmi"]["Acc"] < 100.0
    sweep = json.loads(png.with_suffix(".json").read_text())
    at_half = next(r for r in sweep["sweep"] if r["threshold"] == 0.5)
    assert sweep["min_area"] == 0.999 and at_half["dmmi"] == nothing["results"]["dmmi"]  # applied in the sweep too


@pytest.mark.parametrize("option, value, message", [
    ("--threshold", "1.5", "--threshold must be a foreground probability in [0, 1]"),
    ("--min-area", "-1", "--min-area must be a share of the image in [0, 1), got -1.0"),
])
def test_evaluate_refuses_a_bad_decision_before_loading(tmp_path, capsys, option, value, message):
    missing = tmp_path / "no-such-model.pt"  # not even looked at: the option is refused first
    assert cli(["evaluate", "--checkpoint", str(missing), "--split", "test", option, value,
                "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "no-such-model" not in err
    assert not (tmp_path / "r.json").exists()
