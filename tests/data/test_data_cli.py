"""``dmmi data synth`` and ``dmmi data stats`` through ``dmmi.cli.main``."""

import hashlib
import json
import pickle

import pytest

from dmmi.cli import main
from dmmi.data.synthetic import generate


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dmmi: error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_synth_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = main(["data", "synth", "--out", str(out), "--images", "6", "--seed", "2", "--size", "96"])
    assert rc == 0
    text = capsys.readouterr().out
    refs_path = out / "synthetic" / "refs(final).p"
    assert refs_path.is_file() and (out / "synthetic" / "instances.json").is_file()
    assert len(list((out / "images").glob("*.png"))) == 6
    refs = pickle.loads(refs_path.read_bytes())
    assert len(refs) == 24  # 4 expressions per image by default
    assert "6 images (96px)" in text and str(refs_path) in text and str(out / "images") in text
    # the CLI is a thin wrapper: same files as generate() with the same arguments
    generate(tmp_path / "api", n_images=6, seed=2, image_size=96)
    assert _hashes(out) == _hashes(tmp_path / "api")


def test_synth_json_summary(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["data", "synth", "--out", str(out), "--images", "5", "--refs-per-image", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 5 and summary["n_refs"] == 15
    assert sum(summary["types"].values()) == 15
    assert summary["refs_path"] == str(out / "synthetic" / "refs(final).p")
    assert main(["data", "synth", "--out", str(tmp_path / "t"), "--images", "20", "--splits", "0.5,0.25,0.25",
                 "--json"]) == 0
    splits = json.loads(capsys.readouterr().out)["splits"]
    assert [splits[s]["images"] for s in ("train", "val", "test")] == [10, 5, 5]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["data", "synth"], ["--out"]),
        (["data", "synth", "--images", "3"], ["--out"]),
        (["data", "synth", "--out", "X", "--images", "-3"], ["--images", "-3"]),
        (["data", "synth", "--out", "X", "--images", "0"], ["--images"]),
        (["data", "synth", "--out", "X", "--images", "ten"], ["--images", "ten"]),
        (["data", "synth", "--out", "X", "--size", "16"], ["--size"]),
        (["data", "synth", "--out", "X", "--seed", "1.5"], ["--seed"]),
        (["data", "synth", "--out", "X", "--max-objects", "9"], ["--max-objects"]),
        (["data", "synth", "--out", "X", "--hard-share", "2"], ["--hard-share"]),
        (["data", "synth", "--out", "X", "--hard-share", "lots"], ["--hard-share"]),
        (["data", "synth", "--out", "X", "--splits", "0.9,0.1"], ["--splits", "0.9,0.1"]),
        (["data", "synth", "--out", "X", "--splits", "a,b,c"], ["--splits"]),
    ],
)
def test_synth_bad_arguments_one_line(tmp_path, capsys, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "X").exists()  # nothing written on a bad call


def test_synth_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["data", "synth", "--out", str(f), "--images", "2"]) == 2
    _one_line_error(capsys, str(f))


def test_stats_on_a_synthetic_folder(tmp_path, capsys):
    out = tmp_path / "syn"
    summary = generate(out, n_images=10, seed=4)
    # the folder from `data synth` is recognised without --dataset
    assert main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["dataset"] == "synthetic"
    for t in ("zero", "one", "many"):
        assert stats["total"][t]["refs"] == summary["types"][t]
    assert stats["total"]["all"]["refs"] == summary["n_refs"]
    assert stats["total"]["all"]["images"] == 10
    assert set(stats["splits"]) == {"train", "val", "test"}
    assert main(["data", "stats", str(out), "--dataset", "synthetic"]) == 0
    table = capsys.readouterr().out
    assert "synthetic" in table and "zero" in table and "many" in table


def test_stats_errors_one_line(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "missing")]) == 2
    _one_line_error(capsys, "missing")
    assert main(["data", "stats"]) == 2
    _one_line_error(capsys, "DIR")
    assert main(["data", "stats", str(tmp_path), "--format", "coco"]) == 2
    _one_line_error(capsys, "--format", "coco")
    assert main(["data", "stats", str(tmp_path)]) == 2  # an empty folder: the loader names the file
    _one_line_error(capsys, "refs(final).p")


def test_data_without_subcommand_prints_help(capsys):
    assert main(["data"]) == 1
    assert "synth" in capsys.readouterr().out
