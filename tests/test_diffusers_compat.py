"""Our folders load in diffusers' StableDiffusionPipeline and theirs in ours, with equal images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.text import build_clip_tokenizer
from pipelines import TextToImagePipeline

CALL = dict(num_inference_steps=10, guidance_scale=5.0, num_images_per_prompt=2, output_type="np")


def run(pipe, seed=0, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", generator=torch.Generator().manual_seed(seed), **{**CALL, **kw}).images


@pytest.fixture(scope="module")
def diffusers_sd_dir(tmp_path_factory):
    """A tiny Stable Diffusion folder written by diffusers' and transformers' own classes."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
                                in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32,
                                                intermediate_size=37, layer_norm_eps=1e-05,
                                                num_attention_heads=4, num_hidden_layers=5, pad_token_id=1,
                                                vocab_size=49408, max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    sd = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(77),
                                 unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd_by_diffusers")
    sd.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("sampler", ["dpm++", "ddim", "euler"])
def test_our_folder_loads_in_stable_diffusion_pipeline_with_equal_images(tiny_pipeline_dir, sampler):
    ours = TextToImagePipeline.from_pretrained(tiny_pipeline_dir).set_sampler(sampler)
    theirs = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    theirs.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    a, b = run(ours), run(theirs)
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() < 1e-4
    # and guidance rescale, which both implement (Lin et al. 2023)
    a, b = run(ours, guidance_rescale=0.7), run(theirs, guidance_rescale=0.7)
    assert np.abs(a - b).max() < 1e-4


def test_generic_diffusion_pipeline_loader_reads_our_folder(tiny_pipeline_dir):
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert isinstance(pipe, StableDiffusionPipeline)
    # vocab.json / merges.txt beside tokenizer.json, for tokenizer libraries that need them
    tok_dir = tiny_pipeline_dir / "tokenizer"
    assert (tok_dir / "vocab.json").exists() and (tok_dir / "merges.txt").exists()
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    assert CLIPTokenizer.from_pretrained(tok_dir)("a red circle").input_ids == [49406, 320, 736, 7117, 49407]


def test_a_diffusers_written_sd_folder_loads_in_ours_with_equal_images(diffusers_sd_dir):
    ours = TextToImagePipeline.from_pretrained(diffusers_sd_dir)
    theirs = StableDiffusionPipeline.from_pretrained(diffusers_sd_dir, safety_checker=None)
    assert isinstance(ours.scheduler, DDIMScheduler)
    a, b = run(ours, height=32, width=32), run(theirs, height=32, width=32)
    assert np.abs(a - b).max() < 1e-4
    assert not np.allclose(a[0], a[1])  # two different images, not a constant


def test_resaving_a_diffusers_folder_keeps_it_loadable(diffusers_sd_dir, tmp_path):
    ours = TextToImagePipeline.from_pretrained(diffusers_sd_dir)
    ours.save_pretrained(tmp_path)
    again = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    assert np.abs(run(ours, height=32, width=32) - run(again, height=32, width=32)).max() < 1e-4


def test_a_folder_saved_with_our_euler_a_names_diffusers_class(tiny_components, tmp_path):
    """Our NaN-safe Euler-ancestral is saved as diffusers' EulerAncestralDiscreteScheduler, so
    diffusers loads the folder, and loads back here as ours (equal images where diffusers' is finite)."""
    from conftest import make_pipeline
    from diffusers import EulerAncestralDiscreteScheduler

    from ldm.schedulers import EulerAncestralScheduler

    make_pipeline(tiny_components, "euler_a").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == [
        "diffusers", "EulerAncestralDiscreteScheduler"]
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EulerAncestralDiscreteScheduler"
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    assert type(theirs.scheduler) is EulerAncestralDiscreteScheduler
    ours = TextToImagePipeline.from_pretrained(tmp_path)
    assert type(ours.scheduler) is EulerAncestralScheduler
    # Another order of operations at sigma_max (~3e-4 relative on latents of ~27 in the first step;
    # later steps agree to ~1e-6): the same sampler, not bit-identical.
    assert np.abs(run(ours) - run(theirs)).max() < 1e-3
    assert np.isfinite(run(ours, num_inference_steps=3)).all()  # diffusers' class: all NaN (0.42)
