"""Presets build the documented architectures; attention backend selection; loading."""

from __future__ import annotations

import logging

import pytest
import torch
from accelerate import init_empty_weights

from ldm.attention import configure_attention, xformers_status
from ldm.models import build_components, build_unet, build_vae, count_parameters, load_pretrained
from ldm.presets import model_preset
from ldm.text import build_text_encoder


def test_sd15_preset_has_the_documented_parameter_counts():
    cfg = model_preset("sd15")
    with init_empty_weights():  # meta device: no memory, instant
        unet = build_unet(cfg.unet, in_channels=4, sample_size=64, cross_attention_dim=cfg.text.hidden_size)
        vae = build_vae(cfg.vae, 512)
        text = build_text_encoder(cfg.text)
    assert next(unet.parameters()).device.type == "meta"
    # Stable Diffusion 1.5: 859,520,964 / 83,653,863 / 123,060,480
    assert count_parameters(unet) == 859_520_964
    assert count_parameters(vae) == 83_653_863
    assert count_parameters(text) == 123_060_480
    assert unet.config.cross_attention_dim == 768
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert list(vae.config.block_out_channels) == [128, 256, 512, 512]
    assert cfg.vae.downsample_factor == 8 and cfg.resolution // cfg.vae.downsample_factor == 64


def test_tiny_preset_shapes(tiny_components):
    cfg = model_preset("tiny")
    c = tiny_components
    x = torch.randn(2, 3, cfg.resolution, cfg.resolution)
    with torch.no_grad():
        z = c.vae.encode(x).latent_dist.mean
        ctx = c.text_encoder(torch.full((2, cfg.text.max_length), 49407))[0]
        eps = c.unet(z, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
    side = cfg.resolution // cfg.vae.downsample_factor
    assert z.shape == (2, cfg.vae.latent_channels, side, side)
    assert ctx.shape == (2, cfg.text.max_length, cfg.text.hidden_size)
    assert eps.shape == z.shape
    assert c.tokenizer.model_max_length == cfg.text.max_length


def test_seeded_build_is_reproducible():
    a = build_components(model_preset("tiny"), seed=3).unet.state_dict()
    b = build_components(model_preset("tiny"), seed=3).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_pretrained_from_our_folder(tiny_components, tiny_pipeline_dir):
    loaded = load_pretrained(str(tiny_pipeline_dir))
    assert loaded.text_encoder_pretrained
    sd = tiny_components.unet.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in loaded.unet.state_dict().items())
    assert loaded.noise_scheduler.config.beta_schedule == tiny_components.noise_scheduler.config.beta_schedule
    assert loaded.noise_scheduler.config.prediction_type == tiny_components.noise_scheduler.config.prediction_type


def test_attention_falls_back_to_sdpa_with_one_clear_line(tiny_components, caplog):
    with caplog.at_level(logging.INFO, logger="ldm.attention"):
        chosen = configure_attention([tiny_components.unet, tiny_components.vae], "auto", torch.device("cpu"))
    assert chosen == "sdpa"
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(lines) == 1 and "SDPA" in lines[0]
    ok, reason = xformers_status(torch.device("cpu"))
    assert not ok and reason in lines[0]
    procs = {type(p).__name__ for p in tiny_components.unet.attn_processors.values()}
    assert procs == {"AttnProcessor2_0"}


def test_requesting_xformers_where_it_cannot_run_is_an_error(tiny_components):
    with pytest.raises(RuntimeError, match="xformers"):
        configure_attention([tiny_components.unet], "xformers", torch.device("cpu"))


@pytest.mark.gpu
def test_auto_attention_on_cuda_is_xformers_exactly_when_its_kernels_run(tiny_components, caplog):
    device = torch.device("cuda")
    usable, reason = xformers_status(device)
    with caplog.at_level(logging.INFO, logger="ldm.attention"):
        chosen = configure_attention([tiny_components.unet], "auto", device)
    assert chosen == ("xformers" if usable else "sdpa")
    procs = {type(p).__name__ for p in tiny_components.unet.attn_processors.values()}
    assert procs == ({"XFormersAttnProcessor"} if usable else {"AttnProcessor2_0"})
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0]
    assert ("xformers memory_efficient_attention" if usable else "PyTorch SDPA") in lines[0]
