"""`dmmi export --format onnx`: onnxruntime (CPU) reproduces torch's logits, the batch is dynamic,
the sidecar says how to feed the graph, and bad arguments fail in one line before any export.

One export per preset (~1-1.5 min each on one core: torch.export + onnxscript's optimiser)."""

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

import dmmi.export as export_mod
from dmmi.cli import main as cli
from dmmi.config import load_config
from dmmi.data.tokenize import encode, load_tokenizer
from dmmi.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dmmi.models import build_model
from dmmi.models.io import save_model_file

TEXTS = ["the man on the left", "leftmost dog", "all three cups on the table at the back of the room"]


def _build(preset: str):
    cfg = load_config(preset)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg.model).eval()
    if "location_prior" in model.logit_hooks:  # zero-initialised: give it slopes (a random map has one candidate
        torch.nn.init.normal_(model.location_prior.slopes.weight, std=0.05)  # only: see the test below)
    return model, cfg


def _inputs(cfg, batch: int):
    """image (B, 3, S, S) normalised, input_ids / attention_mask (B, L) from the real tokenizer."""
    S, L = cfg.model.image_size, cfg.model.max_tokens
    tok = load_tokenizer(cfg.model.text_encoder)
    enc = [encode(tok, TEXTS[i % len(TEXTS)], L) for i in range(batch)]
    g = torch.Generator().manual_seed(batch)
    image = torch.rand(batch, 3, S, S, generator=g)
    image = (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    ids = torch.tensor([e.input_ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    return image, ids, mask


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("dmmi: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dmmi_tiny", "dmmi_lite", "demo_lite"])
def test_onnxruntime_reproduces_torch_logits_at_batch_1_and_3(preset, tmp_path, capsys):
    model, cfg = _build(preset)
    model_file = save_model_file(tmp_path / f"{preset}.pt", model, cfg)
    out = tmp_path / "export" / "m.onnx"
    assert cli(["export", str(model_file), "--format", "onnx", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out

    S, L = cfg.model.image_size, cfg.model.max_tokens
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("image", ["batch", 3, S, S]), ("input_ids", ["batch", L]), ("attention_mask", ["batch", L])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch", 2, S, S])]
    for batch in (1, 3):
        image, ids, mask = _inputs(cfg, batch)
        with torch.no_grad():  # after the export in this process: it must have left no traced state behind
            ref = model(image, ids, mask).logits.numpy()
        got = session.run(["logits"], {"image": image.numpy(), "input_ids": ids.numpy(),
                                       "attention_mask": mask.numpy()})[0]
        assert got.shape == (batch, 2, S, S)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
        if batch == 3:  # the rows differ (three expressions): a batch-1 graph broadcast would not pass
            assert np.abs(ref[0] - ref[2]).max() > 1e-3

    side = json.loads((tmp_path / "export" / "m.onnx.json").read_text())
    assert side["format"] == "dmmi-onnx" and side["file"] == "m.onnx" and side["external_data"] is None
    assert side["preset"] == preset and side["opset"] == 18 == export_mod.OPSET
    assert side["image_size"] == S and side["max_tokens"] == L
    assert side["tokenizer"] == cfg.model.text_encoder
    load_tokenizer(side["tokenizer"])  # names something the tokenizer loader takes
    from tokenizers import Tokenizer

    single = Tokenizer.from_file(str(out.parent / side["tokenizer_file"]))  # the same tokens as dmmi's
    for text in TEXTS:
        enc = encode(load_tokenizer(cfg.model.text_encoder), text, L)
        assert single.encode(text).ids[:L] == enc.input_ids[:enc.length]
    pre = side["preprocess"]
    assert pre["mean"] == list(IMAGENET_MEAN) and pre["std"] == list(IMAGENET_STD) and pre["scale"] == 1 / 255
    assert side["inputs"]["image"] == {"shape": ["batch", 3, S, S], "dtype": "float32"}
    assert side["inputs"]["input_ids"]["dtype"] == side["inputs"]["attention_mask"]["dtype"] == "int64"
    assert side["outputs"]["logits"]["channels"] == ["background", "referred"]
    assert "logits[:, 1] > logits[:, 0]" in side["postprocess"]["mask"]
    assert "bilinear" in side["postprocess"]["at_original_size"]


def _two_candidates(batch: int, h: int = 24, w: int = 24) -> torch.Tensor:
    """logits (B, 2, h, w): two foreground blobs per map (left / right, or top / bottom), background elsewhere."""
    logits = torch.zeros(batch, 2, h, w)
    logits[:, 1] = -4.0
    for b in range(batch):
        if b % 2 == 0:
            logits[b, 1, 8:14, 2:7], logits[b, 1, 9:16, 15:21] = 3.0, 2.0
        else:
            logits[b, 1, 1:5, 6:12], logits[b, 1, 17:22, 10:20] = 2.5, 3.5
    return logits


def test_object_location_prior_exports_and_moves_candidates_as_in_torch():
    """demo_lite's object-mode prior (masked max-pool labelling, scatter_reduce box centres): a random
    model's map is one candidate, whose shift is 0 by construction, so the full-model test above cannot
    see this part; here two candidates per map must move by the same amounts in onnxruntime."""
    from dmmi.models.extras import LocationPrior

    torch.manual_seed(0)
    prior = LocationPrior(16, gain=50, mode="object").eval()
    torch.nn.init.normal_(prior.slopes.weight, std=0.1)

    def inputs(batch):
        words = torch.randn(batch, 20, 16)
        mask = torch.ones(batch, 20, dtype=torch.long)
        mask[:, 6:] = 0
        return _two_candidates(batch), words, mask

    program = export_mod.to_onnx(prior, inputs(2), ("logits_in", "words", "word_mask"), ("logits",))
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        logits, words, mask = inputs(batch)
        with torch.no_grad():
            ref = prior(logits, words, mask).numpy()
        got = session.run(["logits"], {"logits_in": logits.numpy(), "words": words.numpy(),
                                       "word_mask": mask.numpy()})[0]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
        shift = got[:, 1] - logits[:, 1].numpy()
        assert np.abs(shift).max() > 1.0  # the candidates moved
        assert np.abs(shift[logits[:, 1].numpy() < 0]).max() == 0  # nothing else did


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    model, cfg = _build("dmmi_tiny")
    return save_model_file(tmp_path_factory.mktemp("model") / "tiny.pt", model, cfg)


@pytest.fixture
def no_export(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.onnx.export was called")

    monkeypatch.setattr(torch.onnx, "export", refuse)


def test_unknown_format_is_one_line_before_the_model_is_read(tmp_path, capsys, no_export):
    out = tmp_path / "m.tflite"
    assert cli(["export", str(tmp_path / "missing.pt"), "--format", "tflite", "--out", str(out)]) == 2
    _one_line_error(capsys, "--format 'tflite'", "onnx")
    assert not out.exists()


def test_unwritable_out_is_one_line_before_exporting(tiny_file, tmp_path, capsys, no_export):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert cli(["export", str(tiny_file), "--out", str(folder)]) == 2
    _one_line_error(capsys, str(folder), "is a folder")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli(["export", str(tiny_file), "--out", str(blocker / "m.onnx")]) == 2
    _one_line_error(capsys, str(blocker / "m.onnx"), f"{blocker} is not a folder")
    sidecar_dir = tmp_path / "m.onnx.json"  # the sidecar's name taken by a folder
    sidecar_dir.mkdir()
    assert cli(["export", str(tiny_file), "--out", str(tmp_path / "m.onnx")]) == 2
    _one_line_error(capsys, "sidecar", str(sidecar_dir))
    assert not (tmp_path / "m.onnx").exists()
    tokenizer_dir = tmp_path / "t.onnx.tokenizer.json"  # the tokenizer file's name taken by a folder
    tokenizer_dir.mkdir()
    assert cli(["export", str(tiny_file), "--out", str(tmp_path / "t.onnx")]) == 2
    _one_line_error(capsys, "tokenizer", str(tokenizer_dir))
    assert not (tmp_path / "t.onnx").exists() and not (tmp_path / "t.onnx.json").exists()


def test_unreadable_model_is_one_line(tmp_path, capsys, no_export):
    out = tmp_path / "m.onnx"
    assert cli(["export", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    _one_line_error(capsys, "missing.pt", "not found")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert cli(["export", str(garbage), "--out", str(out)]) == 2
    _one_line_error(capsys, str(garbage), "not a dmmi checkpoint")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    assert cli(["export", str(truncated), "--out", str(out)]) == 2
    _one_line_error(capsys, str(truncated))
    assert not out.exists() and not (tmp_path / "m.onnx.json").exists()


def test_exporter_failure_is_one_line_naming_the_model_and_the_cause(tiny_file, tmp_path, capsys, monkeypatch):
    def fail(*a, **k):
        try:
            raise RuntimeError("aten.equal.default\nlong report ...")
        except RuntimeError as e:
            raise ValueError("Failed to export the model with torch.export.\nstep 1/3 ...") from e

    monkeypatch.setattr(torch.onnx, "export", fail)
    out = tmp_path / "m.onnx"
    assert cli(["export", str(tiny_file), "--out", str(out)]) == 2
    _one_line_error(capsys, str(tiny_file), "torch.onnx.export failed", "RuntimeError: aten.equal.default")
    assert not out.exists() and not (tmp_path / "m.onnx.json").exists()


def test_missing_onnx_packages_are_named(tiny_file, tmp_path, capsys, monkeypatch, no_export):
    real = export_mod.importlib.util.find_spec
    monkeypatch.setattr(export_mod.importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    assert cli(["export", str(tiny_file), "--out", str(tmp_path / "m.onnx")]) == 2
    _one_line_error(capsys, "onnxscript", ".[onnx]")


def test_the_readme_onnx_recipe_runs_without_dmmi(tmp_path, monkeypatch):
    """The README's onnxruntime + tokenizers snippet, run as written, gives torch's logits for the
    image as dmmi's Predictor prepares it."""
    import re
    from pathlib import Path

    from PIL import Image

    from dmmi.inference import Predictor

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    recipe = re.search(r"```python\n(import json\nimport numpy as np, onnxruntime as ort.*?)```", readme, re.S).group(1)
    model, cfg = _build("dmmi_tiny")
    export_mod.export_onnx(model, cfg, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg", quality=95)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(recipe, "README.md", "exec"), scope)
    predictor = Predictor(model, cfg, device="cpu")
    prepared = predictor.prepare(tmp_path / "photo.jpg", ["the red circle"])
    with torch.no_grad():
        ref = model(prepared.image[None], torch.tensor([prepared.encoded[0].input_ids]),
                    torch.tensor([prepared.encoded[0].attention_mask])).logits.numpy()
    np.testing.assert_allclose(scope["logits"], ref, rtol=0, atol=1e-3)
    assert scope["mask"].shape == (cfg.model.image_size, cfg.model.image_size)
