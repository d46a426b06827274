"""Per-sample random draws: a sample's draws depend on (seed, step, index) only."""

import torch

from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from ldm.draws import categorical, randn, sample_generators, sample_posterior, sample_seed, to_device
from ldm.text import drop_captions


def draws(seed, step, indices):
    gens = sample_generators(seed, step, indices)
    return randn((len(indices), 4, 3, 3), gens), categorical(torch.tensor([0.2, 0.3, 0.5]), gens)


def test_a_sample_draws_the_same_in_any_batch():
    whole = draws(0, 7, [5, 9, 2, 11])
    halves = [draws(0, 7, [5, 9]), draws(0, 7, [2, 11])]
    for k in range(2):
        torch.testing.assert_close(torch.cat([h[k] for h in halves]), whole[k], rtol=0, atol=0)
    alone = draws(0, 7, [2])
    torch.testing.assert_close(alone[0][0], whole[0][2], rtol=0, atol=0)


def test_draws_change_with_seed_step_and_index():
    base = draws(0, 7, [5])[0]
    for other in (draws(1, 7, [5]), draws(0, 8, [5]), draws(0, 7, [6])):
        assert not torch.equal(other[0], base)
    assert len({sample_seed(0, s, i) for s in range(50) for i in range(50)}) == 2500


def test_categorical_follows_the_probabilities():
    gens = sample_generators(0, 0, range(20000))
    counts = torch.bincount(categorical(torch.tensor([0.1, 0.2, 0.7]), gens), minlength=3).double() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), atol=0.015, rtol=0)


def test_randn_is_standard_normal_and_checks_the_batch():
    x = randn((4000, 8), sample_generators(3, 0, range(4000)))
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02
    try:
        randn((3, 8), sample_generators(3, 0, range(2)))
    except ValueError as e:
        assert "2 generators for a batch of 3" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_caption_dropout_per_sample_generators():
    caps = [f"c{i}" for i in range(400)]
    out = drop_captions(caps, 0.25, sample_generators(0, 1, range(400)))
    assert 0.18 < out.count("") / 400 < 0.32
    part = drop_captions(caps[100:200], 0.25, sample_generators(0, 1, range(100, 200)))
    assert part == out[100:200]


def test_randn_equals_diffusers_randn_tensor_for_every_kind_of_generator():
    shape = (3, 2, 4, 4)
    for gen in (lambda: sample_generators(0, 1, [4, 8, 15]), lambda: torch.Generator().manual_seed(3), lambda: None):
        torch.manual_seed(9)
        ours = randn(shape, gen(), "cpu", torch.float64)
        torch.manual_seed(9)
        theirs = randn_tensor(shape, generator=gen(), device=torch.device("cpu"), dtype=torch.float64)
        assert ours.dtype == torch.float64 and torch.equal(ours, theirs)


def test_sample_posterior_equals_diffusers_sample():
    moments = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    posterior = DiagonalGaussianDistribution(moments)
    ours = sample_posterior(posterior, sample_generators(0, 2, [1, 2, 3]))
    theirs = posterior.sample(generator=sample_generators(0, 2, [1, 2, 3]))
    assert torch.equal(ours, theirs) and not torch.equal(ours, posterior.mean)


def test_to_device_copies_to_the_cpu_as_to_does():
    x = torch.arange(6.0).reshape(2, 3)
    y = to_device(x, "cpu")
    assert torch.equal(y, x) and y.device.type == "cpu"
    assert to_device(x, torch.device("meta")).device.type == "meta"
