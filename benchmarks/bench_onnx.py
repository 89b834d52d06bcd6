"""CPU batch-1 latency of an ONNX export (onnxruntime) against the same model in torch.

    python benchmarks/bench_onnx.py                       # dmmi_lite at 224, 1 and 2 threads
    python benchmarks/bench_onnx.py --preset dmmi_tiny --threads 1

The preset's model (its packaged weights where it has them) is exported with ``dmmi.export.export_onnx``
(what ``dmmi export`` runs) into a temporary folder. Then, per thread count, the torch model (eval,
fp32 eager under ``torch.inference_mode()``, ``torch.set_num_threads(T)``: the reference mode of
bench_inference.py) and an onnxruntime CPU session (``intra_op_num_threads=T``, one inter-op thread,
sequential, all graph optimisations) are called alternately on the same batch-1 inputs (image,
input_ids, attention_mask; no tokenising, no image decoding): median and min wall time of --iters
calls after --warmup calls each, process CPU time per call, and the largest |logit| difference.
Also recorded: export time, ONNX file size, session creation time.
Writes results/onnx_<preset>_<size>_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="dmmi_lite")
    p.add_argument("--size", type=int, default=224, help="input side (model.image_size)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure, each in turn")
    p.add_argument("--iters", type=int, default=20, help="timed calls per runtime and thread count")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first, per runtime and thread count")
    p.add_argument("--tokens", type=int, default=12, help="valid tokens of the expression (of model.max_tokens)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(C.RESULTS), help="results folder (JSON + markdown)")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    return p.parse_args(argv)


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv=None):
    import onnxruntime as ort

    from dmmi.export import export_onnx

    args = parse_args(argv)
    C.quiet_transformers()
    device = torch.device("cpu")
    cfg = C.preset_config(args.preset, args.size, "preset", args.overrides)
    model = C.build(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    batch = C.fake_batch(cfg, 1, args.tokens, device)
    inputs = (batch["images"], batch["input_ids"], batch["attention_mask"])
    feed = {"image": inputs[0].numpy(), "input_ids": inputs[1].numpy(), "attention_mask": inputs[2].numpy()}
    info = C.machine_info(device)
    info["onnxruntime"] = ort.__version__
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        t0 = time.perf_counter()
        side = export_onnx(model, cfg, path, source=args.preset)
        export_s = time.perf_counter() - t0
        size_mib = path.stat().st_size / 2**20
        for threads in args.threads:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            sess = session(path, threads)
            session_s = time.perf_counter() - t0

            def run_torch():
                with torch.inference_mode():
                    return model(*inputs).logits

            def run_ort():
                return sess.run(["logits"], feed)[0]

            diff = float(np.abs(run_ort() - run_torch().numpy()).max())
            for _ in range(args.warmup):
                run_torch(), run_ort()
            times = {"torch": [], "onnxruntime": []}
            for _ in range(args.iters):  # interleaved: a noisy machine slows both alike
                times["torch"].append(C.timed(run_torch, device))
                times["onnxruntime"].append(C.timed(run_ort, device))
            base = None
            for runtime, t in times.items():
                s = C.summary(t)
                row = {"runtime": runtime, "threads": threads, "latency_ms": s["median_ms"],
                       "latency_min_ms": s["min_ms"], "latency_cpu_ms": s["cpu_median_ms"], "latency": s}
                if runtime == "torch":
                    base = s["median_ms"]
                    row["setup"] = f"torch {torch.__version__} eager fp32, inference_mode, {threads} thread(s)"
                else:
                    row.update(speedup=round(base / s["median_ms"], 2), max_abs_diff=diff,
                               session_create_s=round(session_s, 2),
                               setup=f"onnxruntime {ort.__version__} CPUExecutionProvider, intra_op {threads}, "
                                     "inter_op 1, sequential, ORT_ENABLE_ALL")
                rows.append(row)
            del sess
    info_end = dict(info, load_average_at_end=[round(x, 2) for x in os.getloadavg()])
    S = cfg.model.image_size
    record = {"benchmark": "onnx", "machine": info_end, "args": vars(args), "preset": args.preset, "image_size": S,
              "tokens": args.tokens, "parameters": n_params, "export_seconds": round(export_s, 1),
              "onnx_mib": round(size_mib, 1), "opset": side["opset"], "exporter": side["exporter"], "rows": rows}
    columns = [("runtime", "runtime"), ("threads", "threads"), ("latency_ms", "batch-1 latency (ms, median)"),
               ("latency_min_ms", "min (ms)"), ("latency_cpu_ms", "CPU time (ms)"), ("speedup", "torch / ORT"),
               ("max_abs_diff", "max abs logit diff")]
    md = (f"### ONNX Runtime vs torch, CPU: {args.preset} at {S}x{S} ({n_params / 1e6:.1f} M parameters), batch 1\n\n"
          f"{C.markdown_table(rows, columns)}\n\n"
          f"Export: {record['export_seconds']} s, {record['onnx_mib']} MiB, opset {record['opset']} "
          f"({record['exporter']}); median of {args.iters} calls after {args.warmup}, interleaved.\n"
          f"Machine: {C.machine_line(info_end)}; onnxruntime {ort.__version__}; "
          f"load average at end {info_end['load_average_at_end'][0]}.\n")
    name = f"onnx_{args.preset}_{S}_cpu{'_' + args.tag if args.tag else ''}"
    paths = C.write_results(args.out, name, record, md)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
