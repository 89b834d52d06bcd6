"""MBA realisations compared, stage by stage: the model's eager MBA vs candidate rewrites.

    python benchmarks/bench_mba.py --preset dmmi_swin_b --size 448 --batch 2
    python benchmarks/bench_mba.py --preset dmmi_swin_b --device cuda --batch 8

``eager`` is the model's module as it runs (its image-to-text branch factored through the pixel
covariance where C < min(Ct, N), see dmmi/models/mba.py); ``direct-i2t`` is the same module
forced to build the (B, Ct, N) pixel keys and values instead.
Candidates (same parameters, same function; each is checked against the eager module first):
* ``sdpa``: sum_r lambda_r softmax(Q_r K_r^T / sqrt(C) + mask) V = sum_r lambda_r SDPA(Q_r, K_r, V)
  with the word padding as a boolean mask (text-to-image), and the same for image-to-text
  (softmax over pixels, no mask: padding words have a zero query);
* ``conv``: the region query unfold(k x k) -> 1x1 conv realised as one k x k convolution
  with the same weights (no unfolded (B, C/r*k*k, N) tensor);
* ``sdpa+conv``: both.
Per stage (the preset's widths at strides 4..32, text width Ct, 20 tokens): forward+backward
time (median of --iters, variants interleaved), activation memory saved for backward (unique
storages recorded by autograd's saved-tensor hooks, parameters excluded), CUDA peak memory,
and the largest deviation from eager (fp32: must stay <= 1e-4). This is the evidence behind
the fast path's choice (dmmi/engine/fastpath.py). Writes results/mba_<preset>_<size>_<device>.
"""

from __future__ import annotations

import argparse
import os

import _common as C
import torch
import torch.nn.functional as F

from dmmi.engine.fastpath import autocast, configure_backends, describe
from dmmi.models.mba import MultiScaleBidirectionalAttention

VARIANTS = ("eager", "direct-i2t", "sdpa", "conv", "sdpa+conv")


