"""Convert the authors' released DMMI checkpoints (RIS-DMMI) into dmmi's format.

Their checkpoint is a dict ``{model, bert_model, optimizer, epoch, args, lr_scheduler}``
(SPEC §7). ``model`` holds the segmentation network under their names (``backbone.*``,
``classifier.*``, ``contrastive.*``), ``bert_model`` the text encoder. Every name maps onto
ours by the rules in :data:`RULES`; a few tensors are dropped on purpose and reported:

* ``*.decoder_layer.*``: unused copies of each transformer layer (PyTorch's
  ``nn.TransformerDecoder`` deep-copies the layer it is given; 23.6 M parameters),
* ``backbone.layers.3.res_gate.*`` (Swin): the last stage's gate, whose output nothing reads,
* ``*.relative_position_index``: a constant buffer our Swin recomputes (checked for equality).

The converted model runs with ``model.compat = 'ris-dmmi'`` so that it computes exactly what
the authors' code computes (see README, "Differences from the authors' code").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from dmmi.errors import DmmiError

_MBA = [
    (r"fusion\.vis_project\.0\.", "mba.pixel_project.0."),
    (r"fusion\.project_mm\.0\.", "mba.fused_project.0."),
    (r"fusion\.image_lang_att\.vis_weight$", "mba.region_mix"),
    (r"fusion\.image_lang_att\.lan_weight$", "mba.window_mix"),
    (r"fusion\.image_lang_att\.f_value\.0\.", "mba.word_value.0."),
    (r"fusion\.image_lang_att\.f_value_v\.0\.", "mba.pixel_value.0."),
    (r"fusion\.image_lang_att\.W\.0\.", "mba.visual_out.0."),
    (r"fusion\.image_lang_att\.W2\.0\.", "mba.text_out.0."),
    (r"fusion\.image_lang_att\.refineimg(\d)\d\.f_key\.0\.", lambda m: f"mba.region_attn.{_REGION[m[1]]}.word_key.0."),
    (r"fusion\.image_lang_att\.refineimg(\d)\d\.f_query\.0\.", lambda m: f"mba.region_attn.{_REGION[m[1]]}.pixel_reduce.0."),
    (r"fusion\.image_lang_att\.refineimg(\d)\d\.f_query2\.0\.", lambda m: f"mba.region_attn.{_REGION[m[1]]}.region_query.0."),
    (r"fusion\.image_lang_att\.refinelan(\d)1\.f_key\.0\.", lambda m: f"mba.window_attn.{int(m[1]) - 1}.pixel_key.0."),
    (r"fusion\.image_lang_att\.refinelan(\d)1\.f_query\.0\.", lambda m: f"mba.window_attn.{int(m[1]) - 1}.word_reduce.0."),
    (r"fusion\.image_lang_att\.refinelan(\d)1\.f_query2\.0\.", lambda m: f"mba.window_attn.{int(m[1]) - 1}.window_query.0."),
    (r"res_gate\.", "visual_gate."),
    (r"W_l\.0\.", "language_update.0."),
]
_REGION = {"1": 0, "3": 1, "5": 2}
_BN = {"conv1": "block.0", "bn1": "block.1", "conv2": "block.3", "bn2": "block.4"}
_FUSE = {"4": "fuse_16", "3": "fuse_8", "2": "fuse_4"}

# (pattern on the authors' name, replacement or callable) -- the first rule that matches wins
RULES: list = [
    # dropped on purpose (reported)
    (r".*\.decoder_layer\..*", None),
    (r".*\.relative_position_index$", None),
    # Swin backbone
    (r"^backbone\.patch_embed\.", "visual.body.patch_embed."),
    (r"^backbone\.layers\.(\d)\.blocks\.", lambda m: f"visual.body.layers.{m[1]}.blocks."),
    (r"^backbone\.layers\.(\d)\.downsample\.", lambda m: f"visual.body.layers.{int(m[1]) + 1}.downsample."),
    (r"^backbone\.norm(\d)\.", lambda m: f"fusions.{m[1]}.skip_norm."),
    # ResNet backbone (torchvision layout, stem folded into layer1)
    (r"^backbone\.layer1\.0\.", "visual.body.conv1."),
    (r"^backbone\.layer1\.1\.", "visual.body.bn1."),
    (r"^backbone\.layer1\.4\.", "visual.body.layer1."),
    (r"^backbone\.layer([234])\.", lambda m: f"visual.body.layer{m[1]}."),
    # text-to-image decoder
    (r"^classifier\.(conv[12]|bn[12])_([234])\.", lambda m: f"decoder.{_FUSE[m[2]]}.{_BN[m[1]]}."),
    (r"^classifier\.transformer_fusion1\.transformer_model\.layers\.0\.", "decoder.query_16.layer."),
    (r"^classifier\.transformer_fusion2\.transformer_model\.layers\.0\.", "decoder.query_8.layer."),
    (r"^classifier\.conv1_1\.", "decoder.classifier."),
    # image-to-text decoder (CCR) and contrastive head
    (r"^classifier\.lan_func\.conv1\.", "ccr.visual_memory.0."),
    (r"^classifier\.lan_func\.bn1\.", "ccr.visual_memory.1."),
    (r"^classifier\.lan_func\.transformer_model\.layers\.0\.", "ccr.layer."),
    (r"^classifier\.crossfuse1\.linear\.", "contrastive.fuse_8."),
    (r"^classifier\.crossfuse2\.linear\.", "contrastive.fuse_4."),
    (r"^contrastive\.align_lan\.0\.", "contrastive.text_align."),
]


def map_authors_key(name: str) -> Optional[str]:
    """The authors' parameter name -> ours; None when the tensor is dropped on purpose.

    Raises KeyError for a name no rule knows.
    """
    m = re.match(r"^backbone\.(?:layers\.(\d)\.|all_fusion(\d)\.)(fusion\..*|res_gate\..*|W_l\..*)$", name)
    if m:
        stage = int(m[1]) if m[1] is not None else int(m[2]) - 1
        rest = m[3]
        for pattern, repl in _MBA:
            mm = re.match(pattern, rest)
            if mm:
                new = repl(mm) if callable(repl) else repl
                return f"fusions.{stage}." + new + rest[mm.end():]
        raise KeyError(name)
    for pattern, repl in RULES:
        mm = re.match(pattern, name)
        if mm:
            if repl is None:
                return None
            new = repl(mm) if callable(repl) else repl
            return new + name[mm.end():]
    raise KeyError(name)


def convert_state_dicts(model_sd: dict, bert_sd: Optional[dict], target: dict, *,
                        source: str = "checkpoint") -> tuple[dict, dict]:
    """Map the authors' tensors onto ``target`` (our model's state_dict, for names and shapes).

    Returns (state_dict, report). Refuses on an unknown name or a shape mismatch, naming the
    key. ``report``: dropped names, our names left unset, and counts.
    """
    out: dict = {}
    dropped: list[str] = []
    items = [(k, v) for k, v in model_sd.items()]
    items += [(f"__bert__.{k}", v) for k, v in (bert_sd or {}).items()]
    for name, tensor in items:
        if name.startswith("__bert__."):
            bert_name = name[len("__bert__."):]
            if bert_name.startswith("pooler."):
                dropped.append(f"bert_model.{bert_name}")
                continue
            ours = f"text_encoder.bert.{bert_name}"
        else:
            try:
                ours = map_authors_key(name)
            except KeyError:
                raise DmmiError(f"{source}: key {name!r} is not part of the authors' DMMI layout") from None
            if ours is None or (ours not in target and re.match(r"^fusions\.\d\.visual_gate\.", ours)):
                dropped.append(name)
                continue
        if ours not in target:
            raise DmmiError(f"{source}: key {name!r} (ours: {ours}) does not exist in this preset's model; "
                            "is it the right --preset?")
        if tuple(target[ours].shape) != tuple(tensor.shape):
            raise DmmiError(f"{source}: shape mismatch for {name!r}: {tuple(tensor.shape)} in the checkpoint, "
                            f"{tuple(target[ours].shape)} in the model ({ours}); is it the right --preset?")
        out[ours] = tensor
    missing = [k for k in target if k not in out and not k.endswith("num_batches_tracked")]
    if bert_sd is None:
        missing = [k for k in missing if not k.startswith("text_encoder.")]
    report = {"converted": len(out), "dropped": dropped, "missing": missing,
              "dropped_parameters": int(sum(model_sd[k].numel() for k in dropped if k in model_sd))}
    return out, report


def read_authors_checkpoint(path: str | Path) -> tuple[dict, Optional[dict], dict]:
    """-> (model state, bert state or None, info). Refuses anything that is not their layout."""
    p = Path(path)
    if not p.is_file():
        raise DmmiError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            # their checkpoints pickle an argparse.Namespace under "args": allow exactly that
            try:
                import argparse

                with torch.serialization.safe_globals([argparse.Namespace]):
                    ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
            except Exception as e2:  # noqa: BLE001
                raise DmmiError(f"{p}: cannot be read safely ({str(e2).splitlines()[0][:160]})") from None
        else:
            raise DmmiError(f"{p}: not a readable torch checkpoint or truncated ({msg})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt["model"], dict):
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DmmiError(f"{p}: not the authors' DMMI layout (expected a dict with 'model' and 'bert_model'; "
                        f"found {keys})")
    model_sd = ckpt["model"]
    if not any(k.startswith("backbone.") for k in model_sd) or not any(k.startswith("classifier.") for k in model_sd):
        raise DmmiError(f"{p}: 'model' has no backbone.* / classifier.* tensors: not an authors' DMMI checkpoint")
    info = {"epoch": ckpt.get("epoch")}
    return model_sd, ckpt.get("bert_model"), info


def guess_preset(model_sd: dict) -> str:
    """Which preset the authors' tensors belong to."""
    if any(k.startswith("backbone.all_fusion") for k in model_sd):
        return "dmmi_r101"
    w = model_sd.get("backbone.patch_embed.proj.weight")
    if w is not None and w.shape[0] == 128:
        return "dmmi_swin_b"
    if w is not None and w.shape[0] == 96:
        return "dmmi_swin_t"
    raise DmmiError("cannot tell the backbone from the checkpoint; pass --preset")


