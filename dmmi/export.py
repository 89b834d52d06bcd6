"""``dmmi export``: a model's inference graph as ONNX, with a JSON sidecar saying how to feed it.

    dmmi export runs/demo/model --format onnx --out m.onnx      # -> m.onnx + m.onnx.json

The graph is the eval-mode forward (what :class:`dmmi.inference.Predictor` runs, in fp32):

    image (B, 3, S, S) float32, normalised   \\
    input_ids (B, L) int64                    }-> logits (B, 2, S, S) float32, channel 1 = referred
    attention_mask (B, L) int64              /

with B dynamic and S = ``model.image_size``, L = ``model.max_tokens`` fixed. It is traced by
``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript's translation, then its
constant folding: :func:`to_onnx`) at opset :data:`OPSET`; the TorchScript exporter (``dynamo=False``) cannot export
the decoder's ``nn.TransformerDecoderLayer``, whose eval-mode fast path is
``aten::_native_multi_head_attention``. The sidecar (:func:`sidecar`) carries the pre- and
post-processing: the resize and mean/std of :func:`dmmi.data.transforms.image_to_tensor`, the
tokenizer and its padding rule (:mod:`dmmi.data.tokenize`), and the Predictor's logits -> mask.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dmmi.engine.checkpoint import atomic_write, check_writable_folder
from dmmi.errors import DmmiError

FORMATS = ("onnx",)
OPSET = 18  # torchlib's own opset: no version conversion; onnxruntime >= 1.14 runs it
INPUTS = ("image", "input_ids", "attention_mask")
OUTPUTS = ("logits",)
SINGLE_FILE_LIMIT = 1.8 * 2**30  # protobuf's 2 GiB cap: above this the weights go to OUT.data
ONNX_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) imports


class LogitsGraph(nn.Module):
    """The model's inference forward as a function of three tensors (what is exported).

    forward(image (B, 3, S, S), input_ids (B, L), attention_mask (B, L)) -> logits (B, 2, S, S)
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(image, input_ids, attention_mask).logits


def sidecar_path(out: str | Path) -> Path:
    """``m.onnx`` -> ``m.onnx.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DmmiError(f"--format {fmt!r}: unknown export format (known: {', '.join(FORMATS)})")
    return fmt


def check_onnx_packages() -> None:
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise DmmiError(f"dmmi export --format onnx needs the package(s) {', '.join(missing)}: "
                        "pip install -e '.[onnx]' in the dmmi clone (onnx, onnxscript; onnxruntime to run the result)")


def check_out(out: str | Path) -> Path:
    """Refuse, before any work, an ``--out`` that cannot be written (:func:`check_out_creates_nothing`),
    then create its missing parent folders."""
    out = check_out_creates_nothing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def check_out_creates_nothing(out: str | Path) -> Path:
    """Refuse an ``--out`` that is a folder (or whose sidecar is), lies under a file, or in a folder that
    cannot be written; creates nothing (a bad model, read next, leaves no folder behind)."""
    out = Path(out)
    for path, what in ((out, "--out"), (sidecar_path(out), "--out's sidecar"), (tokenizer_path(out), "--out's tokenizer")):
        if path.is_dir():
            raise DmmiError(f"{what} {path}: is a folder; give a file name such as {path / 'model.onnx'}")
    check_writable_folder(out.parent, "--out", named=out)
    return out


def example_inputs(image_size: int, max_tokens: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: image (batch, 3, S, S), input_ids and attention_mask (batch, L), some padding.

    batch 2: torch.export would specialise a batch of 1."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, image_size, image_size, generator=g)
    mask = torch.ones(batch, max_tokens, dtype=torch.long)
    mask[:, max(2, max_tokens // 2):] = 0
    ids = torch.randint(1000, 2000, (batch, max_tokens), generator=g) * mask
    return image, ids, mask


@contextmanager
def _quiet():
    """Silence the exporter's progress lines, warnings and onnxscript's constant-folding notes."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def to_onnx(module: nn.Module, inputs: tuple, input_names, output_names):
    """Trace ``module`` (eval, fp32) with dim 0 of every input dynamic ("batch") -> torch's ONNXProgram.

    ``torch.onnx.export(dynamo=True, optimize=False)``, then onnxscript's constant folding and
    removal of unused nodes. Not onnxscript's pattern rewriter (``optimize=True``): it doubled the
    export time (dmmi_lite, 2 shared cores: 73-104 s with it, 40-51 s without) and left onnxruntime's
    CPU latency as it was (333 vs 339 ms, batch 1, 1 thread; onnxruntime fuses on its own). The folding
    is needed: onnxruntime 1.32 fails on the unfolded graph (its MatMul + Transpose fusion reuses a
    buffer of the wrong shape).
    """
    import onnxscript.optimizer

    batch = torch.export.Dim("batch")
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(module, inputs, None, dynamo=True, opset_version=OPSET,
                                    input_names=list(input_names), output_names=list(output_names),
                                    dynamic_shapes=tuple({0: batch} for _ in inputs),
                                    optimize=False, verbose=False)
        onnxscript.optimizer.fold_constants(program.model, onnx_shape_inference=True)
        onnxscript.optimizer.remove_unused_nodes(program.model)
    return program


