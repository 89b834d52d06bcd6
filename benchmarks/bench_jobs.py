"""Batch-inference throughput: images/s of ``Predictor.predict_batch`` (what ``dmmi predict --jobs``
runs) against one image at a time, with JSON-lines jobs of real-sized images.

    python benchmarks/bench_jobs.py --preset dmmi_lite --size 224 --images 32 --threads 2

Images: ``--images`` generated 640 x 480 JPEG-like RGB arrays (random pixels), two expressions
each. The model is the preset (``dmmi_lite``: its packaged pretrained weights, offline), fast mode
on the chosen device. Each figure is the median of ``--repeats`` runs after one warm-up run, and
counts everything ``dmmi predict --jobs`` does per image except reading files: resizing,
tokenizing, the forward passes, upsampling to 640 x 480, the masks, COCO RLE encoding. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, machine_line, resolve_device, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="dmmi_lite")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="(image, expression) pairs per forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    from dmmi.config import load_config
    from dmmi.inference import Predictor
    from dmmi.jobs import encode_rle
    from dmmi.models import build_model

    cfg = load_config(args.preset, [f"model.image_size={args.size}"])
    torch.manual_seed(0)
    predictor = Predictor(build_model(cfg.model), cfg, device=device, expressions_per_call=args.batch)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(args.images)]
    texts = [["the red circle on the left", "all the shapes"]] * args.images

    def batched():
        for preds in predictor.predict_batch(images, texts):
            for pred in preds:
                encode_rle(pred.mask)

    def one_by_one():
        for image, t in zip(images, texts):
            for pred in predictor.predict(image, t):
                encode_rle(pred.mask)

    rows = []
    for name, fn in (("one image at a time", one_by_one), (f"predict_batch ({args.batch} pairs per forward)", batched)):
        fn()  # warm-up
        seconds = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
        median = statistics.median(seconds)
        rows.append({"mode": name, "seconds": median, "images_per_s": args.images / median,
                     "expressions_per_s": 2 * args.images / median})
    info = machine_info(device)
    record = {"benchmark": "jobs", "preset": args.preset, "size": args.size, "images": args.images,
              "image_size": [480, 640], "expressions_per_image": 2, "batch": args.batch, "repeats": args.repeats,
              "machine": info, "rows": rows}
    lines = [f"Batch inference, {args.preset} at {args.size}, {args.images} images of 640 x 480, 2 expressions each "
             f"({machine_line(info)})", "", "| mode | images/s | expressions/s |", "|---|---|---|"]
    lines += [f"| {r['mode']} | {r['images_per_s']:.2f} | {r['expressions_per_s']:.2f} |" for r in rows]
    name = f"jobs_{args.preset}_{args.size}_{device.type}"
    json_path, _ = write_results(args.out, name, record, "\n".join(lines))
    print("\n".join(lines))
    print(f"written: {json_path}")


if __name__ == "__main__":
    main()
