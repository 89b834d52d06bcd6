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
