"""Quality vs training time on the synthetic zero/one/many dataset (what `make demo` uses).

    python benchmarks/bench_quality.py --minutes 10                      # demo_lite, CPU
    python benchmarks/bench_quality.py --preset dmmi_lite --mode both --device cuda --minutes 20

Trains the preset with the engine (``dmmi.engine.train.train``) on the synthetic dataset
(generated once and cached, as by ``dmmi demo``), once per mode, in chunks of
--eval-minutes: each chunk is one ``train()`` call with ``train.max_minutes`` = the chunk,
resumed exactly from the previous chunk's ``last.pt``; the engine validates when a budget
stops it (and at every epoch end), so each chunk adds a point. The run's ``metrics.jsonl``
gives oIoU (targeted samples) and Acc (zero-target samples predicted empty) on the held-out
``val`` split (the test split is not touched). The time axis is training minutes: the
engine's clock summed over the chunks, validation passes and start-up left out. Writes
results/quality_<preset>_<device>.{json,md,png}; the runs stay in --runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import _common as C
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo_lite")
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes per mode (all chunks)")
    p.add_argument("--eval-minutes", type=float, default=None,
                   help="training minutes between validation points (default: --minutes / 5)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the preset's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (the engine lowers them itself only when data.workers > 0)")
    p.add_argument("--mode", choices=("fast", "reference", "both"), default="fast",
                   help="train.fast on / off (on CPU both are fp32: compare on a GPU)")
    p.add_argument("--data", default=None, help="synthetic dataset folder (default: the demo's cache)")
    p.add_argument("--runs", default="runs/bench_quality", help="where the training runs go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(C.RESULTS))
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def val_points(metrics_path: Path) -> list[dict]:
    """The validation records of a chunked run, with cumulative training minutes.

    Every ``train()`` call restarts the engine's clock (``minutes`` of a record = since that
    call's training began). Training time accumulates from one training log record to the
    next; a clock that goes back marks a new call; the time from a log record to a
    validation record (the validation pass, and the few steps to an epoch end) is left out.
    """
    points = []
    total = 0.0  # training minutes so far
    last = 0.0  # clock of the current call at the last record counted
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        m = rec.get("minutes")
        if m is None:
            continue
        m = float(m)
        if "val" not in rec:
            if m < last:  # a new train() call
                last = 0.0
            total += m - last
            last = m
            continue
        last = m  # skip the validation pass
        dmmi = rec["val"].get("dmmi", {})
        gres = rec["val"].get("gres", {})
        points.append({"minutes": round(total, 3), "step": rec.get("step"), "epoch": round(rec.get("epoch", 0), 3),
                       "oIoU": dmmi.get("oIoU"), "mIoU": dmmi.get("mIoU"), "Acc": dmmi.get("Acc"),
                       "gIoU": gres.get("gIoU"), "cIoU": gres.get("cIoU"), "score": rec.get("val_score")})
    return points


def plot(curves: dict[str, list[dict]], out_png: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), dpi=110, layout="constrained")
    for i, (key, label) in enumerate((("oIoU", "oIoU (targeted samples), %"), ("Acc", "Acc (zero-target samples), %"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for mode, pts in curves.items():
            pts = [p for p in pts if p.get(key) is not None]
            ax.plot([p["minutes"] for p in pts], [p[key] for p in pts], marker="o", markersize=3, label=mode)
        ax.set_xlabel("training minutes (validation excluded)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.savefig(out_png)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    C.quiet_transformers()
    from dmmi.config import load_config
    from dmmi.engine.demo import ensure_synthetic
    from dmmi.engine.train import train

    device = C.resolve_device(args.device)
    info = C.machine_info(device)
    data = ensure_synthetic(args.data)
    if args.threads:
        info["torch_threads"] = torch.get_num_threads()
    chunk = args.eval_minutes or args.minutes / 5
    curves, runs = {}, {}
    for mode in C.modes(args.mode):
        run_dir = Path(args.runs) / f"{args.preset}_{C.device_tag(info)}_{mode}"
        for stale in ("metrics.jsonl", "last.pt"):  # the engine appends / resumes: start this curve afresh
            if (run_dir / stale).exists():
                (run_dir / stale).unlink()
        sets = [f"data.root={data}", f"train.output_dir={run_dir}", f"train.max_minutes={chunk}",
                f"train.fast={str(mode == 'fast').lower()}", f"train.device={args.device}", *args.overrides]
        if args.epochs:
            sets.append(f"train.epochs={args.epochs}")
        cfg = load_config(args.preset, sets)
        print(f"[{mode}] training {cfg.preset} for {args.minutes:g} min in chunks of {chunk:g} min on {device} "
              f"-> {run_dir}", flush=True)
        resume, result, wall = None, None, time.time()
        while True:
            result = train(cfg, resume=resume, progress=False, log=lambda msg: print(f"[{mode}] {msg}", flush=True))
            resume = str(result.last_path)
            curves[mode] = val_points(run_dir / "metrics.jsonl")
            trained = curves[mode][-1]["minutes"] if curves[mode] else 0.0
            finished = result.epochs_done >= cfg.train.epochs or bool(cfg.train.max_steps and
                                                                       result.steps >= cfg.train.max_steps)
            if finished or trained >= args.minutes - 1e-6 or not curves[mode]:
                break
        last = curves[mode][-1] if curves[mode] else {}
        runs[mode] = {"output_dir": str(run_dir), "steps": result.steps, "epochs_done": result.epochs_done,
                      "training_minutes": last.get("minutes"), "wall_minutes": round((time.time() - wall) / 60, 2),
                      "best_val_score": result.best_score, "final": last, "config": cfg.to_dict()}
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    name = f"quality_{args.preset}_{C.device_tag(info)}" + (f"_{args.tag}" if args.tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.preset} on the synthetic dataset (val split), {info['gpu'] or 'CPU'}"
    plot(curves, out / f"{name}.png", title)
    rows = [dict(mode=mode, **p) for mode, pts in curves.items() for p in pts]
    columns = [("mode", "mode"), ("minutes", "minutes"), ("step", "step"), ("epoch", "epoch"), ("oIoU", "oIoU"),
               ("mIoU", "mIoU"), ("Acc", "Acc"), ("gIoU", "gIoU"), ("cIoU", "cIoU")]
    md = (f"### Quality vs training time: {args.preset} on the synthetic dataset (val split)\n\n"
          f"![curves]({name}.png)\n\n{C.markdown_table(rows, columns)}\n\n"
          f"{args.minutes:g} training minutes per mode in chunks of {chunk:g} min, a validation after each; "
          f"minutes exclude validation and start-up.\n"
          f"Machine: {C.machine_line(info)}; load average at end {info['load_average_at_end'][0]}.\n")
    record = {"benchmark": "quality", "machine": info, "args": vars(args), "data": str(data), "runs": runs,
              "curves": curves}
    paths = C.write_results(out, name, record, md)
    print(md)
    print("wrote", *paths, out / f"{name}.png")


if __name__ == "__main__":
    main()
