"""A model trained on the synthetic set says so, once, when it is used on other images."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from dmmi.cli import main as cli
from dmmi.config import load_config
from dmmi.inference import SYNTHETIC_SIDE, Predictor
from dmmi.models import build_model
from dmmi.models.io import save_model_file


def _model(tmp_path, dataset):
    torch.manual_seed(0)
    cfg = load_config("dmmi_tiny", [f"data.dataset={dataset}"])
    return save_model_file(tmp_path / f"{dataset}.pt", build_model(cfg.model).eval(), cfg)


def _image(path, w, h):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _notes(caplog):
    return [r for r in caplog.records if r.name == "dmmi" and "synthetic set" in r.getMessage()]


def test_synthetic_model_on_a_photo_sized_image_notes_once(tmp_path, caplog):
    predictor = Predictor.load(_model(tmp_path, "synthetic"), device="cpu")
    assert predictor.trained_on == "synthetic" and "synthetic set" in predictor.domain_note
    photo = _image(tmp_path / "photo.jpg", 96, 64)
    with caplog.at_level(logging.WARNING, logger="dmmi"):
        predictor.predict(_image(tmp_path / "s.png", SYNTHETIC_SIDE, SYNTHETIC_SIDE), "the red circle")
        assert not _notes(caplog)  # a synthetic-sized image: nothing to say
        predictor.predict(photo, "the red circle")
        predictor.predict(photo, ["the red circle", "a blue star"])
        predictor.predict_batch([photo, photo], ["a", "b"])
    notes = _notes(caplog)
    assert len(notes) == 1 and "\n" not in notes[0].getMessage()


def test_a_model_of_a_real_dataset_says_nothing(tmp_path, caplog):
    predictor = Predictor.load(_model(tmp_path, "refcoco"), device="cpu")
    assert predictor.domain_note is None and predictor.trained_on == "refcoco"
    with caplog.at_level(logging.WARNING, logger="dmmi"):
        predictor.predict(_image(tmp_path / "photo.jpg", 96, 64), "the red circle")
    assert not _notes(caplog)


def test_dmmi_predict_prints_the_note_once(tmp_path, capsys):
    model = _model(tmp_path, "synthetic")
    photo = _image(tmp_path / "photo.jpg", 96, 64)
    assert cli(["predict", str(photo), "a", "b", "--checkpoint", str(model), "--out", str(tmp_path / "o"),
                "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("trained on dmmi's synthetic set") == 1


def test_dmmi_serve_says_the_note_at_start_and_not_again_on_the_first_photo(tmp_path, capsys, caplog, monkeypatch):
    from dmmi import serve as serving

    predictor = Predictor.load(_model(tmp_path, "synthetic"), device="cpu")
    server = serving.make_server(predictor, "127.0.0.1", 0, quiet=True, ui=False)
    monkeypatch.setattr(server, "serve_forever", lambda: None)  # start, print, stop at once
    assert serving.serve(server, "127.0.0.1") == 0
    assert capsys.readouterr().out.count("trained on dmmi's synthetic set") == 1
    with caplog.at_level(logging.WARNING, logger="dmmi"):
        predictor.predict(_image(tmp_path / "photo.jpg", 96, 64), "the red circle")  # what a request runs
    assert not _notes(caplog)
