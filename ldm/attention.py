"""Memory-efficient attention: PyTorch SDPA by default, xformers only when its kernels really run.

`pip install xformers` can succeed and still fail at the first call (a wheel built for another
torch, no CUDA device, ...). We therefore run one tiny attention call before choosing it, and log
one line saying which backend is used and why.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def xformers_status(device: torch.device) -> tuple[bool, str]:
    """(usable, reason). Usable only if xformers imports and a real kernel call succeeds."""
    try:
        import xformers  # noqa: F401
        import xformers.ops as xops
    except Exception as exc:  # ImportError, or a broken binary raising anything at import
        return False, f"xformers is not importable ({type(exc).__name__}: {exc})".splitlines()[0]
    if device.type != "cuda":
        return False, f"xformers kernels need a CUDA device, this run is on {device.type}"
    try:
        q = torch.randn(1, 8, 1, 40, device=device, dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
    except Exception as exc:
        return False, f"xformers is installed but its kernels do not run here ({type(exc).__name__}: {exc})".splitlines()[0]
    return True, f"xformers {getattr(xformers, '__version__', '?')} kernels run on {device}"


def configure_attention(models: list[torch.nn.Module], backend: str, device: torch.device) -> str:
    """Set the attention processor of every diffusers model in `models`; returns the backend name.

    backend: "auto" (xformers if usable, else SDPA), "sdpa", or "xformers" (error if unusable).
    """
    if backend not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"unknown attention backend {backend!r}; use auto, sdpa or xformers")
    chosen, reason = "sdpa", "requested"
    if backend in ("auto", "xformers"):
        ok, why = xformers_status(device)
        if ok:
            chosen, reason = "xformers", why
        elif backend == "xformers":
            raise RuntimeError(f"--attention_backend xformers was requested but {why}")
        else:
            reason = why
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in models:  # diffusers ModelMixin with attention processors (UNet, VAE)
        if chosen == "xformers":
            model.enable_xformers_memory_efficient_attention()
        else:
            model.set_attn_processor(AttnProcessor2_0())
    if chosen == "sdpa":
        logger.info("attention backend: PyTorch SDPA (torch.nn.functional.scaled_dot_product_attention); "
                    "%s", reason)
    else:
        logger.info("attention backend: xformers memory_efficient_attention; %s", reason)
    return chosen