# ----------------------------------------------------------------------------- candidates
def _region_query_key(a, v, words, word_mask, conv: bool):
    """RegionWordAttention's query (B, C, N) and masked key (B, C, L)."""
    B, C, H, W = v.shape
    k = a.region
    reduced = a.pixel_reduce(v.flatten(2)).view(B, -1, H, W)  # (B, C/r, H, W)
    if conv:
        lin = a.region_query[0]
        weight = lin.weight.view(lin.out_channels, -1, k, k)  # unfold order = (channel, ky, kx)
        query = a.region_query[1](F.conv2d(reduced, weight, lin.bias, padding=k // 2).flatten(2))  # (B, C, N)
    else:
        query = a.region_query(F.unfold(reduced, kernel_size=k, padding=k // 2))  # (B, C, N)
    key = a.word_key(words) * word_mask[:, None, :].to(query.dtype)  # (B, C, L)
    return query, key


def _window_query_key(a, v, words, word_mask):
    """WordWindowPixelAttention's masked query (B, L, Ct) and key (B, Ct, N)."""
    w = a.window
    reduced = F.pad(a.word_reduce(words).unsqueeze(-1), (0, 0, w // 2, (w - 1) // 2), mode="replicate")
    windows = F.unfold(reduced, kernel_size=(w, 1))  # (B, c*w, L)
    query = a.window_query(windows).transpose(1, 2) * word_mask[:, :, None].to(v.dtype)  # (B, L, Ct)
    return query, a.pixel_key(v.flatten(2))  # (B, Ct, N)


def candidate_forward(m: MultiScaleBidirectionalAttention, v, words, word_mask, *, sdpa: bool, conv: bool):
    """(R_v (B, C, H, W), R_l (B, Ct, L)) as MultiScaleBidirectionalAttention.forward."""
    B, C, H, W = v.shape
    mask_f = word_mask[:, None, :].to(v.dtype)  # (B, 1, L)
    value = (m.word_value(words) * mask_f).transpose(1, 2)  # (B, L, C)
    mix = m.region_mix.softmax(0)
    attended = 0
    if sdpa:
        keep = word_mask.bool()[:, None, :]  # (B, 1, L): True = attend
        for i, a in enumerate(m.region_attn):
            q, k = _region_query_key(a, v, words, word_mask, conv)
            attended = attended + mix[i] * F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), value, attn_mask=keep, scale=a.scale)  # (B, N, C)
    else:
        attn = 0
        for i, a in enumerate(m.region_attn):
            q, k = _region_query_key(a, v, words, word_mask, conv)
            scores = torch.bmm(q.transpose(1, 2), k) * a.scale + (mask_f - 1.0) * 1e4  # (B, N, L)
            attn = attn + mix[i] * scores.softmax(-1)
        attended = torch.bmm(attn, value)  # (B, N, C)
    attended = m.visual_out(attended.transpose(1, 2))  # (B, C, N)
    r_v = m.fused_project(m.pixel_project(v.flatten(2)) * attended).view(B, C, H, W)
    if not m.bidirectional:
        return r_v, None
    mix_b = m.window_mix.softmax(0)
    pix_value = m.pixel_value(v.flatten(2)).transpose(1, 2)  # (B, N, Ct)
    if sdpa:
        out = 0
        for i, a in enumerate(m.window_attn):
            q, k = _window_query_key(a, v, words, word_mask)
            out = out + mix_b[i] * F.scaled_dot_product_attention(q, k.transpose(1, 2), pix_value, scale=a.scale)
    else:
        attn = 0
        for i, a in enumerate(m.window_attn):
            q, k = _window_query_key(a, v, words, word_mask)
            attn = attn + mix_b[i] * (torch.bmm(q, k) * a.scale).softmax(-1)  # (B, L, N)
        out = torch.bmm(attn, pix_value)  # (B, L, Ct)
    return r_v, m.text_out(out.transpose(1, 2))  # (B, Ct, L)


def run_variant(name, m, v, words, mask):
    if name == "eager":
        return m(v, words, mask)
    if name == "direct-i2t":
        m.factored_i2t = False
        try:
            return m(v, words, mask)
        finally:
            m.factored_i2t = None
    return candidate_forward(m, v, words, mask, sdpa="sdpa" in name, conv="conv" in name)


# ----------------------------------------------------------------------------- measuring
def saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    own = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def widths_and_text(cfg) -> tuple[tuple[int, ...], int]:
    import warnings

    from dmmi.models.backbones import build_backbone
    from dmmi.models.text_encoder import resolve_text_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        widths = build_backbone(cfg.model).widths
    if cfg.model.text_config and "hidden_size" in cfg.model.text_config:
        return widths, int(cfg.model.text_config["hidden_size"])
    try:
        from transformers import AutoConfig

        return widths, int(AutoConfig.from_pretrained(resolve_text_model(cfg.model.text_encoder)).hidden_size)
    except Exception:  # noqa: BLE001 - bert-base offline: its width
        return widths, 768


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="dmmi_swin_b")
    C.common_arguments(p)
    p.add_argument("--batch", type=int, default=None, help="default 8 GPU, 2 CPU")
    p.add_argument("--iters", type=int, default=None, help="timed fwd+bwd per variant (default 20 GPU, 3 CPU)")
    p.add_argument("--stages", default="1,2,3,4", help="which stages (1 = stride 4)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    C.quiet_transformers()
    device = C.resolve_device(args.device)
    gpu = device.type == "cuda"
    info = C.machine_info(device)
    cfg = C.preset_config(args.preset, args.size, args.text, args.overrides)
    widths, text_dim = widths_and_text(cfg)
    S, L = cfg.model.image_size, cfg.model.max_tokens
    batch = args.batch or (8 if gpu else 2)
    iters = args.iters or (20 if gpu else 3)
    rows = []
    for mode in C.modes(args.mode):
        fast = mode == "fast"
        configure_backends(device, fast)
        for stage in (int(s) for s in args.stages.split(",")):
            C_ = widths[stage - 1]
            side = S // 2 ** (stage + 1)
            torch.manual_seed(stage)
            m = MultiScaleBidirectionalAttention(C_, text_dim, multi_scale=cfg.model.multi_scale,
                                                 bidirectional=cfg.model.bidirectional).to(device)
            with torch.no_grad():  # non-trivial mixing weights
                m.region_mix.copy_(torch.tensor([0.3, -0.2, 0.5])[: len(m.region_mix)])
            v = torch.randn(batch, C_, side, side, device=device)
            words = torch.randn(batch, text_dim, L, device=device)
            mask = torch.zeros(batch, L, device=device)
            mask[:, : max(2, L * 3 // 5)] = 1
            mask[0, 5:] = 0
            gv = torch.randn(batch, C_, side, side, device=device)
            gl = torch.randn(batch, text_dim, L, device=device)

            def fwd_bwd(name):
                with autocast(device, fast, cpu_bf16=args.cpu_bf16):
                    r_v, r_l = run_variant(name, m, v, words, mask)
                    loss = (r_v.float() * gv).sum() + (0 if r_l is None else (r_l.float() * gl).sum())
                loss.backward()

            with torch.no_grad():  # agreement with eager, this mode
                with autocast(device, fast, cpu_bf16=args.cpu_bf16):
                    ref = [t.float() for t in run_variant("eager", m, v, words, mask) if t is not None]
                    errs = {}
                    for name in VARIANTS[1:]:
                        out = [t.float() for t in run_variant(name, m, v, words, mask) if t is not None]
                        errs[name] = max((a - b).abs().max().item() for a, b in zip(ref, out))
            if not fast or not (gpu or args.cpu_bf16):
                tol = 1e-4 if not gpu else 2e-3  # cuDNN convolutions run in TF32 by default on a GPU
                bad = {k: e for k, e in errs.items() if e > tol}
                if bad:
                    raise SystemExit(f"stage {stage}: candidates differ from eager in fp32: {bad}")
            for name in VARIANTS:  # warm-up
                fwd_bwd(name)
            times = {name: [] for name in VARIANTS}
            for _ in range(iters):
                for name in VARIANTS:
                    m.zero_grad(set_to_none=True)
                    times[name].append(C.timed(lambda: fwd_bwd(name), device))
            for name in VARIANTS:
                with autocast(device, fast, cpu_bf16=args.cpu_bf16):
                    saved = saved_bytes(lambda: run_variant(name, m, v, words, mask), list(m.parameters()))
                peak = None
                if gpu:
                    torch.cuda.synchronize(device)
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    fwd_bwd(name)
                    torch.cuda.synchronize(device)
                    peak = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
                t = C.summary(times[name])
                rows.append({"mode": mode, "stage": stage, "C": C_, "N": side * side, "variant": name,
                             "fwd_bwd_ms": t["median_ms"], "fwd_bwd_min_ms": t["min_ms"],
                             "cpu_ms": None if gpu else t["cpu_median_ms"],
                             "saved_mib": round(saved / 2**20, 1), "peak_mib": peak,
                             "max_abs_diff_vs_eager": None if name == "eager" else float(f"{errs[name]:.3g}")})
            eager = rows[-len(VARIANTS)]
            for r in rows[-len(VARIANTS):]:
                r["time_vs_eager"] = round(r["fwd_bwd_ms"] / eager["fwd_bwd_ms"], 2)
                r["saved_vs_eager"] = round(r["saved_mib"] / eager["saved_mib"], 2) if eager["saved_mib"] else None
            print(*(f"{r['mode']} stage {r['stage']} {r['variant']}: {r['fwd_bwd_ms']} ms, saved {r['saved_mib']} MiB"
                    for r in rows[-len(VARIANTS):]), sep="\n", flush=True)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    columns = [("mode", "mode"), ("stage", "stage"), ("C", "C"), ("N", "pixels"), ("variant", "variant"),
               ("fwd_bwd_ms", "fwd+bwd (ms, median)"), ("cpu_ms", "CPU time (ms)"), ("time_vs_eager", "time vs eager"),
               ("saved_mib", "saved for backward (MiB)"), ("saved_vs_eager", "saved vs eager"),
               ("peak_mib", "CUDA peak (MiB)"), ("max_abs_diff_vs_eager", "max |diff| vs eager")]
    md = (f"### MBA realisations: {args.preset} at {S}x{S}, batch {batch}, Ct {text_dim}, {L} tokens\n\n"
          f"{C.markdown_table(rows, columns)}\n\n"
          f"Modes: " + "; ".join(f"{m}: {describe(device, m == 'fast', cpu_bf16=args.cpu_bf16)['autocast'] or 'fp32'}"
                                for m in C.modes(args.mode)) + ".\n"
          f"Machine: {C.machine_line(info)}; load average at end {info['load_average_at_end'][0]}.\n")
    record = {"benchmark": "mba", "machine": info, "args": vars(args), "preset": args.preset, "image_size": S,
              "batch": batch, "text_width": text_dim, "widths": list(widths), "rows": rows}
    name = f"mba_{args.preset}_{S}_{C.device_tag(info)}" + (f"_{args.tag}" if args.tag else "")
    paths = C.write_results(args.out, name, record, md)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
