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
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timing, profile N more steps and print the top kernels/ops (torch.profiler)")
    p.add_argument("--worker", choices=("fast", "reference"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> dict:
    """One mode in this process; prints its record after MARK."""
    from dmmi.engine.fastpath import autocast, describe, fused_adamw_ok, prepare_images, prepare_model
    from dmmi.engine.optim import build_optimizer
    from dmmi.losses import dmmi_loss

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
    model = prepare_model(C.build(cfg), device, fast=fast, compile=fast and args.compile).train()
    fused = fast and fused_adamw_ok(model)
    opt = build_optimizer(model, cfg.train, fused=fused)
    batch = C.fake_batch(cfg, args.batch, args.tokens, device)
    images = prepare_images(batch["images"], device, fast)
    compat = cfg.model.compat == "ris-dmmi"

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, fast, cpu_bf16=args.cpu_bf16):
            out = model(images, batch["input_ids"], batch["attention_mask"], batch["erased_ids"])
            loss = dmmi_loss(out, batch["target"], batch["attention_mask"], batch["delta"], cfg.loss,
                             compat=compat).total
        loss.backward()
        opt.step()
        return loss

    rss_before = C.current_rss_mib()
    for _ in range(warmup):
        step()
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
    record = {
        "mode": args.worker,
        "setup": describe(device, fast, cpu_bf16=args.cpu_bf16, compile=args.compile if fast else False),
        "fused_adamw": bool(fused), "batch": args.batch, "steps": steps, "warmup": warmup,
        "seconds": round(wall, 4), "step_ms": round(1000 * wall / steps, 2),
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
        record["peak_rss_mib"] = round(C.peak_rss_mib(), 1)
        record["rss_before_steps_mib"] = round(rss_before, 1)
        record["peak_mem_mib"] = round(C.peak_rss_mib() - rss_before, 1)  # the steps' rise
    return record


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
           ("peak_mem_mib", "peak mem (MiB)"), ("throughput_ratio", "throughput vs reference"),
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
                     "peak_mem_mib": round(statistics.median(mem), 1), "runs": recs})
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
          f"{rows[0]['runs'][0]['warmup']} warm-up step(s).\n"
          f"Machine: {C.machine_line(info)}; load average at end {info['load_average_at_end'][0]}.\n")
    paths = C.write_results(args.out, name, record, md)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
