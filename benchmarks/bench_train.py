"""Training speed and memory of a preset, reference vs fast mode side by side.

    python benchmarks/bench_train.py --preset dmmi_lite --size 224 --batch 8
    python benchmarks/bench_train.py --preset dmmi_swin_b --text random --batch 8 --device cuda

One optimiser step = zero_grad, forward with the erased sentence (CCR and contrastive head
on) + dmmi_loss under the mode's autocast, backward, AdamW step (fused on CUDA in fast
mode). Throughput: images/s = batch * steps / wall time of --steps steps after --warmup
steps. Peak memory: CUDA ``max_memory_allocated`` over the steps (model, gradients, AdamW
state and activations); on CPU the process's peak RSS (``ru_maxrss``) and its rise above the
RSS before the first step. On CPU the process CPU time per step is recorded too
(``images_per_cpu_s``): on a machine shared with other jobs it is the steadier figure.
Each mode runs in its own process (clean memory peak, clean flags); --rounds R repeats the
pair R times alternately and reports the median, so a busy machine slows both modes alike.
Model FLOPs per step: counted once, on one eager step (forward + loss + backward) under
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions, attention; the
optimiser's elementwise work and a checkpoint's recomputation are not model FLOPs). Achieved
rate = FLOPs x steps / wall time; on a GPU also its share of the bf16 dense peak
(``_common.GPU_BF16_PEAK_TFLOPS``: 790 TFLOP/s for H100 / H200, what a large bf16 matmul reached
there; ``--peak-tflops`` overrides). ``--compile`` runs the trainer's compiled step
(``dmmi.engine.compiled.loss_step``: forward + loss as one fullgraph graph);
``--grad-checkpoint`` turns on ``train.grad_checkpoint``.
Writes results/train_<preset>_<size>_b<batch>_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _common as C
import torch

MARK = "BENCH_TRAIN_RESULT "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True)
    C.common_arguments(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU, 2 CPU)")
    p.add_argument("--rounds", type=int, default=1, help="repeat (reference, fast) this many times")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing of the visual stages")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak to compare with (default: by GPU name, _common.GPU_BF16_PEAK_TFLOPS)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timing, profile N more steps and print the top kernels/ops (torch.profiler)")
    p.add_argument("--worker", choices=("fast", "reference"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> dict:
    """One mode in this process; prints its record after MARK."""
    from dmmi.engine.compiled import loss_step
    from dmmi.engine.fastpath import describe, fused_adamw_ok, prepare_images, prepare_model
    from dmmi.engine.optim import build_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    C.quiet_transformers()
    device = C.resolve_device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_flush_denormal(True)  # as the engine does on CPU: AdamW's tiny moments crawl otherwise
    fast = args.worker == "fast"
    steps = args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    cfg = C.preset_config(args.preset, args.size, args.text, args.overrides)
    model = prepare_model(C.build(cfg), device, fast=fast).train()
    fused = fast and fused_adamw_ok(model)
    opt = build_optimizer(model, cfg.train, fused=fused)
    batch = C.fake_batch(cfg, args.batch, args.tokens, device)
    images = prepare_images(batch["images"], device, fast)
    inputs = (images, batch["input_ids"], batch["attention_mask"], batch["erased_ids"], batch["target"], batch["delta"])
    compiled = fast and args.compile
    common = dict(fast=fast, cpu_bf16=args.cpu_bf16, compat=cfg.model.compat == "ris-dmmi")
    eager_step = loss_step(model, cfg.loss, device, **common)
    forward_loss = loss_step(model, cfg.loss, device, **common, compile=compiled,
                             backend=args.compile_backend) if compiled else eager_step

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(*inputs).total
        loss.backward()
        opt.step()
        return loss

    model.visual.set_grad_checkpointing(args.grad_checkpoint)
    rss_before = C.current_rss_mib()
    first_step_s = None
    for i in range(warmup):
        t = time.perf_counter()
        step()
        if i == 0:
            C.sync(device)
            first_step_s = time.perf_counter() - t  # compilation / autotuning included
    if gpu:  # after the warm-up: cuDNN autotuning's workspaces and compilation do not count
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    step_times = []
    C.sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        s = time.perf_counter()
        loss = step()
        if not gpu:  # per-step times on CPU only (a GPU sync per step would perturb the pipeline)
            step_times.append(time.perf_counter() - s)
    C.sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if args.profile:
        print_profile(step, args.profile, device, f"{args.preset} {args.worker}")
    peak_rss = C.peak_rss_mib()  # before the FLOP count's step
    record = {
        "mode": args.worker,
        "setup": describe(device, fast, cpu_bf16=args.cpu_bf16, compile=args.compile if fast else False),
        "compile_backend": (args.compile_backend or "inductor") if compiled else None,
        "grad_checkpoint": bool(args.grad_checkpoint),
        "fused_adamw": bool(fused), "batch": args.batch, "steps": steps, "warmup": warmup,
        "seconds": round(wall, 4), "step_ms": round(1000 * wall / steps, 2),
        "first_step_s": round(first_step_s, 2) if first_step_s is not None else None,
        "images_per_s": round(args.batch * steps / wall, 3), "final_loss": float(loss.detach().float()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    if step_times:
        record["step_ms_median"] = round(1000 * statistics.median(step_times), 2)
        record["step_ms_min"] = round(1000 * min(step_times), 2)
        record["cpu_s_per_step"] = round(cpu / steps, 3)  # process CPU time: steadier on a shared machine
        record["images_per_cpu_s"] = round(args.batch * steps / cpu, 3)
    if gpu:
        record["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        record["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    else:
        record["peak_rss_mib"] = round(peak_rss, 1)
        record["rss_before_steps_mib"] = round(rss_before, 1)
        record["peak_mem_mib"] = round(peak_rss - rss_before, 1)  # the steps' rise
    model.visual.set_grad_checkpointing(False)  # model FLOPs: no recomputation
    record.update(flop_figures(count_flops(model, eager_step, inputs), steps, wall, device, args.peak_tflops))
    return record


def count_flops(model, forward_loss, inputs) -> int:
    """Model FLOPs of one forward + loss + backward (FlopCounterMode), checkpointing off; no
    optimiser step, gradients cleared after."""
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        forward_loss(*inputs).total.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def flop_figures(flops: int, steps: int, wall: float, device: torch.device, peak: float | None) -> dict:
    """FLOPs per step -> the achieved rate and, on a GPU, its share of the bf16 dense peak."""
    rate = flops * steps / wall  # FLOP/s
    out = {"gflop_per_step": round(flops / 1e9, 2), "achieved_gflops": round(rate / 1e9, 2)}
    if device.type == "cuda":
        name = torch.cuda.get_device_properties(device).name
        measured, datasheet = C.gpu_bf16_peak(name)
        peak = peak or measured
        out.update(achieved_tflops=round(rate / 1e12, 2), peak_tflops_bf16=peak,
                   peak_share=round(rate / 1e12 / peak, 4) if peak else None,
                   datasheet_tflops_bf16=datasheet,
                   datasheet_share=round(rate / 1e12 / datasheet, 4) if datasheet else None)
    return out


def print_profile(step, n: int, device: torch.device, title: str) -> None:
    """Profile ``n`` steps; print the ops by self device time (CPU time on CPU), top 30."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        C.sync(device)
    key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    print(f"profile of {n} steps, {title}, by {key}:", file=sys.stderr)
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60), file=sys.stderr)


