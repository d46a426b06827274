"""Samplers by name, all built from the training noise schedule's config (diffusers schedulers)."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
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