def convert_checkpoint(src: str, out: str, preset: Optional[str] = None, overrides=(),
                       trained_on: Optional[str] = None) -> dict:
    """Authors' checkpoint file -> our model file: weights-only torch, safetensors or a Hub-style model
    directory, by ``out``'s suffix (:func:`dmmi.models.io.save_model_file`). A dmmi model file as ``src``
    is rewritten in ``out``'s layout (e.g. ``best.pt`` -> a model directory), keeping what it records
    (figures, steps, training data). ``trained_on``: the dataset the authors trained that checkpoint on,
    for the model card (their file does not say)."""
    import warnings

    from dmmi.config import load_config
    from dmmi.models.io import model_from_state, read_model_file_extra, save_model_file
    from dmmi.models import build_model

    if _is_dmmi_file(src):
        state, cfg_dict, kept = read_model_file_extra(src)  # kept: its figures, steps and training data
        model, cfg = model_from_state(str(src), state, cfg_dict)
        save_model_file(out, model, cfg, extra={**kept, "converted_from": str(src)})
        n = len(model.state_dict())
        return {"converted": n, "dropped": [], "missing": [], "preset": cfg.preset, "out": str(out),
                "compat": cfg.model.compat}
    model_sd, bert_sd, info = read_authors_checkpoint(src)
    preset = preset or guess_preset(model_sd)
    cfg = load_config(preset, ["model.compat=ris-dmmi", "model.text_pretrained=false", *overrides])
    if bert_sd is not None:
        width = bert_sd.get("embeddings.word_embeddings.weight")
        if width is not None and cfg.model.text_config is None and width.shape[1] != 768:
            raise DmmiError(f"{src}: text encoder width {width.shape[1]} is not BERT-base's 768")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg.model, text_width=768 if bert_sd is None else None)
    state, report = convert_state_dicts(model_sd, bert_sd, model.state_dict(), source=str(src))
    model.load_state_dict(state, strict=False)
    cfg.model.text_pretrained = False  # weights come from this file
    # what it was trained on is not in the authors' file: None unless told (``trained_on``, --trained-on)
    save_model_file(out, model, cfg, extra={"converted_from": str(src), "epoch": info.get("epoch"),
                                            "trained_on": trained_on})
    report.update(preset=preset, out=str(out), compat="ris-dmmi")
    return report


