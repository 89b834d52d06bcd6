"""``dmmi train / evaluate / predict / demo``: argument parsing and dispatch only."""

from __future__ import annotations

import json
from pathlib import Path

from dmmi.errors import DmmiError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


TRAIN_EXAMPLES = """\
examples:
  # the synthetic zero/one/many dataset, then a test-sized model on it (CPU, a few minutes)
  dmmi data synth --out data/synth
  dmmi train --config dmmi_tiny --set data.root=data/synth --set train.output_dir=runs/tiny

  # DMMI Swin-B on Ref-ZOM (the preset selects best.pt on 5% of the train images, held out)
  dmmi train --config dmmi_swin_b --set data.root=/data/refer --set data.image_root=/data/coco

  # ... on RefCOCO (it has a val split)
  dmmi train --config dmmi_swin_b --set data.root=/data/refer --set data.image_root=/data/coco \\
             --set data.format=refer --set data.dataset=refcoco --set data.val_split=val \\
             --set data.val_from_train=0

  # continue a stopped run exactly (train.output_dir's last.pt)
  dmmi train --config dmmi_tiny --set data.root=data/synth --set train.output_dir=runs/tiny --resume auto

  # several GPUs: train.batch_size stays the global batch
  torchrun --nproc_per_node 4 -m dmmi.cli train --config dmmi_swin_b --set data.root=/data/refer

  # every config field, its value and meaning
  dmmi config show dmmi_swin_b
"""

EVALUATE_EXAMPLES = """\
examples:
  dmmi evaluate --model runs/tiny/model --split test
  dmmi evaluate --model runs/dmmi/model --split test --gallery gallery/ --json results.json
  dmmi evaluate --model runs/dmmi/model --split val --sweep-threshold sweep.png
  dmmi evaluate --model runs/dmmi/model --split test --threshold 0.7 --min-area 0.005
  dmmi evaluate --checkpoint dmmi_grefumd_swin_b.pt --data /data/refer --set data.format=refer \\
                --set data.dataset=refcocog --set data.split_by=umd --split val
  torchrun --nproc_per_node 8 -m dmmi.cli evaluate --model runs/dmmi/model --split test
"""

PREDICT_EXAMPLES = """\
examples:
  dmmi predict photo.jpg "the two dogs on the left" "a red car" --model runs/demo/model --out preds/
  dmmi predict photos/ "the cat" --model my-dmmi/ --threshold 0.7
  dmmi predict --jobs jobs.jsonl --out results.jsonl --model runs/demo/model --batch-size 32
      (jobs.jsonl: one {"image": "a.jpg", "expressions": ["the dog", "a cat"]} per line)

exit status: 0 all done; 1 done, but some images / jobs lines were skipped (each reported); 2 an error
"""

DEMO_EXAMPLES = """\
examples:
  dmmi demo                                   # generate the data once, train demo_lite, evaluate, show overlays
  dmmi demo --steps 3000 --out runs/demo3k     # train longer (the preset's budget: train.max_steps)
  dmmi demo --checkpoint runs/demo/model      # evaluate an earlier demo model again
  dmmi demo --set model.i2t_decoder=false --set model.contrastive=false   # the ablation
"""


def _parser(subparsers, name: str, help: str, epilog: str, description: str | None = None):
    import argparse

    return subparsers.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                                 epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_config_args(p, default="dmmi_swin_b") -> None:
    p.add_argument("--config", default=default, metavar="PRESET",
                   help=f"preset name (`dmmi presets`) or YAML file (default {default})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable; fields: dmmi config show "
                        "PRESET)")


