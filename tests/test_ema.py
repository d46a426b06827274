"""ldm/ema.py: the one-pass EMA update gives diffusers' EMAModel's weights bit for bit."""

import pytest
import torch
from diffusers.training_utils import EMAModel

from ldm.ema import TrainingEMA, lerp_is_exact, same_kind


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 8))
    model[2].bias.requires_grad_(False)  # a frozen parameter is copied, not averaged
    return model


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("decay", [0.9999, 0.9])
def test_training_ema_matches_diffusers_bit_for_bit(warmup, decay):
    model = _model(0)
    ours = TrainingEMA(model.parameters(), decay=decay, use_ema_warmup=warmup, foreach=True)
    theirs = EMAModel(model.parameters(), decay=decay, use_ema_warmup=warmup, foreach=True)
    gen = torch.Generator().manual_seed(1)
    for step in range(40):  # the warm-up's large weights (diffusers' formula) and small ones (lerp)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        ours.step(model.parameters())
        theirs.step(model.parameters())
        assert ours.optimization_step == theirs.optimization_step == step + 1
        assert ours.cur_decay_value == theirs.cur_decay_value
        assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, theirs.shadow_params)), step
    assert torch.equal(ours.shadow_params[-1], model[2].bias)  # the frozen one: a copy
    assert not torch.equal(ours.shadow_params[0], model[0].weight)  # an average, not a copy


def test_training_ema_takes_one_pass_once_lerp_is_exact(monkeypatch):
    model = _model(0)
    ema = TrainingEMA(model.parameters(), decay=0.9999, use_ema_warmup=True, foreach=True)
    for _ in range(2):  # weights 1 and 0.63: diffusers' two-pass step (lerp would round differently)
        ema.step(model.parameters())

    def no_temporary(*args, **kwargs):
        raise AssertionError("the two-pass update (a temporary copy of every parameter) ran")

    monkeypatch.setattr(torch, "_foreach_sub", no_temporary)
    ema.step(model.parameters())
    assert ema.optimization_step == 3 and 1 - ema.cur_decay_value < 0.5  # 0.48


def test_training_ema_state_loads_into_diffusers_and_back():
    model = _model(0)
    ours = TrainingEMA(model.parameters(), decay=0.99, use_ema_warmup=True, foreach=True)
    for _ in range(5):
        ours.step(model.parameters())
    theirs = EMAModel(_model(1).parameters(), decay=0.99, use_ema_warmup=True, foreach=True)
    theirs.load_state_dict(ours.state_dict())
    assert theirs.optimization_step == 5
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, theirs.shadow_params))


def test_lerp_is_exact_below_one_half_only():
    assert lerp_is_exact(0.4999) and lerp_is_exact(0.0)
    assert not lerp_is_exact(0.5) and not lerp_is_exact(1.0)


def test_same_kind_needs_matching_dtypes():
    a, b = [torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)]
    assert same_kind(a, [torch.ones(2)]) and not same_kind(a, b) and not same_kind(a, [])
