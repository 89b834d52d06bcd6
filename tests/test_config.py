import pytest

from dmmi.config import Config, load_config
from dmmi.errors import DmmiError


def test_preset_base_chain_and_overrides(tmp_path):
    cfg = load_config("ablation_no_multiscale")
    assert cfg.preset == "ablation_no_multiscale" and cfg.model.backbone == "swin_b" and not cfg.model.multi_scale
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("base: dmmi_swin_t\ntrain:\n  lr: 2.0e-5\n")
    cfg = load_config(str(yaml_file), ["train.batch_size=4", "model.depths=[1, 1, 1, 1]"])
    assert cfg.model.backbone == "swin_t" and cfg.train.lr == 2e-5 and cfg.train.batch_size == 4
    assert cfg.model.depths == [1, 1, 1, 1]


def test_values_are_coerced_to_the_field_types():
    cfg = load_config("dmmi_tiny", ["train.lr=1e-3", "train.epochs=3.0", "model.multi_scale=off",
                                    "train.max_minutes=5"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.model.multi_scale is False and cfg.train.max_minutes == 5.0


@pytest.mark.parametrize("overrides,message", [
    (["train.lr=abc"], "train.lr: expected a number"),
    (["train.nope=1"], "unknown field 'nope'"),
    (["model.backbone=vgg"], "unknown backbone 'vgg'"),
    (["train.lr"], "expected key=value"),
    (["model.multi_scale=maybe"], "expected true or false"),
])
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(DmmiError, match=message):
        load_config("dmmi_tiny", overrides)


def test_unknown_preset_and_round_trip(tmp_path):
    with pytest.raises(DmmiError, match="unknown preset 'dmmi_huge'; available: .*dmmi_swin_b"):
        load_config("dmmi_huge")
    cfg = load_config("dmmi_lite")
    cfg.save(tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again.to_dict() == cfg.to_dict()
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def _config_dataclasses():
    """Config, its sections, and any other dataclass dmmi.config defines (a new section is found too)."""
    import dataclasses
    import inspect

    import dmmi.config

    found = {obj for _, obj in inspect.getmembers(dmmi.config, inspect.isclass)
             if dataclasses.is_dataclass(obj) and obj.__module__ == "dmmi.config"}
    found |= {type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)
              if dataclasses.is_dataclass(getattr(Config(), f.name))}
    return sorted(found, key=lambda c: c.__name__)


def test_every_config_field_has_a_one_line_meaning():
    import dataclasses

    from dmmi.config import TrainConfig, field_help

    classes = _config_dataclasses()
    assert {c.__name__ for c in classes} >= {"Config", "ModelConfig", "LossConfig", "DataConfig", "TrainConfig",
                                             "EvalConfig"}
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
               if not str(f.metadata.get("help", "")).strip() or "\n" in f.metadata["help"]]
    assert not missing, f"config fields without a one-line meaning (field(metadata={{'help': ...}})): {missing}"
    assert field_help(Config, "train") and "learning rate" in field_help(TrainConfig, "lr")


def test_meanings_leave_the_defaults_as_they_were():
    from dmmi.config import DataConfig, LossConfig, ModelConfig, TrainConfig

    assert ModelConfig().backbone == "swin_b" and ModelConfig().depths is None and ModelConfig().drop_path == 0.3
    assert LossConfig().ce_weights == [0.9, 1.1] and LossConfig().ce_weights is not LossConfig().ce_weights
    assert DataConfig().val_split == "val" and TrainConfig().lr == 5e-5 and TrainConfig().output_dir == "runs/dmmi"
    assert Config().model is not Config().model and Config().preset == "custom"
