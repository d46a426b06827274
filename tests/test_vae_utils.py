"""ldm.vae_utils: float16 overflow fallback, force_upcast, tiling and slicing, PSNR and the fit check."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from ldm.models import build_vae
from ldm.presets import model_preset
from ldm.synthetic import make_examples
from ldm.vae_utils import (PSNR_CAP_DB, configure_vae, decode_latents, encode_images, first_stage_fit, psnr,
                           reconstruction_psnr)


def tiny_vae(seed: int = 0, force_upcast: bool = False):
    torch.manual_seed(seed)
    vae = build_vae(model_preset("tiny").vae, sample_size=32).eval()
    vae.register_to_config(force_upcast=force_upcast)
    return vae


def overflowing(vae, part: str):
    """SD's failure mode: a large residual stream (here a bias of 60,000 after conv_in) is finite in
    float32 and normalised away by the last GroupNorm, but passes float16's 65,504 on the way."""
    getattr(vae, part).conv_in.bias.data.fill_(6e4)
    return vae


def half(vae):
    return torch.nn.Module.to(vae, torch.float16)


def rounded(vae):
    """The float32 VAE that a float16 copy becomes when upcast: its weights rounded to float16."""
    return torch.nn.Module.to(half(vae), torch.float32)


def smooth_images(n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: sinusoids, a different phase per image."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    w = 2 * math.pi / 24
    return torch.stack([torch.stack([torch.sin(w * xx + k), torch.cos(w * yy - k), torch.sin(w * (xx + yy) / 2 + k)])
                        for k in range(n)]) * 0.8


def shapes(n: int, resolution: int = 32) -> torch.Tensor:
    images, _ = make_examples(n, resolution, seed=0)
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


# ---------------------------------------------------------------- half precision
@torch.no_grad()
def test_float16_overflow_in_decoding_is_redone_in_float32_with_one_warning(caplog):
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = rounded(overflowing(tiny_vae(), "decoder")).decode(z).sample
    vae = half(overflowing(tiny_vae(), "decoder"))
    assert not torch.isfinite(vae.decode(z.half()).sample).all()  # the setup does overflow
    with caplog.at_level(logging.WARNING, logger="ldm.vae_utils"):
        out = decode_latents(vae, z)
        again = decode_latents(vae, z)
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, reference, atol=1e-5, rtol=1e-5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "decoding in float16 gave non-finite values" in warnings[0]
    assert vae.dtype == torch.float16  # the weights go back to the user's dtype


@torch.no_grad()
def test_float16_overflow_in_encoding_is_redone_in_float32(caplog):
    x = smooth_images(2, 32)
    reference = rounded(overflowing(tiny_vae(), "encoder")).encode(x).latent_dist.parameters
    vae = half(overflowing(tiny_vae(), "encoder"))
    assert not torch.isfinite(vae.encode(x.half()).latent_dist.parameters).all()
    with caplog.at_level(logging.WARNING, logger="ldm.vae_utils"):
        posterior = encode_images(vae, x)
    torch.testing.assert_close(posterior.parameters, reference, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(posterior.mode()).all()
    assert any("encoding in float16 gave non-finite" in r.getMessage() for r in caplog.records)


@torch.no_grad()
def test_a_decoder_that_returns_inf_once_is_retried(monkeypatch, caplog):
    vae = half(tiny_vae(seed=1))
    real = vae.decoder.forward
    calls = []

    def first_call_inf(z, *args, **kwargs):
        calls.append(z.dtype)
        out = real(z, *args, **kwargs)
        return torch.full_like(out, float("inf")) if len(calls) == 1 else out

    monkeypatch.setattr(vae.decoder, "forward", first_call_inf)
    with caplog.at_level(logging.WARNING, logger="ldm.vae_utils"):
        out = decode_latents(vae, torch.zeros(1, 4, 8, 8))
    assert calls == [torch.float16, torch.float32] and torch.isfinite(out).all()
    assert any("non-finite" in r.getMessage() for r in caplog.records)


@torch.no_grad()
def test_force_upcast_decodes_in_float32_without_a_warning(caplog):
    vae = half(tiny_vae(force_upcast=True))
    seen = []
    vae.decoder.register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, module.conv_in.weight.dtype)))
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="ldm.vae_utils"):
        out = decode_latents(vae, z)
    assert seen == [(torch.float32, torch.float32)] and out.dtype == torch.float32
    assert vae.dtype == torch.float16 and not caplog.records
    torch.testing.assert_close(out, rounded(tiny_vae(force_upcast=True)).decode(z).sample, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_float32_vae_is_left_as_it_is_and_non_finite_output_raises():
    vae = tiny_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decode_latents(vae, z), vae.decode(z).sample, atol=0, rtol=0)
    with pytest.raises(FloatingPointError, match="decoding is not finite .* even in float32: its input"):
        decode_latents(vae, torch.full_like(z, float("nan")))
    vae.decoder.conv_out.bias.data.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="the VAE's weights may be not finite"):
        decode_latents(vae, z)


