"""Hub-style model directories, the layout the Hugging Face Hub expects of a model repository:

    DIR/config.json          {"format": "dmmi-model", "dmmi_version", "preset", "config": <the resolved Config>,
                              "extra": {"val": ..., "step": ..., "trained_on": ...}}
    DIR/model.safetensors    the state dict (safetensors only: loading never unpickles)
    DIR/README.md            a model card: intended use and limits, training data, figures, citation
    DIR/text_encoder/        the text encoder's config and tokenizer files (its weights are in
                             model.safetensors): the directory loads where the name it was trained
                             with (a local path such as /weights/bert-base-uncased) does not exist

    save_pretrained(model, cfg, "my-model/", license="apache-2.0")  # also: dmmi train (model/), dmmi convert --out DIR
    model, cfg = from_pretrained("my-model/")             # a local directory ...
    model, cfg = from_pretrained("someone/dmmi-swin-b")   # ... or a Hub repo id (huggingface_hub's cache)
    push_to_hub(model, cfg, "me/dmmi-swin-b")             # huggingface_hub's upload_folder

A repo id goes through ``huggingface_hub.snapshot_download``: with ``HF_HUB_OFFLINE=1`` (what
the ``dmmi`` command sets unless told otherwise) only what is already in the local cache loads,
and anything else is a one-line error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from dmmi.engine.checkpoint import atomic_write, load_weights_safetensors, save_weights_safetensors
from dmmi.errors import DmmiError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
TEXT_DIR = "text_encoder"
FORMAT = "dmmi-model"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")  # the Hub's identifiers: mit, apache-2.0, cc-by-nc-4.0, other

CITATION = """@inproceedings{hu2023beyond,
  title     = {Beyond One-to-One: Rethinking the Referring Image Segmentation},
  author    = {Hu, Yutao and Wang, Qixiong and Shao, Wenqi and Xie, Enze and Li, Zhenguo and Han, Jungong and Luo, Ping},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023},
  doi       = {10.1109/ICCV51070.2023.00376}
}"""


def is_model_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def looks_like_repo_id(name: str) -> bool:
    """``owner/name`` that is not a local path."""
    return bool(_REPO_ID.match(str(name))) and not Path(name).exists()


def save_pretrained(model: torch.nn.Module, cfg, directory: str | Path, *, extra: Optional[dict] = None,
                    name: Optional[str] = None, license: Optional[str] = None) -> Path:
    """Write ``model`` (weights) and ``cfg`` (a Config) as a model directory, each file atomically.
    ``extra``: plain data for config.json and the card (``{"val": results, "step": N, "test": {"split",
    "dmmi"}}``); ``name``: what the card's example loads (default: the directory); ``license``: the
    weights' license as a Hub identifier (``apache-2.0``, ``cc-by-nc-4.0``, ``other``; None: the card
    says ``unknown`` and what the weights derive from)."""
    return save_state_pretrained({k: v.detach() for k, v in model.state_dict().items()}, cfg, directory, extra=extra,
                                 name=name, license=license)


def save_state_pretrained(state: dict, cfg, directory: str | Path, *, extra: Optional[dict] = None,
                          name: Optional[str] = None, license: Optional[str] = None) -> Path:
    """:func:`save_pretrained` from a state dict (e.g. a checkpoint's ``model`` entry)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DmmiError(f"{directory} is a file, not a folder for a model directory")
    extra = _record({**(extra or {}), **({} if license is None else {"license": license})})
    directory.mkdir(parents=True, exist_ok=True)
    bundle_text_encoder(cfg.model.text_encoder, directory)
    save_weights_safetensors(directory / WEIGHTS_NAME, state, {"format": FORMAT, "preset": str(cfg.preset)})
    _write_config_and_card(cfg, directory, extra, name)
    return directory


def update_card(directory: str | Path, extra: dict, *, name: Optional[str] = None) -> Path:
    """Merge ``extra`` (e.g. ``{"test": {"split", "dmmi"}}``, ``{"license": "mit"}``) into a model
    directory's record and rewrite its config.json and README.md card; the weights are left alone."""
    from dmmi.config import Config

    directory = Path(directory)
    if not is_model_dir(directory):
        raise DmmiError(f"{directory}: not a local model directory (no {CONFIG_NAME}): update_card rewrites one "
                        "in place")
    _, config, old = read_model_dir(directory, load_weights=False)
    _write_config_and_card(Config.from_dict(config), directory, _record({**old, **extra}), name)
    return directory


def _record(extra: dict) -> dict:
    """``extra`` as plain JSON data for config.json, its ``license`` (if any) checked before anything is written."""
    extra = json.loads(json.dumps(extra, default=str))
    if extra.get("license") is not None:
        check_license(extra["license"])
    return extra


def _write_config_and_card(cfg, directory: Path, extra: dict, name: Optional[str]) -> None:
    """config.json (the text encoder under the name it was trained with, not its bundled copy) and the card."""
    from dmmi import __version__

    config = cfg.to_dict()
    config["model"]["text_encoder"] = source_name(cfg.model.text_encoder)
    meta = {"format": FORMAT, "dmmi_version": __version__, "preset": str(cfg.preset), "config": config,
            "extra": extra}
    config_text = json.dumps(meta, indent=1)
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(config_text))
    card = model_card(cfg, extra, name=name or str(directory))
    atomic_write(directory / CARD_NAME, lambda tmp: tmp.write_text(card))