def _is_dmmi_file(src: str) -> bool:
    """A dmmi model file, training checkpoint or model directory (not the authors' layout)."""
    from dmmi import hub

    path = Path(src)
    if hub.is_model_dir(path) or path.suffix == ".safetensors":
        return True
    if not path.is_file():
        return False
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the authors' files need a wider reader (read_authors_checkpoint)
        return False
    return isinstance(payload, dict) and payload.get("format") in ("dmmi-model", "dmmi-checkpoint")


CONVERT_EXAMPLES = """\
examples:
  dmmi convert refzom_swin_b.pth --out dmmi-refzom-swin-b/ --trained-on ref-zom   # preset from the tensors
  dmmi convert grefumd_r101.pth --out dmmi_grefumd_r101.safetensors --preset dmmi_r101
  dmmi convert refzom_swin_b.pth --out dmmi-refzom-480/ --set model.image_size=480   # the authors' size
  dmmi convert runs/demo/best.pt --out my-dmmi/                       # a dmmi checkpoint -> a model directory
"""


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser("convert", help="convert the authors' released checkpoint into dmmi's format",
                              description="Convert the authors' released DMMI checkpoint (RIS-DMMI) into dmmi's "
                                          "format,\nor rewrite a dmmi model file in another layout.",
                              epilog=CONVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the authors' .pth (dict with model + bert_model), or a dmmi model file")
    p.add_argument("--out", required=True,
                   help="output: FILE.pt (weights-only torch), FILE.safetensors, or DIR (a Hub-style model directory: "
                        "config.json + model.safetensors + README.md)")
    p.add_argument("--preset", default=None,
                   help="dmmi_swin_b | dmmi_swin_t | dmmi_r101 (guessed if omitted; the authors' checkpoints only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the converted model, e.g. --set model.image_size=480 "
                        "(repeatable; the authors' checkpoints only)")
    p.add_argument("--trained-on", default=None, metavar="DATASET",
                   help="the dataset the authors' checkpoint was trained on, for the model card, e.g. ref-zom or "
                        "'G-Ref (UMD)' (their file does not record it)")
    p.set_defaults(func=_cmd_convert)


def _check_convert_args(args) -> None:
    """One-line DmmiError for a bad --preset / --set / --out before the checkpoint is read or anything written."""
    from dmmi.config import Config, apply_overrides, load_config
    from dmmi.engine.checkpoint import check_writable_folder

    if not Path(args.checkpoint).exists():
        raise DmmiError(f"checkpoint not found: {args.checkpoint}")
    if args.preset:
        load_config(args.preset, ["model.compat=ris-dmmi", "model.text_pretrained=false", *args.overrides])
    else:
        Config.from_dict(apply_overrides({}, args.overrides), source="--set")
    out = Path(args.out)
    as_dir = out.is_dir() or not out.suffix  # a model directory
    if as_dir and out.exists() and not out.is_dir():
        raise DmmiError(f"--out {out}: is a file; a model directory (no suffix) needs a folder")
    check_writable_folder(out if as_dir else out.parent, "--out", named=out)
    if (args.preset or args.overrides or args.trained_on) and _is_dmmi_file(args.checkpoint):
        raise DmmiError(f"--preset / --set / --trained-on: {args.checkpoint} is a dmmi model, whose config and "
                        "records are kept; they apply to the authors' checkpoints only")


def _cmd_convert(args) -> int:
    _check_convert_args(args)
    report = convert_checkpoint(args.checkpoint, args.out, args.preset, args.overrides, trained_on=args.trained_on)
    print(f"converted {report['converted']} tensors into {report['out']} (preset {report['preset']}, "
          f"compat {report['compat']})")
    if report["dropped"]:
        print(f"dropped {len(report['dropped'])} tensors on purpose ({report['dropped_parameters']:,} parameters: "
              "unused decoder-layer copies, the last Swin stage's unread gate, constant buffers)")
    if report["missing"]:
        print(f"warning: {len(report['missing'])} tensors of our model were not in the checkpoint, "
              f"e.g. {report['missing'][:3]}")
    print(json.dumps({k: v for k, v in report.items() if k not in ('dropped', 'missing')}))
    return 0