def export_onnx(model: nn.Module, cfg, out: str | Path, *, source: str | None = None) -> dict:
    """Export ``model`` (built from ``cfg``, a Config) to ``out`` + its sidecar; -> the sidecar dict.

    ``model`` is put in eval mode and traced on CPU in fp32 (in place: ``model.float().cpu().eval()``).
    """
    check_onnx_packages()
    out = check_out(out)
    S, L = int(cfg.model.image_size), int(cfg.model.max_tokens)
    graph = LogitsGraph(model.float().cpu().eval()).eval()
    n_bytes = sum(t.numel() * t.element_size() for t in (*graph.parameters(), *graph.buffers()))
    external = n_bytes > SINGLE_FILE_LIMIT
    t0 = time.perf_counter()
    try:
        program = to_onnx(graph, example_inputs(S, L), INPUTS, OUTPUTS)
    except DmmiError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export / translation failures are long multi-line reports
        raise DmmiError(f"{source or 'model'}: torch.onnx.export failed ({_root_cause(e)})") from None
    seconds = time.perf_counter() - t0
    if external:  # OUT + OUT.data: the data file's name is written into OUT, so no rename afterwards
        program.save(str(out), external_data=True)
    else:
        atomic_write(out, lambda tmp: program.save(str(tmp), external_data=False))
    from dmmi.data.tokenize import load_tokenizer

    single = load_tokenizer(cfg.model.text_encoder).backend_tokenizer  # one file, for runtimes without dmmi
    single.no_padding()  # encode() -> [CLS] pieces [SEP]; the recipe cuts and pads to max_tokens itself
    single.no_truncation()
    atomic_write(tokenizer_path(out), lambda tmp: single.save(str(tmp)))
    info = sidecar(cfg, out, source=source, external_data=external)
    info["export_seconds"] = round(seconds, 1)
    text = json.dumps(info, indent=1) + "\n"
    atomic_write(sidecar_path(out), lambda tmp: tmp.write_text(text))
    return info


def tokenizer_path(out: Path) -> Path:
    """``m.onnx`` -> ``m.onnx.tokenizer.json`` (the Hugging Face tokenizers file of the model's tokenizer)."""
    return Path(out).with_name(Path(out).name + ".tokenizer.json")


