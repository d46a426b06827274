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


def attention_head_dims(models: list[torch.nn.Module]) -> dict[int, int]:
    """Head dim -> number of diffusers `Attention` layers with it, over `models` (works on the
    meta device). SD 1.5's U-Net: 40, 80 and 160 (320, 640, 1280 channels over 8 heads)."""
    from diffusers.models.attention_processor import Attention

    dims: dict[int, int] = {}
    for model in models:
        for layer in model.modules():
            if isinstance(layer, Attention):
                dim = layer.inner_dim // layer.heads
                dims[dim] = dims.get(dim, 0) + 1
    return dict(sorted(dims.items()))


def sdpa_kernels(head_dims: list[int], dtype: torch.dtype, device: torch.device) -> dict[int, str]:
    """Head dim -> the SDPA kernel one call gets on `device` in `dtype`: "flash" when the call
    restricted to the flash backend runs, else "efficient" (memory-efficient) or "math". CUDA only
    ({} elsewhere): flash needs fp16/bf16 and a head dim it supports (<= 256, multiple of 8)."""
    if device.type != "cuda":
        return {}
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {}
    for dim in head_dims:
        q = torch.randn(1, 1, 64, dim, device=device, dtype=dtype)
        kernels[dim] = "math"
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, q, q)
            except RuntimeError:
                continue
            kernels[dim] = name
            break
    return kernels


def check_flash_kernels(models: list[torch.nn.Module], dtype: torch.dtype, device: torch.device) -> dict[int, str]:
    """One log line: each attention head dim of `models` and the SDPA kernel it gets in `dtype`."""
    dims = attention_head_dims(models)
    if device.type != "cuda":
        logger.info("SDPA flash-kernel check skipped on %s (head dims %s)", device.type, sorted(dims))
        return {}
    kernels = sdpa_kernels(list(dims), dtype, device)
    logger.info("SDPA kernels in %s: %s", str(dtype).removeprefix("torch."),
                ", ".join(f"head dim {d} ({dims[d]} layers): {k}" for d, k in kernels.items()))
    return kernels


def configure_attention(models: list[torch.nn.Module], backend: str, device: torch.device,
                        dtype: torch.dtype = torch.float32) -> str:
    """Set the attention processor of every diffusers model in `models`; returns the backend name.

    backend: "auto" (xformers if usable, else SDPA), "sdpa", or "xformers" (error if unusable).
    dtype: the compute dtype, for the SDPA flash-kernel check (one log line; skipped on CPU).
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
        check_flash_kernels(models, dtype, device)
    else:
        logger.info("attention backend: xformers memory_efficient_attention; %s", reason)
    return chosen
