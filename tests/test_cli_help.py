"""The ``dmmi`` command line: every option has a help text, every command ends its help with
examples that parse, and commands refuse bad input in one line before writing anything."""

import argparse
import shlex

import pytest
import torch

from dmmi.cli import build_parser
from dmmi.cli import main as cli
from dmmi.config import load_config
from dmmi.models import build_model
from dmmi.models.io import save_model_file

pytestmark = pytest.mark.timeout(180)

NO_HELP_NEEDED = {"-h", "--help", "--version"}


def _walk(parser: argparse.ArgumentParser, path=("dmmi",)):
    """-> (command path, parser, is_leaf) for the parser and every sub-command under it."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    yield path, parser, not subs
    for action in subs:
        for name, child in action.choices.items():
            yield from _walk(child, (*path, name))


def _commands():
    return list(_walk(build_parser()))


def test_the_walk_finds_every_command():
    names = {" ".join(path[1:]) for path, _, _ in _commands()}
    assert {"train", "evaluate", "predict", "demo", "data synth", "data stats", "convert", "export", "presets",
            "config show", "serve"} <= names


def test_every_option_has_a_help_text():
    missing = []
    for path, parser, _ in _commands():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or NO_HELP_NEEDED & set(action.option_strings):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without a help text: {missing}"


def test_every_command_ends_its_help_with_examples():
    bad = []
    for path, parser, leaf in _commands():
        if not leaf:
            continue
        epilog = parser.epilog or ""
        if "examples:" not in epilog or not issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter):
            bad.append(" ".join(path))
            continue
        text = parser.format_help()
        assert text.rstrip().endswith(epilog.rstrip()), " ".join(path)  # kept as written, at the end
    assert not bad, f"commands whose --help does not end with 'examples:' (RawDescriptionHelpFormatter): {bad}"


def test_top_level_help_lists_the_common_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("dmmi demo", "dmmi predict", "dmmi train", "dmmi evaluate", "dmmi data synth"):
        assert f"\n  {command} " in out, command


def _example_commands(epilog: str) -> list[list[str]]:
    """The dmmi command lines of an epilog (continuations joined, comments dropped) as argv lists."""
    joined = epilog.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.split(" # ")[0].strip()
        if line.startswith("dmmi "):
            commands.append(shlex.split(line)[1:])
        elif line.startswith("torchrun ") and " -m dmmi.cli " in line:
            commands.append(shlex.split(line.split(" -m dmmi.cli ", 1)[1]))
    return commands


def test_the_examples_are_real_command_lines():
    """Every example parses with the options the command really has (a renamed option fails here)."""
    seen = 0
    parsers = [(path, parser) for path, parser, _ in _commands()]
    for path, parser in parsers:
        for argv in _example_commands(parser.epilog or ""):
            seen += 1
            try:
                args = build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"{' '.join(path)}: example `dmmi {' '.join(argv)}` does not parse")
            assert getattr(args, "func", None), argv
        if len(path) > 1 and parser.epilog:  # the examples of a command run that command
            own = _example_commands(parser.epilog)
            assert any(argv[:len(path) - 1] == list(path[1:]) for argv in own), " ".join(path)
    assert seen >= 30


# ----------------------------------------------------------------------------- no write before validating

def _one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("dmmi: note:")]
    assert len(lines) == 1 and lines[0].startswith("dmmi: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _created(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = load_config("dmmi_tiny", [])
    torch.manual_seed(0)
    return save_model_file(tmp_path_factory.mktemp("model") / "tiny.pt", build_model(cfg.model), cfg)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from dmmi.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, n_images=12, seed=1, image_size=64, refs_per_image=2)
    return root


def test_bare_train_is_one_line_and_writes_nothing(cwd, capsys):
    assert cli(["train"]) == 2  # used to leave runs/dmmi/config.yaml behind
    _one_line_error(capsys, "data.root is not set", "--set data.root=DIR")
    assert _created(cwd) == []


def test_train_names_a_missing_data_root_or_resume_file(cwd, tmp_path, capsys):
    assert cli(["train", "--config", "dmmi_tiny", "--set", f"data.root={tmp_path / 'nowhere'}"]) == 2
    _one_line_error(capsys, "data.root", "nowhere", "no such folder")
    assert cli(["train", "--config", "dmmi_tiny", "--set", f"data.root={tmp_path}", "--resume", "gone.pt"]) == 2
    _one_line_error(capsys, "--resume gone.pt", "no such file")
    assert _created(cwd) == []


def test_train_reads_the_resume_checkpoint_before_writing_into_the_run_folder(cwd, synth, capsys):
    run = cwd / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a checkpoint")
    args = ["train", "--config", "dmmi_tiny", "--set", f"data.root={synth}", "--set", f"train.output_dir={run}",
            "--no-progress"]
    assert cli([*args, "--resume", "auto"]) == 2  # used to write run/config.yaml (and tb/) first
    _one_line_error(capsys, "last.pt")
    assert _created(cwd) == ["run", "run/last.pt"]
    assert cli([*args, "--resume", str(run / "last.pt"), "--set", "train.output_dir=new"]) == 2
    _one_line_error(capsys, "last.pt")
    assert _created(cwd) == ["run", "run/last.pt"]


def test_demo_checks_its_options_before_generating_data(cwd, capsys):
    for argv, words in ((["--config", "nope"], ("unknown preset 'nope'",)),
                        (["--set", "train.lr=-1"], ("train.lr",)),
                        (["--set", "train.bogus=1"], ("bogus",)),
                        (["--checkpoint", "gone.pt"], ("--checkpoint gone.pt",))):
        assert cli(["demo", "--data", "data", "--out", "out", *argv]) == 2, argv
        _one_line_error(capsys, *words)
        assert _created(cwd) == [], argv


def test_evaluate_and_predict_write_nothing_on_bad_input(cwd, tiny, capsys):
    assert cli(["evaluate", "--checkpoint", "gone.pt", "--gallery", "g/sub", "--json", "r/x.json",
                "--sweep-threshold", "s/sweep.png"]) == 2
    _one_line_error(capsys, "gone.pt")
    assert cli(["evaluate", "--checkpoint", str(tiny), "--data", "nowhere", "--gallery", "g"]) == 2
    _one_line_error(capsys, "nowhere")
    assert cli(["predict", "gone.png", "the dog", "--checkpoint", str(tiny), "--out", "o"]) == 2
    _one_line_error(capsys, "gone.png")
    assert cli(["predict", "--jobs", "gone.jsonl", "--checkpoint", str(tiny), "--out", "o/r.jsonl"]) == 2
    _one_line_error(capsys, "gone.jsonl")
    assert _created(cwd) == []


def test_convert_refuses_bad_options_before_writing(cwd, tiny, capsys):
    assert cli(["convert", str(tiny), "--out", "o/sub", "--preset", "nope"]) == 2
    _one_line_error(capsys, "unknown preset 'nope'")
    assert cli(["convert", str(tiny), "--out", "o/sub", "--set", "model.bogus=1"]) == 2
    _one_line_error(capsys, "--set", "bogus")
    # a dmmi model keeps its own config: --preset / --set used to be ignored without a word
    assert cli(["convert", str(tiny), "--out", "o/sub", "--preset", "dmmi_swin_t"]) == 2
    _one_line_error(capsys, "--preset / --set", "dmmi model")
    (cwd / "a_file").write_text("x")
    assert cli(["convert", str(tiny), "--out", "a_file/x.pt"]) == 2
    _one_line_error(capsys, "--out a_file/x.pt", "a_file is not a folder")
    assert cli(["convert", str(tiny), "--out", "a_file"]) == 2  # no suffix: a model directory
    _one_line_error(capsys, "--out a_file", "is a file")
    assert cli(["convert", "gone.pth", "--out", "o/x.pt"]) == 2
    _one_line_error(capsys, "gone.pth", "not found")
    assert _created(cwd) == ["a_file"]
    assert cli(["convert", str(tiny), "--out", "o/model"]) == 0  # and a good one still works
    assert (cwd / "o" / "model" / "config.json").is_file()


def test_export_reads_the_model_before_creating_the_out_folder(cwd, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.onnx.export was called")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert cli(["export", "gone.pt", "--out", "exported/m.onnx"]) == 2  # used to leave exported/ behind
    _one_line_error(capsys, "gone.pt", "not found")
    (cwd / "junk.pt").write_bytes(b"not a checkpoint")
    assert cli(["export", "junk.pt", "--out", "exported/deeper/m.onnx"]) == 2
    _one_line_error(capsys, "junk.pt")
    assert cli(["export", "junk.pt", "--out", "junk.pt/m.onnx"]) == 2
    _one_line_error(capsys, "--out junk.pt/m.onnx", "junk.pt is not a folder")
    assert _created(cwd) == ["junk.pt"]


def test_data_synth_refuses_bad_options_before_writing(cwd, capsys):
    for argv, words in ((["--images", "0"], ("--images",)),
                        (["--splits", "1,0,-1"], ("split",)),
                        (["--splits", "0.5,0.5"], ("--splits",)),
                        (["--max-objects", "9"], ("--max-objects",)),
                        (["--seed", "x"], ("--seed",))):
        assert cli(["data", "synth", "--out", "data", *argv]) == 2, argv
        _one_line_error(capsys, *words)
    (cwd / "a_file").write_text("x")
    assert cli(["data", "synth", "--out", "a_file/data", "--images", "2"]) == 2
    _one_line_error(capsys, "a_file")
    assert _created(cwd) == ["a_file"]


def test_data_synth_defaults_to_the_generator_s_own_image_side():
    from dmmi.data.synthetic import DEFAULT_SIDE

    (synth,) = [p for path, p, _ in _commands() if path[1:] == ("data", "synth")]
    (size,) = [a for a in synth._actions if "--size" in a.option_strings]
    assert int(size.default) == DEFAULT_SIDE and f"default {DEFAULT_SIDE}" in size.help