def sidecar(cfg, out: Path, *, source: str | None = None, external_data: bool = False) -> dict:
    """What a runtime needs besides the graph: shapes, pre-processing, tokenizer, logits -> mask."""
    from dmmi.data.tokenize import PAD_ID
    from dmmi.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from dmmi.hub import source_name

    S, L = int(cfg.model.image_size), int(cfg.model.max_tokens)
    return {
        "format": "dmmi-onnx",
        "version": 1,
        "file": out.name,
        "external_data": f"{out.name}.data" if external_data else None,
        "source": None if source is None else str(source),
        "preset": cfg.preset,
        "opset": OPSET,
        "exporter": f"torch.onnx.export(dynamo=True) + onnxscript constant folding, torch {torch.__version__}",
        "image_size": S,
        "max_tokens": L,
        "inputs": {
            "image": {"shape": ["batch", 3, S, S], "dtype": "float32"},
            "input_ids": {"shape": ["batch", L], "dtype": "int64"},
            "attention_mask": {"shape": ["batch", L], "dtype": "int64"},
        },
        "outputs": {"logits": {"shape": ["batch", 2, S, S], "dtype": "float32",
                               "channels": ["background", "referred"]}},
        "preprocess": {
            "color": "RGB",
            "resize": f"the whole image to {S} x {S}, bilinear (PIL), aspect ratio not kept",
            "scale": 1 / 255,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "layout": "NCHW: (pixel / 255 - mean) / std per channel",
        },
        "tokenizer": source_name(cfg.model.text_encoder),  # what it was trained with
        "tokenizer_file": tokenizer_path(out).name,  # the same, for tokenizers.Tokenizer.from_file
        "tokenize": (f"lower-cased sentence -> [CLS] word-pieces [SEP], cut to {L} tokens (no [SEP] put back), "
                     f"padded with id {PAD_ID}; attention_mask 1 on tokens, 0 on padding; at least one token "
                     "per row (dmmi.data.tokenize.encode)"),
        "postprocess": {
            "mask": "logits[:, 1] > logits[:, 0] (argmax over channel 1 vs 0)",
            "at_original_size": ("resize the logits (B, 2, S, S) to the image's (H, W) bilinearly, align_corners="
                                 "false, then compare channel 1 with channel 0: what dmmi.inference.Predictor does; "
                                 "an empty mask means the expression refers to nothing in the image"),
        },
    }


def export_model(model_path: str, out: str, fmt: str = "onnx") -> dict:
    """``dmmi export``: load a model file / directory / Hub repo id and export it. -> the sidecar dict."""
    check_format(fmt)
    check_onnx_packages()
    check_out(out)
    from dmmi.models.io import load_model_file

    model, cfg = load_model_file(model_path)
    return export_onnx(model, cfg, out, source=str(model_path))


EXPORT_EXAMPLES = """\
examples:
  dmmi export runs/demo/model --format onnx --out m.onnx         # -> m.onnx + m.onnx.json
  dmmi export my-dmmi/ --out exported/dmmi.onnx                   # a model directory; exported/ is created
"""


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser("export", help="export a model's inference graph (ONNX) with a JSON sidecar",
                              description="Export a model's inference graph (ONNX) with a JSON sidecar saying how "
                                          "to feed it\n(pre-processing, tokenizer, logits -> mask). Needs "
                                          "pip install -e '.[onnx]' in the dmmi clone.",
                              epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model file (.pt / .safetensors), a model directory or a Hub repo id")
    p.add_argument("--format", default="onnx", help=f"{' | '.join(FORMATS)} (default onnx)")
    p.add_argument("--out", required=True, help="output file, e.g. m.onnx; the sidecar goes to m.onnx.json")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    check_format(args.format)
    check_onnx_packages()
    check_out_creates_nothing(args.out)  # then the model is read: a bad one leaves no folder behind
    from dmmi.models.io import load_model_file

    model, cfg = load_model_file(args.model)
    info = export_onnx(model, cfg, args.out, source=str(args.model))  # check_out creates --out's folder
    out = Path(args.out)
    size = out.stat().st_size + (out.with_name(out.name + ".data").stat().st_size if info["external_data"] else 0)
    print(f"exported {info['preset']} to {out} ({size / 2**20:.1f} MiB, opset {info['opset']}, batch dynamic, "
          f"{info['image_size']} px, {info['max_tokens']} tokens, {info['export_seconds']} s) and "
          f"{sidecar_path(out)}")
    return 0