def check_license(license) -> str:
    """A Hub license identifier (lower case: ``mit``, ``apache-2.0``, ``other``), else a one-line DmmiError."""
    if not isinstance(license, str) or not _LICENSE.match(license):
        raise DmmiError(f"license {license!r}: not a Hugging Face Hub license identifier (lower case, such as "
                        "mit, apache-2.0, cc-by-nc-4.0 or other)")
    return license


def source_name(text_encoder: str) -> str:
    """The text encoder's name as trained: a model directory's own ``text_encoder/`` (what a loaded
    directory's config points to) -> the name that directory records."""
    path = Path(str(text_encoder))
    if path.name == TEXT_DIR and (path.parent / CONFIG_NAME).is_file():
        try:
            meta = json.loads((path.parent / CONFIG_NAME).read_text())
            return str(meta["config"]["model"]["text_encoder"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return str(text_encoder)


def bundle_text_encoder(text_encoder: str, directory: Path) -> None:
    """The text encoder's config and tokenizer files -> ``directory/text_encoder/`` (replaced whole)."""
    from transformers import AutoConfig

    from dmmi.data.tokenize import load_tokenizer
    from dmmi.models.text_encoder import resolve_text_model

    final = directory / TEXT_DIR
    if Path(str(text_encoder)).resolve() == final.resolve():  # rewriting a directory in place: already there
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{TEXT_DIR}.", dir=directory))
    try:
        try:
            AutoConfig.from_pretrained(resolve_text_model(str(text_encoder))).save_pretrained(tmp)
        except OSError as e:
            raise DmmiError(f"text encoder {text_encoder}: cannot read its config to store it in {final} "
                            f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
        load_tokenizer(str(text_encoder)).save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name_or_path: str | Path, *, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> Path:
    """A local model directory, or a Hub repo id fetched into (or found in) huggingface_hub's cache
    (``cache_dir``: another cache than huggingface_hub's default)."""
    path = Path(name_or_path)
    if path.is_dir():
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise DmmiError(f"model directory {path} has no {name} (a dmmi model directory holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}; see dmmi.hub.save_pretrained)")
        return path
    if not looks_like_repo_id(str(name_or_path)):
        raise DmmiError(f"model {name_or_path}: neither a model directory nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        local = snapshot_download(repo_id=str(name_or_path), revision=revision, cache_dir=cache_dir,
                                  allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, f"{TEXT_DIR}/*"])
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        # said both ways: runs/dem0 may be a mistyped folder as well as a repo id
        raise DmmiError(f"model {name_or_path}: no such folder here, and as a Hub repo id (owner/name) it is "
                        "not in the local Hugging Face cache and the Hub is offline "
                        "(HF_HUB_OFFLINE=1, which the dmmi command sets, or no network): with network, run once with "
                        "HF_HUB_OFFLINE=0 to download it, or pass a local model directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise DmmiError(f"model {name_or_path}: cannot fetch it from the Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return resolve(local)


def read_model_dir(name_or_path: str | Path, *, revision: Optional[str] = None,
                   load_weights: bool = True) -> tuple[dict, dict, dict]:
    """-> (state_dict ({} without ``load_weights``), config dict, extra) of a model directory or repo id."""
    directory = resolve(name_or_path, revision=revision)
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise DmmiError(f"{directory / CONFIG_NAME}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise DmmiError(f"{directory / CONFIG_NAME}: not a dmmi model config (no \"format\": \"{FORMAT}\" "
                        "with a \"config\" mapping)")
    state = load_weights_safetensors(directory / WEIGHTS_NAME)[0] if load_weights else {}
    config = meta["config"]
    if (directory / TEXT_DIR / "config.json").is_file() and isinstance(config.get("model"), dict):
        config["model"]["text_encoder"] = str(directory / TEXT_DIR)  # its own copy (the name stays in config.json)
    return dict(state), config, meta.get("extra") or {}


def from_pretrained(name_or_path: str | Path, *, revision: Optional[str] = None, expect_preset: Optional[str] = None):
    """Rebuild the model of a directory / repo id and load its weights. -> (model in eval mode, Config)."""
    from dmmi.models.io import load_model_file

    model, cfg = load_model_file(name_or_path, expect_preset=expect_preset, revision=revision)
    return model.eval(), cfg


def push_to_hub(model: torch.nn.Module, cfg, repo_id: str, *, private: bool = False, token: Optional[str] = None,
                extra: Optional[dict] = None, license: Optional[str] = None,
                commit_message: str = "dmmi model") -> str:
    """Create (if needed) the Hub repository ``repo_id`` and upload the model directory. -> its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, cfg, tmp, extra=extra, name=repo_id, license=license)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(url)


def model_card(cfg, extra: dict, name: str = "my-dmmi-model") -> str:
    """The README.md of a model directory (Hub model-card front matter + text); ``name``: the directory
    or repo id its example loads."""
    d = cfg.data
    converted = "converted_from" in extra and not extra.get("step")  # an authors' checkpoint, not a dmmi run
    trained_on = extra.get("trained_on") or (None if converted else d.dataset)
    synthetic = trained_on == "synthetic"
    lines = ["---", "library_name: dmmi", f"license: {extra.get('license') or 'unknown'}",
             "pipeline_tag: image-segmentation", "tags:",
             "- referring-image-segmentation", "- dmmi", "---", "",
             f"# dmmi model: {cfg.preset}", "",
             "Referring image segmentation beyond one-to-one: given an image and an English expression, the mask "
             "of every object the expression refers to (none, one or many): the DMMI network of Hu et al., "
             "ICCV 2023, as reimplemented by the `dmmi` package.", "",
             "## Use", "", "```python", "from dmmi.inference import Predictor", "",
             f'predictor = Predictor.from_pretrained({json.dumps(str(name))})',
             'result = predictor.predict("photo.jpg", "the two dogs on the left")',
             "result.mask, result.no_target", "```", "",
             "## Model", "",
             f"- preset `{cfg.preset}`: visual encoder `{cfg.model.backbone}`, text encoder "
             f"`{source_name(cfg.model.text_encoder)}`, input {cfg.model.image_size} x {cfg.model.image_size}, "
             f"at most {cfg.model.max_tokens} tokens",
             f"- training data: `{trained_on}` (format `{d.format}`, split `{d.train_split}`)" if not converted else
             f"- converted from the authors' checkpoint `{Path(str(extra['converted_from'])).name}`; training data: "
             + (f"{trained_on} (as given to `dmmi convert`)" if trained_on else
                "not recorded in that file (see the authors' release)"), ""]
    if "step" in extra:
        lines += [f"- trained for {extra['step']} optimiser steps", ""]
    lines += ["## Intended use and limits", ""]
    if synthetic:
        lines += ["Trained on dmmi's synthetic set of coloured shapes on plain, textured or photo backgrounds: a "
                  "demonstration of the zero / one / many setting. It does not segment photographs meaningfully.", ""]
    else:
        lines += [f"Expressions and images like those of `{trained_on or 'its training data'}` (COCO-like "
                  "photographs, English). Expressions that refer to nothing get an empty mask when the model is "
                  "right; check its zero-target accuracy (Acc) on data like yours before relying on it.", ""]
    val = extra.get("val")

    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    if isinstance(val, dict) and isinstance(val.get("dmmi"), dict):
        m = val["dmmi"]
        lines += ["## Validation figures (selection split, DMMI protocol)", "", "| oIoU | mIoU | Acc (zero-target) |",
                  "|---|---|---|", f"| {fmt(m.get('oIoU'))} | {fmt(m.get('mIoU'))} | {fmt(m.get('Acc'))} |", ""]
    test = extra.get("test")
    if isinstance(test, dict) and isinstance(test.get("dmmi"), dict):
        m = test["dmmi"]
        lines += [f"## Test figures ({test.get('split', 'test')} split, DMMI protocol)", "",
                  "| oIoU | mIoU | Acc (zero-target) |", "|---|---|---|",
                  f"| {fmt(m.get('oIoU'))} | {fmt(m.get('mIoU'))} | {fmt(m.get('Acc'))} |", ""]
    elif converted and not isinstance(val, dict):
        lines += ["## Figures", "", "Not re-evaluated by dmmi: the authors publish theirs in the paper and their "
                  "repository (oIoU, mIoU, Acc per dataset).", ""]
    lines += ["## License", "", license_text(cfg, extra, converted, trained_on), ""]
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def license_text(cfg, extra: dict, converted: bool, trained_on: Optional[str]) -> str:
    """The card's License section: the license set, or why none is claimed and what the weights come from."""
    if extra.get("license"):
        return (f"`{extra['license']}`, as set by whoever saved these weights. The `dmmi` code is MIT-licensed; "
                "the training data keeps its own terms.")
    if converted:
        return ("Not known: the authors' release (their code and checkpoints) carries no license. Ask them before "
                "you redistribute these weights.")
    parts = ([f"`{cfg.model.backbone}`"] if cfg.model.backbone_weights else []) + (
        [f"`{source_name(cfg.model.text_encoder)}`"] if cfg.model.text_pretrained else [])
    start = f"start from the pretrained {' and '.join(parts)} weights and " if parts else ""
    return ("Not set by whoever trained it (`license=` of `dmmi.hub.save_pretrained` / `push_to_hub`, or "
            f"`dmmi.hub.update_card`, sets one). The weights {start}were trained on `{trained_on}`: "
            + ("their licenses and terms apply. " if parts else "its terms apply. ") + "The `dmmi` code is MIT-licensed.")
