"""Using a first stage (diffusers `AutoencoderKL`) safely: half precision, tiling, and a fit check.

- Half precision. Stable Diffusion's VAE overflows float16 (activations past 65,504 in the
  decoder's residual stream give black or NaN images). `encode_images` / `decode_latents` run
  in float32 when the VAE's config says `force_upcast` and its weights are float16, and redo a
  non-finite result in float32 with a warning (once per VAE; later calls go straight to float32).
  What is still not finite in float32 raises FloatingPointError: never a NaN image or latent.
- Tiling and slicing (diffusers' `enable_tiling` / `enable_slicing`) bound the memory of large
  images and large batches: `configure_vae(vae, tiling=True, tile_size=..., slicing=True)`.
- A fit check: `reconstruction_psnr` measures how well the first stage reproduces a sample of
  the user's images, `first_stage_fit` words a warning below a threshold.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Callable, Iterator

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0  # the PSNR of identical images (MSE 0) is reported as this, not inf
TRAIN_VAE_COMMAND = ("accelerate launch --config_file accelerate_config.yaml training/train_vae.py "
                     "--train_data_dir {data} --output_dir {out}")

# VAEs that overflowed once in half precision: they run in float32 from then on (no second try).
_OVERFLOWED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


# ------------------------------------------------------------------ precision
def runs_in_float32(vae: AutoencoderKL) -> bool:
    """Whether encode/decode upcast this VAE: float16 weights and `force_upcast` in its config
    (diffusers' default, right for SD's VAE), or it already overflowed once here."""
    if vae.dtype == torch.float32:
        return False
    return vae in _OVERFLOWED or (vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False)))


@contextlib.contextmanager
def float32_weights(vae: AutoencoderKL) -> Iterator[None]:
    """The VAE's weights in float32 inside the block, back in their own dtype after it."""
    dtype = vae.dtype
    # nn.Module.to: diffusers' ModelMixin.to logs a keep-in-float32 warning on every dtype cast.
    torch.nn.Module.to(vae, torch.float32)
    try:
        yield
    finally:
        torch.nn.Module.to(vae, dtype)


def _finite_run(vae: AutoencoderKL, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                what: str) -> torch.Tensor:
    """fn(x) in the VAE's dtype, or in float32 (see `runs_in_float32`); a non-finite half-precision
    result is computed again in float32. Returns float32; raises FloatingPointError if not finite.
    x stays on its device (the VAE's, or one an offload hook moves it to)."""
    if runs_in_float32(vae):
        with float32_weights(vae):
            out = fn(x.float())
    else:
        out = fn(x.to(vae.dtype))
        if vae.dtype != torch.float32 and not torch.isfinite(out).all():
            if vae not in _OVERFLOWED:
                logger.warning("the VAE's %s in %s gave non-finite values (overflow); doing it in float32, as "
                               "for every later call with this VAE", what, str(vae.dtype).replace("torch.", ""))
            _OVERFLOWED.add(vae)
            with float32_weights(vae):
                out = fn(x.float())
    if not torch.isfinite(out).all():
        source = "its input is" if not torch.isfinite(x).all() else "the VAE's weights may be"
        raise FloatingPointError(f"the VAE's {what} is not finite ({int((~torch.isfinite(out)).sum())} of "
                                 f"{out.numel()} values) even in float32: {source} not finite")
    return out.float()