def register(subparsers) -> None:
    p = _parser(subparsers, "train", "train a model (DDP when launched by torchrun)", TRAIN_EXAMPLES)
    _add_config_args(p)
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue from a last.pt exactly; 'auto': from train.output_dir's last.pt if there is one")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.set_defaults(func=cmd_train)

    p = _parser(subparsers, "evaluate", "evaluate a checkpoint (DMMI and GRES protocols, per type)",
                EVALUATE_EXAMPLES)
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="MODEL",
                   help="a model: best.pt / a .safetensors file, a model directory or a Hub repo id (owner/name)")
    p.add_argument("--data", default=None, metavar="DIR", help="dataset root (default: the checkpoint's data.root)")
    p.add_argument("--split", default=None, help="split to evaluate (default: data.test_split)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override data.* / eval.* fields, e.g. --set data.format=refer (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--reference", action="store_true", help="fp32 reference mode instead of the fast mode")
    p.add_argument("--gallery", default=None, metavar="DIR", help="write success/failure overlays per type")
    p.add_argument("--by-wording", action="store_true",
                   help="also a table per wording (attribute / position / plural / count / union)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--sweep-threshold", default=None, metavar="PNG",
                   help="also evaluate the masks 'p(foreground) > t' for t = 0.05 ... 0.95: a table, PNG (Acc vs oIoU, "
                        "N-acc vs cIoU) and PNG's .json")
    decision_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = _parser(subparsers, "predict", "segment what expressions refer to in an image (or a folder)",
                PREDICT_EXAMPLES)
    p.add_argument("image", nargs="?", help="an image file or a folder of images")
    p.add_argument("expressions", nargs="*", help="one or more English expressions")
    p.add_argument("--jobs", default=None, metavar="JOBS.jsonl",
                   help="batch mode: one {\"image\", \"expressions\"} per line (a relative image: from the jobs file's "
                        "folder); results (COCO RLE masks, scores) "
                        "go to --out RESULTS.jsonl; a re-run skips the lines already done")
    p.add_argument("--batch-jobs", type=int, default=8, metavar="N",
                   help="with --jobs: jobs read and run together, their (image, expression) pairs batched (default 8)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="(image, expression) pairs per model forward (default 8; larger on a GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar with --jobs")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="MODEL",
                   help="a model: best.pt / a .safetensors file, a model directory or a Hub repo id (owner/name)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="output folder: <image file name>__<NN>_<expression>_mask.png / _overlay.png (default "
                        "predictions/); with --jobs: the results file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--reference", action="store_true", help="fp32 reference mode instead of the fast mode")
    decision_options(p)
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images larger than N pixels (width x height; default 40 million)")
    p.set_defaults(func=cmd_predict)

    p = _parser(subparsers, "demo", "the whole system on the embedded synthetic dataset (CPU, offline)",
                DEMO_EXAMPLES)
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="optimiser steps to train (default: the preset's train.max_steps; "
                        "a fixed amount of work: with the same numerics the same result on any machine, only the time differs)")
    p.add_argument("--checkpoint", default=None, metavar="MODEL",
                   help="evaluate this model instead of training one")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="run folder (default runs/demo; one holding an earlier run is kept: runs/demo-2, ...)")
    p.add_argument("--data", default=None, metavar="DIR", help="synthetic dataset folder (generated if missing)")
    p.add_argument("--config", default="demo_lite", metavar="PRESET", help="preset to train (default demo_lite)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the training run, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_train(args) -> int:
    from dmmi.config import load_config
    from dmmi.engine.train import train

    cfg = load_config(args.config, args.overrides)
    _check_train_inputs(cfg, args.resume)  # before the model, the data and the run folder
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if result.interrupted:
        import signal
        import sys

        print(f"dmmi: interrupted by {result.interrupted} at step {result.steps}: {result.last_path} saved; "
              f"continue with the same command and --resume auto", file=sys.stderr)
        number = getattr(signal, result.interrupted, None) if result.interrupted.startswith("SIG") else None
        return 128 + int(number) if number is not None else 1
    print(f"done: {result.steps} steps in {result.minutes:.1f} min; best model {result.best_path}; "
          f"last checkpoint {result.last_path}; metrics {result.output_dir / 'metrics.jsonl'}")
    return 0


def _check_train_inputs(cfg, resume) -> None:
    """One-line DmmiError for what a run cannot start without, before anything is loaded or written."""
    root = cfg.data.root
    if not root:
        raise DmmiError("data.root is not set: pass --set data.root=DIR (a folder with <dataset>/refs(...).p)")
    if not Path(root).is_dir():
        raise DmmiError(f"data.root {root}: no such folder")
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise DmmiError(f"--resume {resume}: no such file (give a last.pt, or 'auto')")


def cmd_evaluate(args) -> int:
    from dmmi.engine.checkpoint import check_writable_folder
    from dmmi.engine.evaluate import evaluate_checkpoint
    from dmmi.metrics import format_group_table, format_table

    # the options and outputs are checked before the evaluation starts, not after it has run for an hour
    check_decision(args)
    if args.json:
        if Path(args.json).is_dir():
            raise DmmiError(f"--json {args.json} is a folder, not a file")
        check_writable_folder(Path(args.json).parent, option="--json")
    if args.gallery:
        check_writable_folder(Path(args.gallery), option="--gallery")
    if args.sweep_threshold:
        if Path(args.sweep_threshold).suffix.lower() != ".png":
            raise DmmiError(f"--sweep-threshold {args.sweep_threshold}: give a .png path (its table goes beside it "
                            "as .json)")
        check_writable_folder(Path(args.sweep_threshold).parent, option="--sweep-threshold")
    from dmmi.decision import describe_decision, describe_min_area
    from dmmi.engine.evaluate import SWEEP_THRESHOLDS, format_sweep, plot_sweep

    results, skipped, info = evaluate_checkpoint(
        args.checkpoint, data_root=args.data, split=args.split, overrides=args.overrides, device=args.device,
        fast=not args.reference, gallery_dir=args.gallery, progress=not args.no_progress, by_wording=args.by_wording,
        sweep=SWEEP_THRESHOLDS if args.sweep_threshold else None, threshold=args.threshold, min_area=args.min_area)
    if not info["is_main"]:
        return 0
    print(f"{info['preset']} on {info['dataset']} / {info['split']}: {info['samples']} samples "
          f"({describe_decision(args.threshold, args.min_area)})")
    print(format_table(results))
    if "groups" in results:
        print()
        print(format_group_table(results["groups"]))
    if skipped.count:
        print(skipped.summary())
    if "sweep" in results:
        print()
        print(f"threshold sweep (mask = p(foreground) > threshold; the argmax is 0.50{describe_min_area(args.min_area)}):")
        print(format_sweep(results["sweep"]))
    gallery_error = info.pop("gallery_error", None)
    if args.json:
        from dmmi.engine.checkpoint import atomic_write

        payload = json.dumps({"results": results, "skipped": skipped.count, **info}, indent=1)
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(payload))  # a failure: one line, metrics shown
        print(f"results written to {args.json}")
    if args.sweep_threshold:
        png = Path(args.sweep_threshold)
        sweep_json = json.dumps({"split": info["split"], "checkpoint": info["checkpoint"], "min_area": args.min_area,
                                 "sweep": results["sweep"]}, indent=1)
        from dmmi.engine.checkpoint import atomic_write

        atomic_write(png.with_suffix(".json"), lambda tmp: tmp.write_text(sweep_json))
        plot_sweep(results["sweep"], png, title=f"{info['preset']} on {info['dataset']} / {info['split']}")
        print(f"threshold sweep written to {png} and {png.with_suffix('.json')}")
    if gallery_error:  # the extra failed last: the evaluation above is printed and saved
        raise DmmiError(gallery_error)
    if args.gallery:
        print(f"overlays written to {args.gallery}")
    return 0


