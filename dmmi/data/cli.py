"""``dmmi data`` commands: ``synth`` (write the synthetic dataset) and ``stats`` (describe one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dmmi.errors import DmmiError


SYNTH_EXAMPLES = """\
examples:
  dmmi data synth --out data/synth                         # 600 images, 128 px, seed 0
  dmmi data synth --out data/synth800 --images 800 --seed 1 --size 96 --splits 0.9,0.05,0.05
  dmmi data synth --out data/hard --max-objects 6 --hard-share 0.9 --json
"""

STATS_EXAMPLES = """\
examples:
  dmmi data stats data/synth                               # a folder from `dmmi data synth`
  dmmi data stats /data/refer --format refer --dataset refcocog --split-by umd
  dmmi data stats /data/refer --format grefcoco --json
"""


def register(subparsers) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    data = subparsers.add_parser("data", help="datasets: generate the synthetic set, describe a dataset",
                                 description="Datasets: generate the synthetic set, describe a dataset.",
                                 epilog="examples:\n  dmmi data synth --out data/synth\n"
                                        "  dmmi data stats data/synth\n", formatter_class=raw)
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda args: _help(data))

    synth = sub.add_parser(
        "synth",
        help="write the synthetic zero/one/many shapes dataset (Ref-ZOM layout)",
        description="Write <out>/synthetic/refs(final).p, <out>/synthetic/instances.json and <out>/images/*.png:\n"
        "coloured shapes with expressions that refer to zero, one or many of them.",
        epilog=SYNTH_EXAMPLES, formatter_class=raw,
    )
    # --out is checked in the handler so that a missing value is a one-line DmmiError
    synth.add_argument("--out", metavar="DIR", help="output folder (required)")
    synth.add_argument("--images", metavar="N", default=600, help="number of images (default 600)")
    synth.add_argument("--seed", metavar="S", default=0, help="random seed (default 0)")
    synth.add_argument("--size", metavar="PX", default=128, help="image side in pixels, >= 64 (default 128)")
    synth.add_argument("--refs-per-image", metavar="K", default=4,
                       help="expressions per image (default 4)")
    synth.add_argument("--max-objects", metavar="K", default=5, help="at most K shapes per image, 2..6 (default 5)")
    synth.add_argument("--hard-share", metavar="F", default=0.65,
                       help="share of zero-target expressions that are hard negatives, 0..1 (default 0.65)")
    synth.add_argument("--splits", metavar="T,V,E", default="0.8,0.1,0.1",
                       help="train,val,test shares of the images (default 0.8,0.1,0.1; the demo's: 0.9,0.05,0.05)")
    synth.add_argument("--json", action="store_true", help="print the summary as JSON")
    synth.set_defaults(func=cmd_synth)

    stats = sub.add_parser("stats", help="counts of images, objects, expressions and zero/one/many types",
                           description="Counts of images, objects, expressions and zero/one/many types per split.",
                           epilog=STATS_EXAMPLES, formatter_class=raw)
    stats.add_argument("root", metavar="DIR", nargs="?", help="dataset root (holds <dataset>/refs(...).p)")
    stats.add_argument("--format", default="refzom", help="refzom | refer | grefcoco (default refzom)")
    stats.add_argument("--dataset", default=None, help="dataset folder name under DIR (default: the format's own; "
                       "a folder from `dmmi data synth` is found by itself)")
    stats.add_argument("--split-by", dest="split_by", default=None,
                       help="unc | umd | google | final (default: the format's own)")
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")
    stats.set_defaults(func=cmd_stats)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 1


def _int(flag: str, value) -> int:
    """Integers are parsed here, not by argparse, so a bad one is a one-line DmmiError."""
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise DmmiError(f"data synth: {flag} expects an integer, got {value!r}") from None


def cmd_synth(args) -> int:
    from dmmi.data.synthetic import generate

    if not args.out:
        raise DmmiError("data synth: --out DIR is required")
    images = _int("--images", args.images)
    seed = _int("--seed", args.seed)
    size = _int("--size", args.size)
    refs_per_image = _int("--refs-per-image", args.refs_per_image)
    max_objects = _int("--max-objects", args.max_objects)
    try:
        hard_share = float(args.hard_share)
    except ValueError:
        raise DmmiError(f"data synth: --hard-share expects a number in [0, 1], got {args.hard_share!r}") from None
    if not 2 <= max_objects <= 6:
        raise DmmiError(f"data synth: --max-objects must be in 2..6, got {max_objects}")
    if not 0.0 <= hard_share <= 1.0:
        raise DmmiError(f"data synth: --hard-share must be in [0, 1], got {hard_share}")
    if images < 1:
        raise DmmiError(f"data synth: --images must be >= 1, got {images}")
    if size < 64:
        raise DmmiError(f"data synth: --size must be >= 64 pixels, got {size}")
    if refs_per_image < 1:
        raise DmmiError(f"data synth: --refs-per-image must be >= 1, got {refs_per_image}")
    try:
        splits = tuple(float(x) for x in str(args.splits).split(","))
    except ValueError:
        splits = ()
    if len(splits) != 3:
        raise DmmiError(f"data synth: --splits expects three numbers train,val,test, got {args.splits!r}")
    summary = generate(args.out, n_images=images, seed=seed, image_size=size, refs_per_image=refs_per_image,
                       max_objects=max_objects, hard_share=hard_share, split_ratios=splits,
                       progress=not args.json)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    t = summary["types"]
    n = max(summary["n_refs"], 1)
    print(f"synthetic dataset: {summary['n_images']} images ({summary['image_size']}px), "
          f"{summary['n_annotations']} objects, {summary['n_refs']} expressions "
          f"({summary['n_sentences']} sentences), seed {summary['seed']}, {summary['seconds']:.1f}s")
    print("  types: " + ", ".join(f"{k} {v} ({100 * v / n:.0f}%)" for k, v in t.items()))
    for split, s in summary["splits"].items():
        print(f"  {split:<5}: {s['images']} images, {s['refs']} expressions "
              f"(one {s['one']}, many {s['many']}, zero {s['zero']})")
    print(f"  refs:      {summary['refs_path']}")
    print(f"  instances: {summary['instances_path']}")
    print(f"  images:    {summary['image_dir']}")
    print(f"use it with: --set data.root={summary['root']} data.dataset=synthetic data.format=refzom")
    return 0


def cmd_stats(args) -> int:
    if not args.root:
        raise DmmiError("data stats: a dataset folder DIR is required")
    if args.format not in ("refzom", "refer", "grefcoco"):
        raise DmmiError(f"data stats: --format must be refzom, refer or grefcoco, got {args.format!r}")
    if not Path(args.root).is_dir():
        raise DmmiError(f"{args.root}: no such folder")
    try:
        from dmmi.data.stats import dataset_stats, format_stats
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("dmmi.data.stats"):
            raise DmmiError("data stats: dmmi.data.stats is not available in this build") from None
        raise
    dataset = args.dataset
    if dataset is None and args.format == "refzom":
        # a folder written by `dmmi data synth` holds synthetic/, not ref-zom/
        from dmmi.data.synthetic import DATASET_NAME, REFS_FILE

        root = Path(args.root)
        if not (root / "ref-zom").is_dir() and (root / DATASET_NAME / REFS_FILE).is_file():
            dataset = DATASET_NAME
    stats = dataset_stats(args.root, format=args.format, dataset=dataset, split_by=args.split_by)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True, default=str))
    else:
        print(format_stats(stats))
    return 0