def encode_images(vae: AutoencoderKL, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
    """(B, 3, H, W) pixels in [-1, 1] -> q(z | x), float32 moments (B, 2C, H/f, W/f), before
    `scaling_factor`. Take `.mode()`, `.sample(generator)` or `.parameters` as usual."""
    moments = _finite_run(vae, lambda x: vae.encode(x).latent_dist.parameters, pixels, "encoding")
    return DiagonalGaussianDistribution(moments)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents in the VAE's own units (already divided by `scaling_factor`) ->
    (B, 3, h*f, w*f) float32 pixels, about [-1, 1] (not clamped)."""
    return _finite_run(vae, lambda z: vae.decode(z, return_dict=False)[0], latents, "decoding")


# ------------------------------------------------------------------ memory
def configure_vae(vae: AutoencoderKL, *, tiling: bool = False, slicing: bool = False,
                  tile_size: int | None = None) -> AutoencoderKL:
    """Tiled and/or sliced encode and decode (diffusers' AutoencoderKL does the work).

    tiling: images larger than `tile_size` pixels (default: the VAE config's `sample_size`, 512
        for SD) are encoded/decoded in overlapping tiles blended at the seams; memory then grows
        with the tile, not the image. Tiles see only their own GroupNorm statistics and attention
        context, so outputs differ slightly from untiled ones.
    slicing: a batch is encoded/decoded one image at a time (same result, lower peak memory).
    """
    vae.enable_tiling() if tiling else vae.disable_tiling()
    vae.enable_slicing() if slicing else vae.disable_slicing()
    if tile_size is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if tile_size < factor or tile_size % factor:
            raise ValueError(f"tile_size must be a positive multiple of the VAE's downsampling factor {factor}, "
                             f"got {tile_size}")
        # diffusers keeps the two sizes separately; they must agree or the seams are misplaced.
        vae.tile_sample_min_size = tile_size
        vae.tile_latent_min_size = tile_size // factor
    return vae


# ------------------------------------------------------------------ fit check
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, ...) images with pixels in [0, 1]: 10 log10(1 / MSE),
    capped at PSNR_CAP_DB (identical images)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (-10 * torch.log10(mse)).clamp(max=PSNR_CAP_DB)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 16, *,
                        moments: torch.Tensor | None = None) -> float:
    """Mean per-image PSNR (dB, pixels in [0, 1]) of D(mode of q(z | x)) against x.

    images: (N, 3, H, W) in [-1, 1], sides multiples of the VAE's downsampling; a few dozen
    images take seconds on a CPU for a small VAE.
    moments: (N, 2C, H/f, W/f), q(z | x)'s parameters of these images encoded already (a latent
    cache's): only the decoder runs, the encoder's share of the time is saved.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
    if moments is not None and (moments.ndim != 4 or moments.shape[0] != images.shape[0]):
        raise ValueError(f"moments must be (N, 2C, h, w) for the {images.shape[0]} images, got shape "
                         f"{tuple(moments.shape)}")
    scores = []
    for i, batch in enumerate(images.split(batch_size)):
        if moments is None:
            posterior = encode_images(vae, batch.to(vae.device))
        else:
            posterior = DiagonalGaussianDistribution(moments[i * batch_size : (i + 1) * batch_size].to(vae.device).float())
        recon = decode_latents(vae, posterior.mode()).clamp(-1, 1)
        scores.append(psnr((recon.cpu() + 1) / 2, (batch.float().cpu() + 1) / 2))
    return float(torch.cat(scores).mean())


def first_stage_fit(vae: AutoencoderKL, images: torch.Tensor, threshold_db: float = 25.0, *,
                    moments: torch.Tensor | None = None, data_dir: str = "DIR",
                    vae_dir: str = "outputs/vae") -> tuple[float, str | None]:
    """(PSNR, None) when the VAE reconstructs `images` at `threshold_db` or better, else (PSNR, a
    one-line warning naming the command that trains a VAE on this data). Generated images cannot be
    closer to the data than the first stage's reconstructions are. `moments`: as `reconstruction_psnr`."""
    value = reconstruction_psnr(vae, images, moments=moments)
    if value >= threshold_db:
        return value, None
    command = TRAIN_VAE_COMMAND.format(data=data_dir, out=vae_dir)
    return value, (f"the first stage reconstructs these images at {value:.1f} dB PSNR (below {threshold_db:g} dB): "
                   f"colours and details it loses, generated images lose too. Train a VAE on this data with "
                   f"`{command}` (add --pretrained_vae_name_or_path SRC to fine-tune an existing one), then "
                   f"train with --pretrained_vae_name_or_path {vae_dir}")