def _images(path: Path) -> list[Path]:
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise DmmiError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            return files
        if not path.exists():
            raise DmmiError(f"image file not found: {path}")
    except OSError as e:
        raise DmmiError(f"cannot look at {path}: {e.strerror or e}") from None
    return [path]


def _output_stem(path: Path, index: int, text: str) -> str:
    """'<image file name>__<NN>_<slug>': the whole name, so x.png and x.jpg never share outputs.

    A file name over 120 bytes is cut, with 8 hex digits of its hash, to stay under 255 bytes.
    """
    name = path.name
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 120:
        import hashlib

        name = f"{raw[:100].decode('utf-8', 'ignore')}~{hashlib.sha1(raw).hexdigest()[:8]}{path.suffix[:10]}"
    from dmmi.engine.checkpoint import slug

    return f"{name}__{index:02d}_{slug(text)}"


def cmd_predict(args) -> int:
    from dmmi.data.images import load_image
    from dmmi.engine.checkpoint import check_writable_folder
    from dmmi.engine.distributed import resolve_device
    from dmmi.errors import printable
    from dmmi.inference import Predictor
    from dmmi.visualize import overlay, save_mask_png

    if args.jobs:
        return _predict_jobs(args)
    if not args.image or not args.expressions:
        raise DmmiError("give an image (or a folder) and at least one expression, or --jobs JOBS.jsonl")
    for e in args.expressions:
        if not e.strip():
            raise DmmiError("empty expression: give some words, e.g. \"the dog on the left\"")
    max_pixels = _check_predict_numbers(args)  # before the model loads
    images = _images(Path(args.image))
    out = Path(args.out or "predictions")
    check_writable_folder(out, "--out")  # before the model is loaded
    device = resolve_device(args.device, option="--device", fix="--device cpu")
    predictor = Predictor.load(args.checkpoint, device=device, fast=not args.reference, max_pixels=max_pixels,
                               threshold=args.threshold, min_area=args.min_area, expressions_per_call=args.batch_size)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DmmiError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    failed = 0
    for path in images:
        try:
            image = load_image(path, max_pixels=max_pixels)
        except DmmiError as e:
            if len(images) == 1:
                raise
            print(f"skipped: {e}")
            failed += 1
            continue
        for i, pred in enumerate(predictor.iter_predict(image, list(args.expressions))):  # one mask at a time
            stem = _output_stem(path, i, pred.text)
            target = out / f"{stem}_overlay.png"
            try:
                save_mask_png(pred.mask, out / f"{stem}_mask.png")
                overlay(image, pred.mask, label_empty=True).save(target)  # PREDICTION_COLOR; "no target" when empty
            except OSError as e:
                raise DmmiError(f"cannot write {target}: {e.strerror or e}") from None
            print(f"{printable(path.name)}: \"{printable(pred.text)}\" -> {pred.describe()}  ({printable(target)})")
            del pred
        del image
    if failed == len(images):
        raise DmmiError(f"none of the {failed} images in {args.image} could be read (the reasons are above)")
    if failed:
        print(f"skipped {failed} unreadable image(s)")
        return 1  # the others are done; a script can tell that some were not
    return 0


