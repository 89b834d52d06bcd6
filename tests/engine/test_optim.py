"""Parameter groups, AdamW construction and the polynomial schedule."""

import pytest
import torch
from torch import nn

from dmmi.config import TrainConfig
from dmmi.engine.optim import build_optimizer, param_groups, poly_scheduler
from dmmi.errors import DmmiError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)  # weight: decay; bias: no decay
        self.conv = nn.Conv2d(3, 8, 3)  # weight: decay; bias: no decay
        self.norm = nn.LayerNorm(8)  # both no decay
        self.bn = nn.BatchNorm2d(8)  # both no decay
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))  # 2-D, no decay (name)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 8))  # 3-D, no decay (name)
        self.embeddings = nn.Module()
        self.embeddings.position_embeddings = nn.Embedding(20, 8)  # 2-D, no decay (name)
        self.embeddings.word_embeddings = nn.Embedding(30, 8)  # 2-D: decay
        self.scale = nn.Parameter(torch.ones(8))  # 1-D: no decay
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.tied = self.proj  # shared module: its parameters must appear once


DECAYED = {"proj.weight", "conv.weight", "embeddings.word_embeddings.weight"}


def names_of(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_groups_partition_trainable_parameters():
    model = Tiny()
    groups = param_groups(model, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len({id(p) for p in flat})  # no parameter twice
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names_of(model, flat) == trainable  # every trainable parameter, no frozen one
    assert names_of(model, groups[0]["params"]) == DECAYED
    assert "frozen.weight" not in names_of(model, flat)


def test_empty_group_is_left_out():
    groups = param_groups(nn.LayerNorm(4), weight_decay=0.01)
    assert [g["name"] for g in groups] == ["no_decay"]


def test_build_optimizer_uses_config():
    cfg = TrainConfig(lr=1e-3, weight_decay=0.02)
    opt = build_optimizer(Tiny(), cfg, fused=True)  # all on CPU: the fused CPU kernel
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02, 0.0]
    assert all(g.get("fused") for g in opt.param_groups)
    assert not any(g.get("fused") for g in build_optimizer(Tiny(), cfg).param_groups)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(DmmiError, match="no trainable parameters"):
        build_optimizer(frozen, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_on_cuda():
    opt = build_optimizer(Tiny().cuda(), TrainConfig(), fused=True)
    assert all(g["fused"] for g in opt.param_groups)


def test_poly_factor_at_start_middle_end():
    total, power = 100, 0.9
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = poly_scheduler(opt, total_steps=total, power=power)
    lrs = {0: opt.param_groups[0]["lr"]}
    for step in range(1, total + 5):
        opt.step()
        sched.step()
        lrs[step] = opt.param_groups[0]["lr"]
    assert lrs[0] == pytest.approx(2.0)  # (1 - 0) ** 0.9 = 1
    assert lrs[50] == pytest.approx(2.0 * 0.5**0.9)  # (1 - 50/100) ** 0.9 = 0.5 ** 0.9 ~ 0.5359
    assert lrs[total] == 0.0  # (1 - 1) ** 0.9 = 0
    assert lrs[total + 4] == 0.0  # clamped, never negative or complex
    assert all(lrs[s + 1] <= lrs[s] for s in range(total + 4))


def test_poly_scheduler_rejects_no_steps():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(DmmiError, match="total_steps"):
        poly_scheduler(opt, total_steps=0, power=0.9)


def test_poly_scheduler_follows_budget_progress_when_further_along():
    """train.schedule=budget: the decay follows max(step / total, budget progress)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    spent = {"share": 0.0}
    sched = poly_scheduler(opt, total_steps=1000, power=1.0, progress=lambda step: spent["share"])
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    spent["share"] = 0.75  # three quarters of the time budget gone after 10 steps
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)  # not 1 - 10/1000
    spent["share"] = 0.0  # budget progress behind the step count: the steps decide
    for _ in range(490):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    spent["share"] = 1.7  # over budget: clamped at zero
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0


def test_train_config_rejects_unknown_schedule():
    with pytest.raises(DmmiError, match="train.schedule"):
        TrainConfig(schedule="cosine")


def test_text_encoder_gets_its_own_learning_rate():
    class WithText(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
            self.head = nn.Linear(3, 1)

    model = WithText()
    plain = param_groups(model, 0.01)
    assert [g["name"] for g in plain] == ["decay", "no_decay"] and all("lr" not in g for g in plain)
    groups = {g["name"]: g for g in param_groups(model, 0.01, text_lr=2e-5)}
    assert set(groups) == {"decay", "no_decay", "text_decay", "text_no_decay"}
    assert groups["text_decay"]["params"] == [model.text_encoder[0].weight]
    assert groups["text_decay"]["weight_decay"] == 0.01 and groups["text_no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["params"] == [model.head.weight] and groups["decay"]["weight_decay"] == 0.01
    opt = build_optimizer(model, TrainConfig(lr=1e-3, text_lr=2e-5))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"decay": 1e-3, "no_decay": 1e-3, "text_decay": 2e-5, "text_no_decay": 2e-5}
    sched = poly_scheduler(opt, total_steps=10, power=1.0)
    opt.step()
    sched.step()
    assert [round(g["lr"] / g["initial_lr"], 6) for g in opt.param_groups] == [0.9] * 4  # decays alike
    with pytest.raises(DmmiError, match="text_lr"):
        TrainConfig(text_lr=0.0)
