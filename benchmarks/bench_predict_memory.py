"""Peak resident memory of ``dmmi predict`` on one large image, for 1 and 16 expressions.

    python benchmarks/bench_predict_memory.py --label after
    python benchmarks/bench_predict_memory.py --label before --pythonpath /tmp/before   # a git worktree

Each run is a fresh ``python -m dmmi.cli predict`` subprocess; its peak RSS is the child's own
``ru_maxrss`` from ``os.wait4`` (so one run's peak cannot hide another's). The model is the
``dmmi_tiny`` preset, randomly initialised (seed 0) and saved with ``save_model_file``: the
figures are about the full-size work around the model (decoding, upsampling to the image's
size, masks, overlays, PNG writing), not about the network. The image is generated (a
``--megapixels`` JPEG, 3:2). ``--pythonpath`` puts another checkout first on the child's path
(it takes precedence over the editable install), for before/after figures; each ``--label``
is merged into the one JSON under ``benchmarks/results/``. Not a test: it never asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, machine_info, machine_line  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_model(path: Path) -> Path:
    from dmmi.config import load_config
    from dmmi.models import build_model
    from dmmi.models.io import save_model_file

    cfg = load_config("dmmi_tiny", [])
    torch.manual_seed(0)
    return save_model_file(path, build_model(cfg.model), cfg)


def make_image(path: Path, megapixels: float) -> tuple[int, int]:
    """A 3:2 JPEG of ``megapixels`` (smooth colours and a few blocks) -> (width, height)."""
    from PIL import Image, ImageDraw

    height = int(round(math.sqrt(megapixels * 1e6 / 1.5)))
    width = int(round(1.5 * height))
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[..., 0] = x.astype(np.uint8)
    rgb[..., 1] = y.astype(np.uint8)
    rgb[..., 2] = ((x + y) / 2).astype(np.uint8)
    image = Image.fromarray(rgb)
    del rgb
    draw = ImageDraw.Draw(image)
    for i in range(6):
        x0, y0 = (i + 1) * width // 8, (i % 3 + 1) * height // 5
        draw.rectangle([x0, y0, x0 + width // 12, y0 + height // 8], fill=(255, 40 * i, 0))
    image.save(path, format="JPEG", quality=90)
    return width, height


def run_predict(image: Path, checkpoint: Path, n: int, out: Path, pythonpath: str | None, threads: int) -> dict:
    """One ``dmmi predict`` subprocess with ``n`` expressions -> its peak RSS and wall time."""
    expressions = [f"the shape number {i} on the left" for i in range(n)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "dmmi.cli", "predict", str(image), *expressions, "--checkpoint", str(checkpoint),
           "--out", str(out), "--device", "cpu"]
    log = out.parent / f"log_{n}.txt"
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=out.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        print(text[-2000:], file=sys.stderr)
    return {"expressions": n, "exit_code": proc.returncode, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "wall_s": round(wall, 1), "outputs": len(list(out.glob("*.png"))),
            "last_line": text.strip().splitlines()[-1][:300] if text.strip() else ""}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", required=True, help="name of this set of figures in the JSON, e.g. before / after")
    p.add_argument("--pythonpath", default=None, metavar="DIR", help="checkout to run dmmi from (a git worktree)")
    p.add_argument("--megapixels", type=float, default=36.0)
    p.add_argument("--expressions", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the predict runs")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    name = f"predict_memory_{args.megapixels:g}mp_cpu"
    json_path = Path(args.out) / f"{name}.json"
    record = json.loads(json_path.read_text()) if json_path.is_file() else {"benchmark": "bench_predict_memory"}
    with tempfile.TemporaryDirectory(prefix="dmmi_bench_mem_") as tmp:
        tmp = Path(tmp)
        checkpoint = make_model(tmp / "tiny.pt")
        width, height = make_image(tmp / "big.jpg", args.megapixels)
        code = args.pythonpath or str(ROOT)
        commit = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
        runs = []
        for n in args.expressions:
            out = tmp / f"out_{n}"
            runs.append(run_predict(tmp / "big.jpg", checkpoint, n, out, args.pythonpath, args.threads))
            r = runs[-1]
            print(f"{args.label}: {n:>2} expression(s) on {width}x{height}: peak RSS {r['peak_rss_mib']:.0f} MiB "
                  f"(exit {r['exit_code']}, {r['wall_s']} s)", flush=True)
    info = machine_info(torch.device("cpu"))
    info["torch_threads"] = args.threads
    record.setdefault("figures", {})[args.label] = {
        "code_commit": commit, "code_path": code, "image": {"width": width, "height": height, "format": "JPEG q90"},
        "model": "dmmi_tiny (random init, seed 0)", "runs": runs, "machine": info, "machine_line": machine_line(info)}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
