"""ldm/diffusion.py against known answers: diffusers' DDPMScheduler, closed forms, round trips.

Notation as in the module: a = alpha_bar_t, x_t = sqrt(a) x_0 + sqrt(1 - a) eps (DDPM eq. 4),
v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho 2022). Every test runs on CPU in milliseconds.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from ldm import diffusion as D

B0, B1 = 0.00085, 0.012  # Stable Diffusion's beta_start / beta_end
F32 = dict(rtol=1e-5, atol=1e-6)  # float32 tolerance for comparisons against diffusers


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_alpha_bar(batch: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """(B,) alpha_bar values uniform in (0.01, 0.99)."""
    return 0.01 + 0.98 * torch.rand(batch, generator=_gen(seed), dtype=dtype)


def _pair(shape=(3, 4, 8, 8), seed: int = 0, dtype=torch.float32):
    """(x0, eps), each of `shape`: x0 deliberately not unit-variance so the two are told apart."""
    g = _gen(seed)
    x0 = 2.0 * torch.randn(shape, generator=g, dtype=dtype) + 0.5
    eps = torch.randn(shape, generator=g, dtype=dtype)
    return x0, eps


# ------------------------------------------------------------------------------- snr and gather
def test_snr_formula():
    a = torch.tensor([0.5, 0.8, 0.2, 0.01, 0.99], dtype=torch.float64)
    torch.testing.assert_close(D.snr(a), torch.tensor([1.0, 4.0, 0.25, 1 / 99, 99.0], dtype=torch.float64))
    # and its inverse a = snr / (1 + snr)
    s = D.snr(a)
    torch.testing.assert_close(s / (1 + s), a)


def _sd_alpha_bar() -> torch.Tensor:
    """(1000,) float64 alpha_bar of Stable Diffusion's schedule, from diffusers."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=B0,
                         beta_end=B1).alphas_cumprod.double()


def test_snr_decreases_along_schedule():
    a = _sd_alpha_bar()
    assert torch.all(D.snr(a).diff() < 0)


def test_gather_shapes_and_values():
    a = _sd_alpha_bar()
    t = torch.tensor([0, 999, 500, 500, 17])
    out = D.gather(a, t)
    assert out.shape == (5,)
    assert out.dtype == a.dtype
    assert out.device == t.device
    assert torch.equal(out, torch.stack([a[i] for i in t.tolist()]))
    assert D.gather(a, torch.tensor([3])).shape == (1,)
    assert D.gather(a, torch.zeros(0, dtype=torch.long)).shape == (0,)


# ------------------------------------------------------------------------------- forward process
@pytest.fixture(scope="module")
def sd_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=B0,
                         beta_end=B1)


@pytest.fixture(scope="module")
def sd_alpha_bar():
    return _sd_alpha_bar()


TIMESTEPS = torch.tensor([0, 1, 250, 999])


@pytest.mark.parametrize("ours_fn,theirs_name", [(D.add_noise, "add_noise"), (D.velocity, "get_velocity")])
def test_forward_process_matches_diffusers(sd_scheduler, sd_alpha_bar, ours_fn, theirs_name):
    x0, eps = _pair((4, 4, 8, 8))
    ours = ours_fn(x0, eps, D.gather(sd_alpha_bar, TIMESTEPS))
    ref = getattr(sd_scheduler, theirs_name)(x0, eps, TIMESTEPS)
    assert ours.shape == x0.shape and ours.dtype == x0.dtype
    torch.testing.assert_close(ours, ref, **F32)


def test_add_noise_closed_form_per_sample():
    """Each sample uses its own alpha_bar: x_t[i] = sqrt(a_i) x0[i] + sqrt(1 - a_i) eps[i]."""
    x0, eps = _pair(dtype=torch.float64)
    a = _random_alpha_bar(3)
    xt = D.add_noise(x0, eps, a)
    for i in range(3):
        torch.testing.assert_close(xt[i], a[i].sqrt() * x0[i] + (1 - a[i]).sqrt() * eps[i])


