"""The three verbs end to end on CPU: train -> evaluate -> predict, resume, torchrun, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dmmi.cli import main as cli
from dmmi.config import load_config
from dmmi.data.synthetic import generate
from dmmi.data.wording import CATEGORIES
from dmmi.engine.train import train
from dmmi.errors import DmmiError
from dmmi.inference import Predictor
from dmmi.models.io import load_model_file

FAST = ["train.log_every=2", "train.batch_size=4", "eval.batch_size=8"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, n_images=40, seed=3, image_size=64, refs_per_image=3)
    return root


def _cfg(synth, out, *extra):
    return load_config("dmmi_tiny", [f"data.root={synth}", f"train.output_dir={out}", *FAST, *extra])


def test_train_evaluate_predict(synth, tmp_path, capsys):
    result = train(_cfg(synth, tmp_path / "run", "train.epochs=1"), progress=False, log=lambda *a: None)
    assert result.steps > 0 and result.best_path.is_file() and result.last_path.is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_sim" in r and "loss_con" in r for r in records)  # both auxiliary losses trained
    assert any("val" in r for r in records)  # selected on val, never test
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "curves.png").is_file()

    assert cli(["evaluate", "--checkpoint", str(result.best_path), "--split", "test", "--gallery",
                str(tmp_path / "gal"), "--json", str(tmp_path / "res.json"), "--by-wording", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "oIoU" in printed and "cIoU" in printed and "position" in printed
    res = json.loads((tmp_path / "res.json").read_text())
    counts = res["results"]["dmmi"]["counts"]
    assert counts["total"] == res["samples"] == counts["zero"] + counts["one"] + counts["many"]
    assert counts["zero"] > 0 and counts["many"] > 0
    groups = res["results"]["groups"]  # --by-wording: a partition of the samples, in category order
    assert list(groups) == [c for c in CATEGORIES if c in groups] and {"attribute", "position"} <= set(groups)
    for t in ("total", "zero", "one", "many"):
        assert sum(g["dmmi"]["counts"][t] for g in groups.values()) == counts[t]
    assert all(groups[g]["dmmi"]["counts"]["one"] == 0 for g in ("union", "plural", "count") if g in groups)
    assert list((tmp_path / "gal").glob("*_successes.png"))

    image = next((synth / "images").iterdir())
    assert cli(["predict", str(image), "the red circle", "all the shapes", "--checkpoint", str(result.best_path),
                "--out", str(tmp_path / "pred")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("->") == 2
    masks = sorted((tmp_path / "pred").glob("*_mask.png"))
    assert len(masks) == 2 and Image.open(masks[0]).size == Image.open(image).size

    predictor = Predictor.load(result.best_path, device="cpu")
    a = predictor.predict(image, "the red circle")
    b = predictor.predict(str(image), ["the red circle", "a blue star"])
    assert np.array_equal(a.mask, b[0].mask)  # loaded once, deterministic, batched or not
    assert a.mask.shape == Image.open(image).size[::-1]


def test_resume_continues_exactly(synth, tmp_path):
    common = ("train.epochs=2", "data.val_split=val")
    straight = train(_cfg(synth, tmp_path / "a", *common), progress=False, log=lambda *a: None)
    steps_per_epoch = straight.steps // 2
    train(_cfg(synth, tmp_path / "b", *common, f"train.max_steps={steps_per_epoch}",
               f"train.log_every={steps_per_epoch}"), progress=False, log=lambda *a: None)
    resumed = train(_cfg(synth, tmp_path / "b", *common), resume=str(tmp_path / "b" / "last.pt"), progress=False,
                    log=lambda *a: None)
    assert resumed.steps == straight.steps
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert diff == []
    minutes = [json.loads(line)["minutes"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert minutes == sorted(minutes)  # the resumed segment goes on with the training clock (budgets carry over)


def test_budget_schedule_decays_over_the_budget_not_the_epochs(synth, tmp_path):
    """train.schedule=budget: a run cut at max_steps still ends its poly decay at zero."""
    def lrs(out, *extra):
        cfg = _cfg(synth, tmp_path / out, "train.epochs=40", "train.max_steps=4", "train.log_every=1",
                   "data.val_split=null", *extra)
        train(cfg, progress=False, log=lambda *a: None)
        recs = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return cfg.train.lr, [r["lr"] for r in recs if "lr" in r]

    base, by_epochs = lrs("epochs")
    assert by_epochs[-1] > 0.95 * base  # 4 of 40 epochs' steps: barely decayed
    base, by_budget = lrs("budget", "train.schedule=budget")
    assert by_budget[0] == pytest.approx(base * 0.75**0.9)  # logged after step 1 of 4: the lr of step 2
    assert by_budget[-1] == 0.0


def test_eval_every_validates_every_nth_epoch_and_when_the_run_ends(synth, tmp_path):
    def run(out, *extra):
        result = train(_cfg(synth, tmp_path / out, "data.val_split=val", *extra), progress=False, log=lambda *a: None)
        recs = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return result.steps, [round(r["epoch"], 2) for r in recs if "val" in r]

    steps, validated = run("every2", "train.epochs=3", "train.eval_every=2")
    assert validated == [2.0, 3.0]  # every 2nd epoch, and the last one
    # a budget that ends inside epoch 2 (as demo_lite's 10 minutes, eval_every 20): one validation, at the stop
    _, validated = run("budget", "train.epochs=20", "train.eval_every=20", f"train.max_steps={steps // 3 + 2}",
                       "train.log_every=1")
    assert len(validated) == 1 and 1.0 < validated[0] < 2.0
    with pytest.raises(DmmiError, match="train.eval_every must be >= 1"):
        _cfg(synth, tmp_path / "never", "train.eval_every=0")


def test_curves_drawn_for_an_ablation_without_auxiliary_losses(synth, tmp_path):
    out = tmp_path / "abl"
    train(_cfg(synth, out, "train.max_steps=2", "train.log_every=1", "data.val_split=null",
               "model.i2t_decoder=false", "model.contrastive=false"), progress=False, log=lambda *a: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and not any("loss_sim" in r or "loss_con" in r for r in records)
    assert (out / "curves.png").is_file()


def test_resume_refuses_another_model(synth, tmp_path):
    train(_cfg(synth, tmp_path / "a", "train.max_steps=2"), progress=False, log=lambda *a: None)
    with pytest.raises(DmmiError, match="checkpoint of another model"):
        train(_cfg(synth, tmp_path / "b", "model.multi_scale=false"), resume=str(tmp_path / "a" / "last.pt"),
              progress=False)


def test_torchrun_two_processes_train_and_evaluate(synth, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m",
           "dmmi.cli"]
    out = tmp_path / "ddp"
    subprocess.run(run + ["train", "--config", "dmmi_tiny", "--set", f"data.root={synth}", "--set",
                          f"train.output_dir={out}", "--set", "train.max_steps=1", "--set", "train.log_every=1",
                          "--set", "train.batch_size=2", "--set", "data.val_split=null", "--no-progress"],
                   check=True, env=env, capture_output=True, timeout=300)
    assert (out / "best.pt").is_file()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1
    subprocess.run(run + ["evaluate", "--checkpoint", str(out / "best.pt"), "--split", "test", "--json",
                          str(tmp_path / "ddp.json"), "--no-progress"],
                   check=True, env=env, capture_output=True, timeout=300)
    res = json.loads((tmp_path / "ddp.json").read_text())
    assert res["world_size"] == 2
    assert res["results"]["dmmi"]["counts"]["total"] == res["samples"]  # both shards summed, no duplicates


def test_bad_inputs_give_one_line_errors(synth, tmp_path, capsys):
    result = train(_cfg(synth, tmp_path / "run", "train.max_steps=1", "data.val_split=null"), progress=False,
                   log=lambda *a: None)
    ckpt = str(result.best_path)
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")

    def error_of(args):
        assert cli(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        return err

    assert "cannot read image" in error_of(["predict", str(not_image), "a cat", "--checkpoint", ckpt])
    assert "empty expression" in error_of(["predict", str(not_image), "  ", "--checkpoint", ckpt])
    assert "checkpoint not found" in error_of(["predict", str(not_image), "a", "--checkpoint", "nope.pt"])
    if not torch.cuda.is_available():
        assert "no CUDA device" in error_of(["predict", str(not_image), "a", "--checkpoint", ckpt, "--device",
                                             "cuda"])
    with pytest.raises(DmmiError, match="preset 'dmmi_tiny', but 'dmmi_lite'"):
        Predictor.load(ckpt, expect_preset="dmmi_lite")
    model, cfg = load_model_file(ckpt)
    assert cfg.preset == "dmmi_tiny"


def test_evaluation_skips_and_counts_bad_samples(tmp_path, capsys):
    root = tmp_path / "synth"
    generate(root, n_images=12, seed=5, image_size=64, refs_per_image=2)
    result = train(load_config("dmmi_tiny", [f"data.root={root}", f"train.output_dir={tmp_path / 'r'}",
                                             "train.max_steps=1", "data.val_split=null", *FAST]),
                   progress=False, log=lambda *a: None)
    import pickle

    refs = pickle.loads((root / "synthetic" / "refs(final).p").read_bytes())
    test_images = {r["image_id"] for r in refs if r["split"] == "test"}
    meta = json.loads((root / "synthetic" / "instances.json").read_text())
    victim = next(im for im in meta["images"] if im["id"] in test_images)
    (root / "images" / victim["file_name"]).write_bytes(b"corrupt")
    n_bad = sum(len(r["sentences"]) for r in refs if r["image_id"] == victim["id"] and r["split"] == "test")
    assert cli(["evaluate", "--checkpoint", str(result.best_path), "--data", str(root), "--split", "test",
                "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {n_bad} bad sample" in out


def test_demo_command_runs_end_to_end(synth, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--steps", "3", "--data", str(synth), "--config", "dmmi_tiny", "--out", str(out),
                "--set", "train.epochs=1", "--set", "train.batch_size=4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "DMMI protocol" in printed and "where everything is" in printed and "by wording" in printed
    assert "trained 3 steps in" in printed and "--model " + str(out / "model") in printed
    summary = json.loads((out / "results.json").read_text())
    assert summary["test"]["dmmi"]["counts"]["total"] > 0 and summary["train_minutes"] is not None
    assert summary["train_steps"] == 3  # a step budget: exact
    assert list((out / "gallery").glob("*.png")) and (out / "curves.png").is_file()
    card = (out / "model" / "README.md").read_text()  # the model's card carries its test figures
    oiou = summary["test"]["dmmi"]["oIoU"]
    assert "## Test figures (test split, DMMI protocol)" in card and ("-" if oiou is None else f"{oiou:.2f}") in card
    assert f'Predictor.from_pretrained("{out / "model"}")' in card
    from dmmi.hub import from_pretrained

    assert from_pretrained(out / "model")[1].preset == "dmmi_tiny"  # still loads after the rewrite
    # reuse the trained model instead of training
    assert cli(["demo", "--checkpoint", str(out / "best.pt"), "--data", str(synth), "--out", str(tmp_path / "again"),
                "--no-progress"]) == 0
    assert json.loads((tmp_path / "again" / "results.json").read_text())["train_minutes"] is None


def test_validation_carved_out_of_train(synth, tmp_path):
    from dmmi.data.tokenize import load_tokenizer
    from dmmi.engine.train import build_datasets

    cfg = _cfg(synth, tmp_path / "v", "data.val_from_train=0.3", "data.val_split=null")
    train_ds, val_ds = build_datasets(cfg, load_tokenizer(cfg.model.text_encoder), seed=0)
    train_images = {r.image_id for r in train_ds.refs}
    val_images = {r.image_id for r in val_ds.refs}
    assert val_images and train_images and not (train_images & val_images)  # disjoint by image
    assert not val_ds.train and len(val_ds.refs) + len(train_ds.refs) == len(train_ds.data.split("train"))
    again, _ = build_datasets(cfg, load_tokenizer(cfg.model.text_encoder), seed=1)
    assert {r.image_id for r in again.refs} == train_images  # deterministic hold-out
    lines = []
    result = train(_cfg(synth, tmp_path / "r", "data.val_from_train=0.3", "data.val_split=null", "train.max_steps=2"),
                   progress=False, log=lines.append)
    assert any("val" in r for r in result.history)
    assert "model selection on 30% of the train images, held out (data.val_from_train=0.3)" in lines
    with pytest.raises(DmmiError, match="both choose the validation images"):  # never one silently over the other
        train(_cfg(synth, tmp_path / "both", "data.val_from_train=0.3"), progress=False, log=lambda *a: None)
    assert not (tmp_path / "both").exists()  # refused before anything is written


def test_evaluate_overrides_are_limited_and_typed(synth, tmp_path, capsys):
    result = train(_cfg(synth, tmp_path / "run", "train.max_steps=1", "data.val_split=null"), progress=False,
                   log=lambda *a: None)
    args = ["evaluate", "--checkpoint", str(result.best_path), "--split", "test", "--no-progress"]
    assert cli(args + ["--set", "model.multi_scale=false"]) == 2
    assert "only data.*, eval.* fields may be set here" in capsys.readouterr().err
    assert cli(args + ["--set", "eval.batch_size=abc"]) == 2
    assert "eval.batch_size: expected an integer" in capsys.readouterr().err
    assert cli(args + ["--set", "eval.batch_size=3", "--set", "data.workers=0"]) == 0


def test_the_demo_says_when_the_machine_is_slower_than_expected():
    from dmmi.engine.demo import REFERENCE_STEP_SECONDS, expected_minutes, speed_note

    steps = 1000
    expected = expected_minutes("demo_lite", steps)
    assert expected == pytest.approx(steps * REFERENCE_STEP_SECONDS / 60)
    assert "x the" not in speed_note(steps, expected * 1.1, "demo_lite")  # about as expected: no complaint
    slow = speed_note(steps, expected * 2, "demo_lite")
    assert "2.0x the" in slow and "only the time" in slow
    assert expected_minutes("dmmi_tiny", steps) is None and speed_note(3, 0.1, "dmmi_tiny") == "trained 3 steps in 0.1 min"


def test_bad_demo_steps_are_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DMMI_CACHE", str(tmp_path / "cache"))
    assert cli(["demo", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err and not any(tmp_path.iterdir())
