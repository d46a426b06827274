"""Samplers by name, all built from the training noise schedule's config (diffusers schedulers)."""

from __future__ import annotations

import warnings

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of one ancestral step sigma_from -> sigma_to (k-diffusion's
    `get_ancestral_step`, eta = 1): a deterministic step to sigma_down, then fresh noise of std
    sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2 and sigma_down = sigma_to^2 / sigma_from.

    Written in that closed form because the usual sqrt(sigma_to^2 - sigma_up^2) cancels
    catastrophically in float32 once (sigma_to / sigma_from)^2 is below float32's epsilon
    (1.2e-7): the cosine schedule's sigma_max is 2.0e4, and at 3 trailing steps its next sigma is
    1.75, a ratio^2 of 7.4e-9, so sigma_up rounds to just above sigma_to and the square root of
    -2.4e-7 is NaN (diffusers issue #14213)."""
    ratio = sigma_to / sigma_from
    sigma_down = sigma_to * ratio
    sigma_up = sigma_to * ((1 - ratio) * (1 + ratio)).clamp(min=0) ** 0.5
    return sigma_down, sigma_up


class EulerAncestralScheduler(EulerAncestralDiscreteScheduler):
    """diffusers' Euler-ancestral sampler (k-diffusion's `sample_euler_ancestral`) with the step
    sizes of `ancestral_step`, so a schedule that ends near zero SNR gives no NaN at few steps.
    Equal to diffusers' class up to float32 rounding wherever that one is finite; saved folders
    name diffusers' class (`diffusers_class`) so other diffusers code loads them."""

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma_from, sigma_to = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        sample = sample.to(torch.float32)  # as diffusers: the update in float32
        # x0 from the model output (Karras et al. 2022, Table 1 preconditioning; v: Salimans & Ho 2022).
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma_from * model_output
        elif self.config.prediction_type == "v_prediction":
            x0 = model_output * (-sigma_from / (sigma_from**2 + 1) ** 0.5) + sample / (sigma_from**2 + 1)
        else:
            raise ValueError(f"prediction_type {self.config.prediction_type!r} is not supported by euler_a; "
                             "use epsilon or v_prediction")
        sigma_down, sigma_up = ancestral_step(sigma_from, sigma_to)
        derivative = (sample - x0) / sigma_from  # dx/dsigma of the probability-flow ODE
        prev = sample + derivative * (sigma_down - sigma_from)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        prev = (prev + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def training_scheduler(config, *, prediction_type: str | None = None,
                       zero_terminal_snr: bool | None = None) -> DDPMScheduler:
    """The forward process the training loop draws x_t from, with the prediction type and
    zero-terminal-SNR rescale (Lin et al. 2023) applied to the schedule itself. The loop reads
    `alphas_cumprod` from the result, so SNR and min-SNR weights are computed after the rescale
    (the order kohya-ss/sd-scripts#1263 gets wrong). Rescaled schedules need trailing spacing at
    sampling time (the first sampler step is then t = T, where SNR = 0)."""
    overrides = {}
    if prediction_type and prediction_type != config.get("prediction_type"):
        overrides["prediction_type"] = prediction_type
    if zero_terminal_snr is not None and zero_terminal_snr != bool(config.get("rescale_betas_zero_snr")):
        overrides["rescale_betas_zero_snr"] = zero_terminal_snr
        if zero_terminal_snr:
            overrides["timestep_spacing"] = "trailing"
    scheduler = DDPMScheduler.from_config(config, **overrides)
    if scheduler.config.rescale_betas_zero_snr and scheduler.config.prediction_type == "epsilon":
        raise ValueError("zero terminal SNR needs --prediction_type v_prediction: at SNR = 0, x_T is pure noise "
                         "and an epsilon prediction says nothing about the image (Lin et al. 2023, sec. 3.2)")
    return scheduler


def make_sampler(name: str, config) -> SchedulerMixin:
    """A fresh scheduler of kind `name` with the same noise schedule and prediction type as
    `config` (any diffusers scheduler config). Schedulers hold per-run state, so build one per use."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    return cls.from_config(config, **extra)


def diffusers_class(scheduler: SchedulerMixin) -> type[SchedulerMixin]:
    """The diffusers class a scheduler is or extends: the name its saved folder gives."""
    return next(c for c in type(scheduler).__mro__ if c.__module__.startswith("diffusers."))


def with_fixes(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A diffusers scheduler loaded from a folder, as `make_sampler` would build it (diffusers'
    own Euler-ancestral becomes `EulerAncestralScheduler`); any other is returned unchanged."""
    if type(scheduler) is EulerAncestralDiscreteScheduler:
        return EulerAncestralScheduler.from_config(scheduler.config)
    return scheduler


def set_timesteps(scheduler: SchedulerMixin, num_inference_steps: int, device: torch.device | str | None) -> None:
    """`scheduler.set_timesteps`, without the DeprecationWarning numpy >= 2 raises on every call
    for diffusers' Euler-ancestral and DPM-Solver: their `set_timesteps` call `np.array(tensor)`
    and torch's `Tensor.__array__(dtype=None)` takes no `copy` argument. Only that warning is
    silenced, only here; the values are unchanged."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        scheduler.set_timesteps(num_inference_steps, device=device)