def test_add_noise_and_velocity_are_a_rotation():
    """(x_t, v) = R(phi) (x0, eps) with cos phi = sqrt(a): norms are preserved pointwise."""
    x0, eps = _pair(dtype=torch.float64)
    a = _random_alpha_bar(3)
    xt, v = D.add_noise(x0, eps, a), D.velocity(x0, eps, a)
    torch.testing.assert_close(xt**2 + v**2, x0**2 + eps**2)


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_target_then_invert_round_trips(prediction_type):
    x0, eps = _pair((8, 4, 8, 8), dtype=torch.float64)
    a = _random_alpha_bar(8, seed=1)
    xt = D.add_noise(x0, eps, a)
    target = D.training_target(prediction_type, x0, eps, a)
    x0_hat, eps_hat = D.to_x0_and_eps(prediction_type, target, xt, a)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-5)


def test_training_targets_known_answers():
    x0, eps = _pair(dtype=torch.float64)
    a = _random_alpha_bar(3)
    assert torch.equal(D.training_target("epsilon", x0, eps, a), eps)
    assert torch.equal(D.training_target("sample", x0, eps, a), x0)
    torch.testing.assert_close(D.training_target("v_prediction", x0, eps, a), D.velocity(x0, eps, a))


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_round_trip_in_float32(prediction_type):
    """float32 with a well-conditioned alpha_bar range: still close."""
    x0, eps = _pair((4, 4, 8, 8))
    a = torch.tensor([0.05, 0.3, 0.7, 0.95])
    xt = D.add_noise(x0, eps, a)
    x0_hat, eps_hat = D.to_x0_and_eps(prediction_type, D.training_target(prediction_type, x0, eps, a), xt, a)
    assert x0_hat.dtype == eps_hat.dtype == torch.float32
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)


def test_alpha_bar_dtype_follows_sample():
    """A float64 alpha_bar (from the schedule) does not promote a float32 batch."""
    x0, eps = _pair()
    a = _random_alpha_bar(3, dtype=torch.float64)
    assert D.add_noise(x0, eps, a).dtype == torch.float32
    assert D.velocity(x0, eps, a).dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in D.to_x0_and_eps("v_prediction", eps, x0, a))


@pytest.mark.parametrize("fn", ["training_target", "to_x0_and_eps"])
def test_unknown_prediction_type_raises(fn):
    x0, eps = _pair()
    with pytest.raises(ValueError, match="flow"):
        getattr(D, fn)("flow", x0, eps, _random_alpha_bar(3))


# ------------------------------------------------------------------------------- guidance
def _uncond_cond(shape=(2, 4, 8, 8)):
    g = _gen(3)
    return torch.randn(shape, generator=g), 1.5 * torch.randn(shape, generator=g) + 0.3


def test_cfg_scale_zero_is_uncond_exactly():
    uncond, cond = _uncond_cond()
    assert torch.equal(D.classifier_free_guidance(uncond, cond, 0.0), uncond)


def test_cfg_scale_one_is_cond():
    uncond, cond = _uncond_cond()
    torch.testing.assert_close(D.classifier_free_guidance(uncond, cond, 1.0), cond, rtol=0, atol=1e-6)


def test_cfg_is_linear_in_scale():
    uncond, cond = _uncond_cond()
    g = lambda s: D.classifier_free_guidance(uncond.double(), cond.double(), s)  # noqa: E731
    for s in (-1.0, 0.5, 2.0, 7.5):
        torch.testing.assert_close(g(s), uncond.double() + s * (cond.double() - uncond.double()))
        torch.testing.assert_close(g(s) - g(0.0), s * (g(1.0) - g(0.0)))
    torch.testing.assert_close(g(0.3 * 2.0 + 0.7 * 5.0), 0.3 * g(2.0) + 0.7 * g(5.0))


def test_cfg_guides_every_channel():
    """DiT's forward_with_cfg guided only 3 of 4 latent channels; check all four, one by one."""
    uncond, cond = _uncond_cond((2, 4, 8, 8))
    scale = 7.5
    out = D.classifier_free_guidance(uncond, cond, scale)
    assert out.shape == (2, 4, 8, 8)
    for c in range(4):
        expected = uncond[:, c] + scale * (cond[:, c] - uncond[:, c])
        torch.testing.assert_close(out[:, c], expected, msg=f"channel {c}")
        assert not torch.allclose(out[:, c], uncond[:, c]), f"channel {c} left unguided"
        assert not torch.allclose(out[:, c], cond[:, c]), f"channel {c} left as cond"


