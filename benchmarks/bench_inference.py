"""Inference speed of a preset: batch-1 latency and batch-B throughput, reference vs fast mode.

    python benchmarks/bench_inference.py --preset dmmi_lite --size 224
    python benchmarks/bench_inference.py --preset dmmi_swin_b --text random --device cuda

What is timed: ``model(images, input_ids, attention_mask)`` in eval mode under
``torch.inference_mode()`` and the mode's autocast (text encoder, encoder with MBA, decoder,
final upsampling; no tokenisation, no image decoding), inputs already on the device.
Latency: median over --iters batch-1 calls after --warmup calls. Throughput: --batch images
per call, images/s = batch / median call time. On CPU the process CPU time per call is
recorded too (``cpu_ms``): on a machine shared with other jobs it is the steadier figure.
Peak memory (CUDA): one model's weights + the peak above them during one throughput call.
With --mode both the two modes run interleaved (ref, fast, ref, fast, ...) so that a noisy
machine slows both alike. ``--cuda-graphs``: fast mode replays CUDA graphs
(``dmmi.engine.compiled.GraphedForward``, what ``Predictor(cuda_graphs=True)`` runs: one capture
per batch size in the warm-up, then a copy of the inputs in, a replay and a copy of the logits
out per call; on a CPU it changes nothing). ``--compile [MODE]``: fast mode through
``torch.compile(fullgraph=True, dynamic=False)``.
Writes results/inference_<preset>_<size>_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os

import _common as C
import torch

from dmmi.engine.compiled import GraphedForward, compile_options
from dmmi.engine.fastpath import autocast, configure_backends, describe, prepare_images, prepare_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", required=True, help="one or more presets (dmmi/configs)")
    C.common_arguments(p)
    p.add_argument("--batch", type=int, default=None, help="throughput batch (default 32 on GPU, 8 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 50 GPU, 10 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10 GPU, 2 CPU)")
    p.add_argument("--no-throughput", action="store_true", help="batch-1 latency only")
    p.add_argument("--cuda-graphs", action="store_true", help="fast mode replays CUDA graphs (GraphedForward)")
    return p.parse_args(argv)


def run_preset(preset: str, args, device: torch.device, info: dict) -> dict:
    cfg = C.preset_config(preset, args.size, args.text, args.overrides)
    gpu = device.type == "cuda"
    iters = args.iters or (50 if gpu else 10)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    batch = args.batch or (32 if gpu else 8)
    base = C.build(cfg).eval()
    n_params = sum(p.numel() for p in base.parameters())
    models = {}
    for mode in C.modes(args.mode):
        fast = mode == "fast"
        models[mode] = prepare_model(copy.deepcopy(base), device, fast=fast).eval()
    del base
    runners = {mode: models[mode] for mode in models}
    if "fast" in models and args.compile:
        runners["fast"] = torch.compile(models["fast"], **compile_options(args.compile, args.compile_backend))
    graphed = GraphedForward(models["fast"], device, fast=True) if "fast" in models and args.cuda_graphs else None

    def call(mode, inputs):
        fast = mode == "fast"
        configure_backends(device, fast)
        images = prepare_images(inputs["images"], device, fast)
        if fast and graphed is not None:
            with torch.inference_mode():
                return graphed(images, inputs["input_ids"], inputs["attention_mask"])
        with torch.inference_mode(), autocast(device, fast, cpu_bf16=args.cpu_bf16):
            return runners[mode](images, inputs["input_ids"], inputs["attention_mask"]).logits

    def measure(inputs, n):
        for mode in models:
            for _ in range(warmup):
                call(mode, inputs)
        times = {mode: [] for mode in models}
        for _ in range(n):
            for mode in models:  # interleaved
                times[mode].append(C.timed(lambda: call(mode, inputs), device))
        return times

    one = C.fake_batch(cfg, 1, args.tokens, device)
    latency = measure(one, iters)
    throughput = peak = None
    if not args.no_throughput:
        many = C.fake_batch(cfg, batch, args.tokens, device)
        throughput = measure(many, max(3, iters // 5))
        if gpu:  # one model's weights + the peak of one throughput call, per mode
            peak = {}
            for mode in models:
                weights = sum(t.numel() * t.element_size() for t in (*models[mode].parameters(),
                                                                      *models[mode].buffers()))
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                call(mode, many)
                torch.cuda.synchronize(device)
                peak[mode] = round((torch.cuda.max_memory_allocated(device) - base + weights) / 2**20, 1)
                if mode == "fast" and graphed is not None:  # the graphs' pools were taken at capture: not seen here
                    peak[mode] = None

    rows = []
    for mode in models:
        lat = C.summary(latency[mode])
        row = {"preset": preset, "size": cfg.model.image_size, "mode": mode, "latency_ms": lat["median_ms"],
               "latency_min_ms": lat["min_ms"], "latency": lat,
               "latency_cpu_ms": None if gpu else lat["cpu_median_ms"],
               "setup": describe(device, mode == "fast", cpu_bf16=args.cpu_bf16,
                                 compile=args.compile if mode == "fast" else False),
               "cuda_graphs": bool(mode == "fast" and graphed is not None and graphed.active),
               "graph_captures": graphed.captures if mode == "fast" and graphed is not None else None}
        if throughput is not None:
            tp = C.summary(throughput[mode])
            row.update(batch=batch, throughput_img_s=round(batch / (tp["median_ms"] / 1000), 2), batch_call=tp)
            if not gpu:  # images per CPU-second of this process
                row["throughput_img_per_cpu_s"] = round(batch / (tp["cpu_median_ms"] / 1000), 2)
        if peak is not None:
            row["peak_mem_mib"] = peak[mode]
        rows.append(row)
    if len(rows) == 2:
        ref, fast = rows
        fast["latency_speedup"] = round(ref["latency_ms"] / fast["latency_ms"], 2)
        if throughput is not None:
            fast["throughput_speedup"] = round(fast["throughput_img_s"] / ref["throughput_img_s"], 2)
    return {"preset": preset, "image_size": cfg.model.image_size, "text": args.text, "tokens": args.tokens,
            "parameters": n_params, "iters": iters, "warmup": warmup, "rows": rows}


COLUMNS = [("preset", "preset"), ("size", "size"), ("mode", "mode"), ("latency_ms", "batch-1 latency (ms, median)"),
           ("latency_min_ms", "min (ms)"), ("latency_cpu_ms", "CPU time (ms)"), ("batch", "batch"),
           ("throughput_img_s", "throughput (img/s)"), ("throughput_img_per_cpu_s", "img per CPU-s"),
           ("peak_mem_mib", "peak mem (MiB)"), ("latency_speedup", "latency speed-up"),
           ("throughput_speedup", "throughput speed-up")]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    C.quiet_transformers()
    device = C.resolve_device(args.device)
    info = C.machine_info(device)
    for preset in args.preset:
        result = run_preset(preset, args, device, info)
        info_end = dict(info, load_average_at_end=[round(x, 2) for x in os.getloadavg()])
        record = {"benchmark": "inference", "machine": info_end, "args": vars(args), **result}
        name = f"inference_{preset}_{result['image_size']}_{C.device_tag(info)}{'_' + args.tag if args.tag else ''}"
        md = (f"### Inference: {preset} at {result['image_size']}x{result['image_size']}"
              f" ({result['parameters'] / 1e6:.1f} M parameters, text encoder: {args.text})\n\n"
              f"{C.markdown_table(result['rows'], COLUMNS)}\n\n"
              f"Machine: {C.machine_line(info_end)}; load average at end {info_end['load_average_at_end'][0]}.\n")
        paths = C.write_results(args.out, name, record, md)
        print(md)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