def run_worker(mode: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            if "profile of" in proc.stderr:  # --profile: the worker's table
                sys.stderr.write(proc.stderr[proc.stderr.index("profile of"):])
            return json.loads(line[len(MARK):])
    raise SystemExit(f"{mode} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


COLUMNS = [("preset", "preset"), ("size", "size"), ("batch", "batch"), ("mode", "mode"),
           ("images_per_s", "images/s"), ("step_ms", "ms/step"), ("images_per_cpu_s", "images per CPU-s"),
           ("peak_mem_mib", "peak mem (MiB)"), ("gflop_per_step", "GFLOP/step"), ("achieved_gflops", "GFLOP/s"),
           ("achieved_tflops", "TFLOP/s"), ("peak_share", "of bf16 peak"), ("throughput_ratio", "throughput vs reference"),
           ("cpu_throughput_ratio", "per CPU-s vs reference"), ("memory_ratio", "peak mem vs reference")]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(worker(args)), flush=True)
        return
    device = C.resolve_device(args.device)
    info = C.machine_info(device)
    if args.threads:
        info["torch_threads"] = args.threads
    cfg = C.preset_config(args.preset, args.size, args.text, args.overrides)
    runs = {mode: [] for mode in C.modes(args.mode)}
    for r in range(args.rounds):
        for mode in runs:
            rec = run_worker(mode, argv)
            print(f"round {r + 1}/{args.rounds} {mode}: {rec['images_per_s']} img/s, peak {rec['peak_mem_mib']} MiB",
                  flush=True)
            runs[mode].append(rec)
    rows = []
    for mode, recs in runs.items():
        ips = [x["images_per_s"] for x in recs]
        mem = [x["peak_mem_mib"] for x in recs]
        rows.append({"preset": args.preset, "size": cfg.model.image_size, "batch": args.batch, "mode": mode,
                     "images_per_s": round(statistics.median(ips), 3),
                     "step_ms": round(1000 * args.batch / statistics.median(ips), 1),
                     "peak_mem_mib": round(statistics.median(mem), 1),
                     "gflop_per_step": recs[0]["gflop_per_step"],
                     "achieved_gflops": round(statistics.median(x["achieved_gflops"] for x in recs), 2),
                     "runs": recs})
        if recs[0].get("peak_share") is not None:
            rows[-1]["achieved_tflops"] = round(statistics.median(x["achieved_tflops"] for x in recs), 2)
            rows[-1]["peak_share"] = round(statistics.median(x["peak_share"] for x in recs), 4)
        if "images_per_cpu_s" in recs[0]:
            rows[-1]["images_per_cpu_s"] = round(statistics.median(x["images_per_cpu_s"] for x in recs), 3)
    if len(rows) == 2:
        ref, fast = rows
        if "images_per_cpu_s" in ref:
            fast["cpu_throughput_ratio"] = round(fast["images_per_cpu_s"] / ref["images_per_cpu_s"], 2)
        fast["throughput_ratio"] = round(fast["images_per_s"] / ref["images_per_s"], 2)
        fast["memory_ratio"] = round(fast["peak_mem_mib"] / ref["peak_mem_mib"], 2) if ref["peak_mem_mib"] > 0 else None
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    gpu = device.type == "cuda"
    mem_note = ("CUDA max_memory_allocated over the timed steps" if gpu else
                "rise of the process's peak RSS over its RSS before the first step (model and inputs excluded)")
    record = {"benchmark": "train", "machine": info, "args": {k: v for k, v in vars(args).items() if k != "worker"},
              "preset": args.preset, "image_size": cfg.model.image_size, "peak_memory_means": mem_note, "rows": rows}
    name = f"train_{args.preset}_{cfg.model.image_size}_b{args.batch}_{C.device_tag(info)}"
    name += f"_{args.tag}" if args.tag else ""
    params = rows[0]["runs"][0]["parameters"]
    md = (f"### Training steps: {args.preset} at {cfg.model.image_size}x{cfg.model.image_size}, batch {args.batch}"
          f" ({params / 1e6:.1f} M parameters, text encoder: {args.text})\n\n"
          f"{C.markdown_table(rows, COLUMNS)}\n\n"
          f"Peak memory: {mem_note}. Median of {args.rounds} round(s) of {rows[0]['runs'][0]['steps']} steps after "
          f"{rows[0]['runs'][0]['warmup']} warm-up step(s). GFLOP/step: model FLOPs of one step (FlopCounterMode);"
          f" bf16 peak: {rows[0]['runs'][0].get('peak_tflops_bf16') or '–'} TFLOP/s.\n"
          f"Machine: {C.machine_line(info)}; load average at end {info['load_average_at_end'][0]}.\n")
    paths = C.write_results(args.out, name, record, md)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