def test_rescale_zero_returns_input_unchanged():
    uncond, cond = _uncond_cond()
    guided = D.classifier_free_guidance(uncond, cond, 7.5)
    assert torch.equal(D.rescale_guidance(guided, cond, 0.0), guided)


def test_rescale_one_matches_cond_std_per_sample():
    uncond, cond = _uncond_cond((3, 4, 8, 8))
    cond = cond * torch.tensor([0.5, 1.0, 3.0]).view(3, 1, 1, 1)  # a different std per sample
    guided = D.classifier_free_guidance(uncond, cond, 7.5)
    out = D.rescale_guidance(guided, cond, 1.0)
    dims = (1, 2, 3)
    torch.testing.assert_close(out.std(dim=dims), cond.std(dim=dims), rtol=1e-5, atol=1e-6)
    # a per-sample rescaling of the guided prediction: direction kept
    ratio = out / guided
    torch.testing.assert_close(ratio, ratio[:, :1, :1, :1].expand_as(ratio), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(phi):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    uncond, cond = _uncond_cond((3, 4, 8, 8))
    guided = D.classifier_free_guidance(uncond, cond, 7.5)
    ref = rescale_noise_cfg(guided.clone(), cond.clone(), guidance_rescale=phi)
    torch.testing.assert_close(D.rescale_guidance(guided, cond, phi), ref, **F32)


# ------------------------------------------------------------------------------- purity
def _calls():
    x0, eps = _pair()
    a = _random_alpha_bar(3)
    alpha_bar = _sd_alpha_bar()
    t = torch.tensor([0, 50, 99])
    uncond, cond = _uncond_cond((3, 4, 8, 8))
    calls = [
        ("snr", (a,)),
        ("gather", (alpha_bar, t)),
        ("add_noise", (x0, eps, a)),
        ("velocity", (x0, eps, a)),
        ("classifier_free_guidance", (uncond, cond, 7.5)),
        ("rescale_guidance", (uncond, cond, 0.7)),
        ("rescale_guidance", (uncond, cond, 1.0)),
    ]
    for pt in D.PREDICTION_TYPES:
        calls.append(("training_target", (pt, x0, eps, a)))
        calls.append(("to_x0_and_eps", (pt, eps, x0, a)))
    return calls


@pytest.mark.parametrize("name,args", _calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_arguments_not_modified_in_place(name, args):
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    getattr(D, name)(*args)
    for i, (b, a) in enumerate(zip(before, args)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f"{name} changed argument {i}"
            assert a.dtype == b.dtype and a.shape == b.shape


# ---------------------------------------------------------------- min-SNR-gamma weighting
def test_min_snr_weight_against_the_formula():
    from ldm.diffusion import min_snr_weight

    snr_t = torch.tensor([0.01, 0.5, 1.0, 5.0, 20.0, 1000.0], dtype=torch.float64)
    gamma = 5.0
    expected_eps = torch.tensor([1.0, 1.0, 1.0, 1.0, 5 / 20, 5 / 1000], dtype=torch.float64)
    torch.testing.assert_close(min_snr_weight(snr_t, gamma, "epsilon"), expected_eps)
    torch.testing.assert_close(min_snr_weight(snr_t, gamma, "v_prediction"),
                               torch.minimum(snr_t, torch.tensor(gamma, dtype=torch.float64)) / (snr_t + 1))
    torch.testing.assert_close(min_snr_weight(snr_t, gamma, "sample"), torch.clamp(snr_t, max=gamma))
    # matches diffusers' compute_snr-based weighting used in its training examples
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 250, 999])
    theirs = compute_snr(sched, t)
    ours = D.snr(sched.alphas_cumprod[t])
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError):
        min_snr_weight(snr_t, gamma, "x0")


def test_timestep_bias_probabilities():
    from ldm.diffusion import timestep_probabilities

    uniform = timestep_probabilities(1000)
    torch.testing.assert_close(uniform, torch.full((1000,), 1e-3, dtype=torch.float64))
    later = timestep_probabilities(1000, "later", multiplier=5.0, portion=0.1)
    assert later.sum().item() == pytest.approx(1.0)
    # 100 timesteps at weight 5 against 900 at weight 1: the noisiest tenth gets 500/1400 of the draws
    assert later[900:].sum().item() == pytest.approx(500 / 1400)
    assert later[899].item() == pytest.approx(1 / 1400) and later[999].item() == pytest.approx(5 / 1400)
    earlier = timestep_probabilities(1000, "earlier", multiplier=5.0, portion=0.1)
    torch.testing.assert_close(earlier, later.flip(0))
    with pytest.raises(ValueError, match="strategy"):
        timestep_probabilities(1000, "middle")
    with pytest.raises(ValueError, match="portion"):
        timestep_probabilities(1000, "later", portion=0.0)


