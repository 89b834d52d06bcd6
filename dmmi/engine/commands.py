"""``dmmi train / evaluate / predict / demo``: argument parsing and dispatch only."""

from __future__ import annotations

import json
from pathlib import Path

from dmmi.errors import DmmiError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def _add_config_args(p, default="dmmi_swin_b") -> None:
    p.add_argument("--config", default=default, help=f"preset name or YAML file (default {default})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (DDP when launched by torchrun)")
    _add_config_args(p)
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue from a last.pt exactly")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("evaluate", help="evaluate a checkpoint (DMMI and GRES protocols, per type)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, metavar="DIR", help="dataset root (default: the checkpoint's data.root)")
    p.add_argument("--split", default=None, help="split to evaluate (default: data.test_split)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override data.* / eval.* fields, e.g. --set data.format=refer")
    p.add_argument("--device", default="auto")
    p.add_argument("--reference", action="store_true", help="fp32 reference mode instead of the fast mode")
    p.add_argument("--gallery", default=None, metavar="DIR", help="write success/failure overlays per type")
    p.add_argument("--by-wording", action="store_true",
                   help="also a table per wording (attribute / position / plural / count / union)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("predict", help="segment what expressions refer to in an image (or a folder)")
    p.add_argument("image", help="an image file or a folder of images")
    p.add_argument("expressions", nargs="+", help="one or more English expressions")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="predictions", metavar="DIR")
    p.add_argument("--device", default="auto")
    p.add_argument("--reference", action="store_true", help="fp32 reference mode instead of the fast mode")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("demo", help="the whole system on the embedded synthetic dataset (CPU, offline)")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (default: the preset's)")
    p.add_argument("--checkpoint", default=None, help="reuse this model instead of training")
    p.add_argument("--out", default="runs/demo", metavar="DIR")
    p.add_argument("--data", default=None, metavar="DIR", help="synthetic dataset folder (generated if missing)")
    p.add_argument("--config", default="demo_lite", help="preset to train (default demo_lite)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_train(args) -> int:
    from dmmi.config import load_config
    from dmmi.engine.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"done: {result.steps} steps in {result.minutes:.1f} min; best model {result.best_path}; "
          f"last checkpoint {result.last_path}; metrics {result.output_dir / 'metrics.jsonl'}")
    return 0


def cmd_evaluate(args) -> int:
    from dmmi.engine.evaluate import evaluate_checkpoint
    from dmmi.metrics import format_group_table, format_table

    results, skipped, info = evaluate_checkpoint(
        args.checkpoint, data_root=args.data, split=args.split, overrides=args.overrides, device=args.device,
        fast=not args.reference, gallery_dir=args.gallery, progress=not args.no_progress, by_wording=args.by_wording)
    if info["is_main"]:
        print(f"{info['preset']} on {info['dataset']} / {info['split']}: {info['samples']} samples")
        print(format_table(results))
        if "groups" in results:
            print()
            print(format_group_table(results["groups"]))
        if skipped.count:
            print(skipped.summary())
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"results": results, "skipped": skipped.count, **info}, indent=1))
            print(f"results written to {args.json}")
        if args.gallery:
            print(f"overlays written to {args.gallery}")
    return 0


def _images(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DmmiError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return files
    if not path.exists():
        raise DmmiError(f"image file not found: {path}")
    return [path]


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return "_".join(filter(None, keep.split("_")))[:60] or "expression"


def cmd_predict(args) -> int:
    from dmmi.data.transforms import load_image
    from dmmi.inference import Predictor
    from dmmi.visualize import overlay, save_mask_png

    for e in args.expressions:
        if not e.strip():
            raise DmmiError("empty expression: give some words, e.g. \"the dog on the left\"")
    images = _images(Path(args.image))
    predictor = Predictor.load(args.checkpoint, device=args.device, fast=not args.reference)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in images:
        try:
            image = load_image(path)
        except DmmiError as e:
            if len(images) == 1:
                raise
            print(f"skipped: {e}")
            failed += 1
            continue
        for i, pred in enumerate(predictor.predict(image, list(args.expressions))):
            stem = f"{path.stem}__{i:02d}_{_slug(pred.text)}"
            save_mask_png(pred.mask, out / f"{stem}_mask.png")
            overlay(image, pred.mask).save(out / f"{stem}_overlay.png")
            print(f"{path.name}: \"{pred.text}\" -> {pred.describe()}  ({out / (stem + '_overlay.png')})")
    if failed:
        print(f"skipped {failed} unreadable image(s)")
    return 0


def cmd_demo(args) -> int:
    from dmmi.engine.demo import run_demo

    run_demo(minutes=args.minutes, checkpoint=args.checkpoint, out_dir=args.out, data_dir=args.data,
             preset=args.config, overrides=args.overrides, progress=not args.no_progress)
    return 0