# ---------------------------------------------------------------- tiling and slicing
@torch.no_grad()
def test_tiled_decode_and_encode_match_untiled_within_tolerance():
    """128 px through 64 px tiles (3 x 3, overlapping by a quarter). Each tile has its own GroupNorm
    statistics and attention context, so the match is close, not exact (a random-weight VAE, the
    least forgiving case: 24.5 dB decoding, 7% mean latent difference when measured)."""
    vae = tiny_vae()
    x = smooth_images(1, 128)
    z = vae.encode(x).latent_dist.mode()
    plain = vae.decode(z).sample
    tiles = []
    vae.decoder.register_forward_pre_hook(lambda module, args: tiles.append(tuple(args[0].shape[-2:])))
    configure_vae(vae, tiling=True, tile_size=64)
    tiled = vae.decode(z).sample
    assert tiles == [(32, 32), (32, 32), (32, 16)] * 2 + [(16, 32), (16, 32), (16, 16)]  # it did tile
    assert tiled.shape == plain.shape
    assert float(psnr((tiled.clamp(-1, 1) + 1) / 2, (plain.clamp(-1, 1) + 1) / 2)) > 21.0
    z_tiled = vae.encode(x).latent_dist.mode()
    assert z_tiled.shape == z.shape
    assert float((z_tiled - z).abs().mean() / z.abs().mean()) < 0.15
    configure_vae(vae, tiling=False)
    torch.testing.assert_close(vae.decode(z).sample, plain, atol=0, rtol=0)


@torch.no_grad()
def test_tiling_below_the_tile_size_changes_nothing():
    vae = tiny_vae()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = vae.decode(z).sample
    configure_vae(vae, tiling=True, tile_size=32)
    torch.testing.assert_close(vae.decode(z).sample, plain, atol=0, rtol=0)


@torch.no_grad()
def test_sliced_encode_and_decode_match_batched():
    vae = tiny_vae()
    x = smooth_images(3, 32)
    moments = vae.encode(x).latent_dist.parameters
    decoded = vae.decode(moments[:, :4]).sample
    configure_vae(vae, slicing=True)
    torch.testing.assert_close(encode_images(vae, x).parameters, moments, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_latents(vae, moments[:, :4]), decoded, atol=1e-5, rtol=1e-5)


def test_tile_size_must_fit_the_downsampling():
    with pytest.raises(ValueError, match="tile_size must be a positive multiple of the VAE's downsampling factor 2"):
        configure_vae(tiny_vae(), tiling=True, tile_size=33)


# ---------------------------------------------------------------- PSNR and the fit check
def test_psnr_of_identical_images_is_capped():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert psnr(x, x).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]


def test_psnr_of_known_noise_is_the_closed_form():
    """x + d * (random signs): MSE = d^2 exactly, so PSNR = 20 log10(1 / d)."""
    g = torch.Generator().manual_seed(0)
    x = torch.full((3, 3, 16, 16), 0.5)
    signs = torch.randint(0, 2, x.shape, generator=g) * 2 - 1
    for d in (0.1, 0.01, 1 / 255):
        expected = 20 * math.log10(1 / d)
        torch.testing.assert_close(psnr(x + d * signs, x), torch.full((3,), expected), atol=1e-3, rtol=0)


def test_a_random_vae_fails_the_fit_check_and_names_the_command():
    value, message = first_stage_fit(tiny_vae(), smooth_images(4, 32), threshold_db=25.0, data_dir="my_photos")
    assert value < 25.0
    assert message is not None and f"{value:.1f} dB" in message
    assert ("accelerate launch --config_file accelerate_config.yaml training/train_vae.py "
            "--train_data_dir my_photos --output_dir outputs/vae") in message
    assert "--pretrained_vae_name_or_path outputs/vae" in message


def test_the_shipped_vae_fits_the_built_in_shapes():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_preset("tiny").pretrained_vae).eval()
    images = shapes(24)
    value, message = first_stage_fit(vae, images, threshold_db=25.0)
    assert message is None and 25.0 <= value < PSNR_CAP_DB
    assert reconstruction_psnr(vae, images, batch_size=5) == pytest.approx(value, abs=1e-3)


def test_psnr_from_cached_moments_decodes_only_and_matches_encoding():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_preset("tiny").pretrained_vae).eval()
    images = shapes(12)
    with torch.no_grad():
        moments = vae.encode(images).latent_dist.parameters  # what a latent cache holds, one batch
    fresh = reconstruction_psnr(vae, images, batch_size=5)
    calls = []
    vae.encode = lambda *args, **kwargs: calls.append(1)  # the cached path never encodes
    assert reconstruction_psnr(vae, images, batch_size=5, moments=moments) == pytest.approx(fresh, abs=1e-3)
    assert first_stage_fit(vae, images, moments=moments)[0] == pytest.approx(fresh, abs=1e-3) and not calls
    # another image's posterior gives another score: the moments are used, row by row
    assert reconstruction_psnr(vae, images, moments=moments.roll(1, 0)) < fresh - 1
    with pytest.raises(ValueError, match="moments must be"):
        reconstruction_psnr(vae, images, moments=moments[:5])