def decision_options(p) -> None:
    """--threshold / --min-area: the no-target decision (predict and evaluate)."""
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="mask = pixels with foreground probability > P (default: the paper's argmax, = 0.5); "
                        "higher: fewer false positives on expressions that refer to nothing")
    p.add_argument("--min-area", type=float, default=0.0, metavar="SHARE",
                   help="a mask smaller than this share of the image counts as no target (default 0)")


def check_decision(args) -> None:
    """One-line DmmiError for a bad --threshold / --min-area, before anything loads."""
    from dmmi.decision import check_min_area, check_threshold  # Predictor's own checks, named by the option

    check_threshold(args.threshold, "--threshold")
    check_min_area(args.min_area, "--min-area")


def _check_predict_numbers(args) -> int:
    """One-line DmmiError for a bad --threshold / --min-area / --batch-size / --batch-jobs / --max-pixels,
    before anything loads or is written -> the pixel cap."""
    from dmmi.data.images import DEFAULT_MAX_PIXELS, check_max_pixels

    check_decision(args)
    for option, value in (("--batch-size", args.batch_size), ("--batch-jobs", args.batch_jobs)):
        if value < 1:
            raise DmmiError(f"{option} must be >= 1, got {value}")
    return DEFAULT_MAX_PIXELS if args.max_pixels is None else check_max_pixels(args.max_pixels, "--max-pixels")


def _predict_jobs(args) -> int:
    """dmmi predict --jobs JOBS.jsonl --out RESULTS.jsonl (dmmi.jobs)."""
    from dmmi.engine.checkpoint import check_writable_folder
    from dmmi.engine.distributed import resolve_device
    from dmmi.inference import Predictor
    from dmmi.jobs import check_results_path, run_jobs

    if args.image or args.expressions:
        raise DmmiError("--jobs takes the images and expressions from its file: give no IMAGE / EXPRESSIONS")
    jobs = Path(args.jobs)
    if not jobs.is_file():
        raise DmmiError(f"jobs file not found: {jobs}")
    out = check_results_path(args.out, jobs)
    check_writable_folder(out.parent, option="--out", named=out)
    max_pixels = _check_predict_numbers(args)
    device = resolve_device(args.device, option="--device", fix="--device cpu")
    predictor = Predictor.load(args.checkpoint, device=device, fast=not args.reference, max_pixels=max_pixels,
                               threshold=args.threshold, min_area=args.min_area, expressions_per_call=args.batch_size)
    report = run_jobs(predictor, jobs, out, batch_jobs=args.batch_jobs, progress=not args.no_progress)
    print(report.summary(out))
    return 1 if report.bad else 0  # 1: the bad lines were skipped (the others are done)


def cmd_demo(args) -> int:
    from dmmi.engine.demo import run_demo

    run_demo(steps=args.steps, checkpoint=args.checkpoint, out_dir=args.out, data_dir=args.data,
             preset=args.config, overrides=args.overrides, progress=not args.no_progress)
    return 0
