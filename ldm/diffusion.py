"""Diffusion maths as small pure functions of tensors.

Notation (Ho et al. 2020, "DDPM"; Salimans & Ho 2022, "Progressive Distillation"):
    alpha_bar_t = prod_{s<=t} (1 - beta_s)
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps                    (DDPM eq. 4)
    v_t = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0                    (PD sec. 4)
    SNR(t) = alpha_bar_t / (1 - alpha_bar_t)
The schedules themselves (betas, alpha_bar, the zero-terminal-SNR rescale) are diffusers'
(`ldm.schedulers.training_scheduler`). Nothing here holds state, picks a device, or changes an
argument in place.
"""

from __future__ import annotations

import torch

from ldm.draws import randn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ------------------------------------------------------------------------------- SNR
def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021)."""
    return alpha_bar / (1.0 - alpha_bar)


# ------------------------------------------------------------------------------- forward process
def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in `like`'s dtype, for broadcasting against (B, C, H, W)."""
    return coef.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def gather(alpha_bar: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t for each sample: (T,), (B,) long -> (B,)."""
    return alpha_bar.to(timesteps.device)[timesteps]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x_0 + sqrt(1 - a) eps, with a = alpha_bar_t of shape (B,)."""
    a = _per_sample(alpha_bar_t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho 2022)."""
    a = _per_sample(alpha_bar_t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def training_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor,
                    alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output at x_t."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, alpha_bar_t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")


def to_x0_and_eps(prediction_type: str, model_output: torch.Tensor, x_t: torch.Tensor,
                  alpha_bar_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a prediction at x_t into (x_0, eps). Inverse of `add_noise` + `training_target`."""
    a = _per_sample(alpha_bar_t, x_t)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - s1a * eps) / sa, eps
    if prediction_type == "v_prediction":
        # x_0 = sqrt(a) x_t - sqrt(1-a) v ;  eps = sqrt(1-a) x_t + sqrt(a) v
        return sa * x_t - s1a * model_output, s1a * x_t + sa * model_output
    if prediction_type == "sample":
        x0 = model_output
        return x0, (x_t - sa * x0) / s1a
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 10) for an MSE on the given target.

    The x0-space weight min(SNR, gamma) expressed on the network's target:
    epsilon: min(SNR, gamma) / SNR;  v: min(SNR, gamma) / (SNR + 1);  x0: min(SNR, gamma).
    """
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":  # written as min(1, gamma / SNR): 1 (not 0/0) at SNR = 0
        return torch.clamp(gamma / snr_t, max=1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")


def offset_noise(noise: torch.Tensor, offset: float,
                 generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """eps + offset * n, with n ~ N(0, 1) of shape (B, C, 1, 1): one constant per sample and channel,
    so the model also learns to change an image's mean brightness (Guttenberg 2023, "Diffusion
    with offset noise"). This is the noise the model is trained on (its target uses it).
    `generator` may be a list, one per sample."""
    if offset == 0.0:
        return noise
    shape = noise.shape[:2] + (1,) * (noise.ndim - 2)
    return noise + offset * randn(shape, generator, noise.device, noise.dtype)


def perturb_noise(noise: torch.Tensor, strength: float,
                  generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """eps + strength * n, n ~ N(0, I): the noise used to build x_t under input perturbation
    (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias", eq. 9). The target is still
    computed from the unperturbed `noise`, which is what makes it a perturbation."""
    if strength == 0.0:
        return noise
    return noise + strength * randn(noise.shape, generator, noise.device, noise.dtype)


def timestep_probabilities(num_timesteps: int, strategy: str = "none", multiplier: float = 1.0,
                           portion: float = 0.25) -> torch.Tensor:
    """(T,) sampling probabilities of the training timesteps (diffusers' `timestep_bias_*` flags).

    "none": uniform. "later" / "earlier": the last / first `portion` of the timesteps (the noisiest /
    cleanest) get `multiplier` times the weight of the others. Layout is decided only at the
    noisiest timesteps, so "later" spends more of a short run where the prompt must say where.
    """
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    if strategy == "none":
        return weights / weights.sum()
    if strategy not in ("later", "earlier"):
        raise ValueError(f"timestep_bias_strategy must be none, later or earlier, got {strategy!r}")
    if not 0.0 < portion <= 1.0 or multiplier <= 0.0:
        raise ValueError("timestep_bias_portion must be in (0, 1] and timestep_bias_multiplier > 0, got "
                         f"{portion} and {multiplier}")
    count = max(1, round(portion * num_timesteps))
    if strategy == "later":
        weights[num_timesteps - count :] = multiplier
    else:
        weights[:count] = multiplier
    return weights / weights.sum()


def annealed_multiplier(start: float, end: float | None, step: int, total_steps: int) -> float:
    """The timestep-bias multiplier at optimizer step `step` of `total_steps`: `start` at step 0, moving
    linearly to `end` at the last step (`end` None or 0, as `--timestep_bias_end_multiplier`: `start`
    throughout). Annealing a "later" bias to 1 spends the start of a run on the noisiest timesteps
    (layout) and its end more evenly (detail)."""
    if not end or total_steps <= 1:
        return start
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * frac


# ------------------------------------------------------------------------------- guidance
def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + s (cond - uncond) over every channel (Ho & Salimans 2022, eq. 6).
    s = 0 gives the unconditional output, s = 1 the conditional one."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), eq. 15-16:
    match the per-sample std of the guided prediction to the conditional one, then mix by phi."""
    if rescale == 0.0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1.0 - rescale) * guided