def test_annealed_timestep_bias_multiplier():
    from ldm.diffusion import annealed_multiplier

    assert annealed_multiplier(5.0, None, 1234, 2400) == 5.0  # no end: constant
    assert annealed_multiplier(5.0, 1.0, 0, 2400) == 5.0
    assert annealed_multiplier(5.0, 1.0, 2399, 2400) == 1.0  # the last step is uniform
    assert annealed_multiplier(5.0, 1.0, 1, 3) == pytest.approx(3.0)  # halfway
    assert annealed_multiplier(1.0, 5.0, 100, 201) == pytest.approx(3.0)  # either direction
    assert annealed_multiplier(5.0, 1.0, 0, 1) == 5.0  # one step: the start value
    with pytest.raises(ValueError, match="timestep_bias_end_multiplier"):
        from ldm.config import resolve_train_config

        resolve_train_config(["--timestep_bias_end_multiplier", "-1"])


# ------------------------------------------------------------------------------- objective extras
def test_snr_weights_are_computed_after_the_zero_terminal_snr_rescale():
    """The order kohya-ss/sd-scripts#1263 gets wrong: the alpha_bar the loop trains on (and takes
    SNR weights from) must be the rescaled one."""
    from ldm.diffusion import min_snr_weight, snr
    from ldm.models import build_noise_scheduler
    from ldm.presets import NoiseConfig
    from ldm.schedulers import training_scheduler

    base = build_noise_scheduler(NoiseConfig(prediction_type="v_prediction"))
    ztsnr = training_scheduler(base.config, zero_terminal_snr=True)
    assert ztsnr.config.timestep_spacing == "trailing"
    ab_before, ab_after = base.alphas_cumprod.double(), ztsnr.alphas_cumprod.double()
    assert ab_after[-1].item() < 1e-12 < ab_before[-1].item()
    t = torch.tensor([0, 250, 500, 750, 999])
    weights = min_snr_weight(snr(ab_after[t]), 5.0, "v_prediction")
    # known answers on the rescaled schedule: v weight = min(SNR, 5) / (SNR + 1); 0 at SNR = 0
    s = ab_after[t] / (1 - ab_after[t])
    torch.testing.assert_close(weights, torch.clamp(s, max=5.0) / (s + 1))
    assert weights[-1].item() == 0.0
    wrong = min_snr_weight(snr(ab_before[t]), 5.0, "v_prediction")  # weights before the rescale
    assert not torch.allclose(weights[2:], wrong[2:], rtol=1e-3)
    with pytest.raises(ValueError, match="v_prediction"):
        training_scheduler(base.config, prediction_type="epsilon", zero_terminal_snr=True)


def test_min_snr_epsilon_weight_is_one_at_zero_snr():
    from ldm.diffusion import min_snr_weight

    w = min_snr_weight(torch.tensor([0.0, 1.0, 5.0, 20.0]), 5.0, "epsilon")
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 1.0, 0.25]))


def test_offset_noise_adds_one_constant_per_sample_and_channel():
    from ldm.diffusion import offset_noise

    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert offset_noise(noise, 0.0) is noise
    out = offset_noise(noise, 0.1, generator=torch.Generator().manual_seed(1))
    shift = (out - noise)  # constant over H, W
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    expected = 0.1 * torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shift[:, :, :1, :1], expected)


def test_input_perturbation_changes_x_t_but_not_the_target():
    from ldm.diffusion import add_noise, perturb_noise, training_target

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a = torch.tensor([0.3, 0.9])
    perturbed = perturb_noise(noise, 0.1, generator=torch.Generator().manual_seed(5))
    extra = 0.1 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(perturbed, noise + extra)
    assert not torch.allclose(add_noise(x0, perturbed, a), add_noise(x0, noise, a))
    # the training loop builds x_t from `perturbed` and the target from `noise`
    torch.testing.assert_close(training_target("epsilon", x0, noise, a), noise)
    assert perturb_noise(noise, 0.0) is noise
