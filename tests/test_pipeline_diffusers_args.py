"""The arguments a diffusers user knows from StableDiffusionPipeline give diffusers' images in
TextToImagePipeline: prompt_embeds / negative_prompt_embeds, clip_skip, cross_attention_kwargs
(the LoRA scale), timesteps / sigmas, from_single_file and load_textual_inversion. Each is run on
the same tiny folder and seed by both pipelines."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
from test_export import tiny_without_text_time

from conftest import make_pipeline
from ldm.lora import add_lora, save_lora, trainable_parameters
from ldm.models import build_components
from ldm.text import tokenize
from pipelines import TextToImagePipeline

PROMPT = "a red circle"
TOL = dict(rtol=0, atol=1e-4)


def run(pipe, prompt=PROMPT, seed=0, **kw):
    pipe.set_progress_bar_config(disable=True)
    args = dict(num_inference_steps=3, guidance_scale=4.0, output_type="pt",
                generator=torch.Generator().manual_seed(seed))
    if prompt is not None:  # None: no prompt argument at all (prompt_embeds alone, as compel calls it)
        args["prompt"] = prompt
    return pipe(**{**args, **kw}).images


def pair(folder, sampler: str | None = None):
    """Ours and diffusers' pipeline on one folder, with the same sampler."""
    ours = TextToImagePipeline.from_pretrained(folder)
    if sampler:
        ours.set_sampler(sampler)
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    theirs.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    return ours, theirs


# ---------------------------------------------------------------------- prompt embeddings
def test_prompt_embeds_give_diffusers_images_and_the_prompts_own(tiny_pipeline_dir):
    ours, theirs = pair(tiny_pipeline_dir)
    with torch.no_grad():
        text = ours.encode_prompt([PROMPT], ours.device)
        empty = ours.encode_prompt([""], ours.device)
    assert text.shape == (1, 32, 64)  # the tiny preset: 32 tokens of width 64
    # the prompt's own embeddings give the prompt's images
    torch.testing.assert_close(run(ours, None, prompt_embeds=text), run(ours), rtol=0, atol=0)
    # weighted embeddings, as compel passes them: diffusers' images, with and without a negative
    weighted, negative = 1.5 * text, 0.5 * empty + 0.1
    a = run(ours, None, prompt_embeds=weighted, negative_prompt_embeds=negative, num_images_per_prompt=2)
    b = run(theirs, None, prompt_embeds=weighted, negative_prompt_embeds=negative, num_images_per_prompt=2)
    torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(run(ours, None, prompt_embeds=weighted), run(theirs, None, prompt_embeds=weighted),
                               **TOL)
    assert (a[0] - run(ours)[0]).abs().max() > 1e-2  # the weighting changes the image


@pytest.mark.parametrize("kw, message", [
    (dict(prompt_embeds=torch.zeros(1, 32, 64)), "either prompt or prompt_embeds"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 32, 16)), r"shape \(prompts, tokens, 64\).*got \(1, 32, 16\)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(2, 32, 64), negative_prompt_embeds=torch.zeros(1, 32, 64)),
     "negative_prompt_embeds hold 1 prompts, for 2 prompts"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 30, 64)), "same number of tokens, got prompt_embeds 30, the tokenizer's 32"),
    (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 32, 64)), "negative_prompt or negative_prompt_embeds"),
    (dict(clip_skip=2), r"clip_skip must be an integer from 0 to 1 \(the text encoder has 2 layers\), got 2"),
    (dict(clip_skip=-1), "clip_skip must be an integer"),
    (dict(cross_attention_kwargs={"scale": float("nan")}), r"cross_attention_kwargs\['scale'\] must be a finite"),
    (dict(cross_attention_kwargs=0.5), "cross_attention_kwargs must be a dict"),
])
def test_bad_new_arguments_are_value_errors_naming_them(tiny_pipe, kw, message):
    args = dict(prompt=PROMPT, num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match=message):
        tiny_pipe(**{**args, **kw})


# ---------------------------------------------------------------------- clip_skip
def test_clip_skip_gives_diffusers_images(tiny_pipeline_dir):
    """diffusers 0.42 reads `text_encoder.text_model.final_layer_norm`, which transformers 5's
    CLIPTextModel no longer has (its layers sit on the model itself): the alias below lets diffusers'
    own clip_skip path run for the prompt. diffusers encodes the negative prompt without clip_skip;
    we skip the same layers for both, so the negative is given to diffusers computed by hand."""
    ours, theirs = pair(tiny_pipeline_dir)
    te = theirs.text_encoder
    object.__setattr__(te, "text_model", te)  # not a submodule: state_dict and .to() are unchanged
    with torch.no_grad():
        hidden = te(tokenize(theirs.tokenizer, [""]), output_hidden_states=True).hidden_states
        negative = te.final_layer_norm(hidden[-2])  # one layer skipped, then the final layer norm
    a = run(ours, clip_skip=1)
    torch.testing.assert_close(a, run(theirs, clip_skip=1, negative_prompt_embeds=negative), **TOL)
    assert (a - run(ours)).abs().max() > 1e-2  # another layer, other images
    torch.testing.assert_close(run(ours, clip_skip=0), run(ours), rtol=0, atol=1e-6)  # 0: the last layer


# ---------------------------------------------------------------------- LoRA scale
@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory):
    """A base pipeline folder and a LoRA folder (U-Net and text encoder adapters with values)."""
    root = tmp_path_factory.mktemp("lora_scale")
    c = build_components(tiny_without_text_time(), seed=0)
    pipe = make_pipeline(c, "ddim")
    pipe.save_pretrained(root / "base")
    add_lora(pipe.unet, rank=4, alpha=4)
    add_lora(pipe.text_encoder, rank=4, alpha=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable_parameters(pipe.unet) + trainable_parameters(pipe.text_encoder):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_lora(root / "lora", pipe.unet, pipe.text_encoder, info={"rank": 4, "alpha": 4})
    return root / "base", root / "lora"


def test_cross_attention_kwargs_scale_the_lora_as_diffusers_does(lora_folders):
    base_dir, lora_dir = lora_folders
    ours, theirs = pair(base_dir)
    base = run(ours)
    for pipe in (ours, theirs):
        pipe.load_lora_weights(str(lora_dir))
    full = run(ours)
    half = run(ours, cross_attention_kwargs={"scale": 0.5})
    torch.testing.assert_close(half, run(theirs, cross_attention_kwargs={"scale": 0.5}), **TOL)
    torch.testing.assert_close(run(ours, cross_attention_kwargs={"scale": 0.0}), base, **TOL)  # scale 0: no LoRA
    assert (half - full).abs().max() > 1e-2 and (half - base).abs().max() > 1e-2
    torch.testing.assert_close(run(ours), full, rtol=0, atol=0)  # the scale is undone after the call


# ---------------------------------------------------------------------- custom schedules
@pytest.mark.parametrize("kw", [dict(timesteps=[999, 700, 400, 100]), dict(sigmas=[14.0, 4.0, 1.0, 0.2])])
def test_custom_timesteps_and_sigmas_give_diffusers_images(tiny_pipeline_dir, kw):
    ours, theirs = pair(tiny_pipeline_dir, "euler")
    a = run(ours, **kw)
    torch.testing.assert_close(a, run(theirs, **kw), **TOL)
    assert (a - run(ours, num_inference_steps=4)).abs().max() > 1e-3  # not the default 4-step schedule


def test_a_sampler_without_custom_schedules_is_named(tiny_pipeline_dir):
    ours = TextToImagePipeline.from_pretrained(tiny_pipeline_dir).set_sampler("ddim")
    with pytest.raises(ValueError, match="DDIMScheduler.*does not support custom timestep"):
        run(ours, timesteps=[999, 500])


# ---------------------------------------------------------------------- loaders
def test_from_single_file_round_trips_the_export(tmp_path):
    from training.export import main

    c = build_components(tiny_without_text_time(), seed=0)
    folder, out = tmp_path / "pipe", tmp_path / "model.safetensors"
    original = make_pipeline(c, "ddim")
    original.save_pretrained(folder)
    main(["--pipeline", str(folder), "--single_file", str(out)])
    ours = TextToImagePipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    theirs = StableDiffusionPipeline.from_single_file(str(out), config=str(folder), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    assert type(ours) is TextToImagePipeline
    a = run(ours)
    torch.testing.assert_close(a, run(theirs), rtol=0, atol=0)
    torch.testing.assert_close(a, run(original), rtol=0, atol=0)


def test_load_textual_inversion_gives_diffusers_images(tiny_pipeline_dir, tmp_path):
    """diffusers' TextualInversionLoaderMixin works with transformers 5: single and multi-vector
    embeddings in diffusers' safetensors layout ({token: (D,) or (n, D)})."""
    g = torch.Generator().manual_seed(3)
    one, two = torch.randn(64, generator=g), torch.randn(2, 64, generator=g)
    save_file({"<sparkle>": one}, str(tmp_path / "one.safetensors"))
    save_file({"<duo>": two}, str(tmp_path / "two.safetensors"))
    ours, theirs = pair(tiny_pipeline_dir)
    before = run(ours, "a <sparkle> <duo> circle")
    for pipe in (ours, theirs):
        pipe.load_textual_inversion(str(tmp_path / "one.safetensors"))
        pipe.load_textual_inversion(str(tmp_path / "two.safetensors"))
    assert ours.tokenizer.convert_tokens_to_ids(["<sparkle>", "<duo>", "<duo>_1"]) == [49408, 49409, 49410]
    table = ours.text_encoder.get_input_embeddings().weight
    assert table.shape == (49411, 64)
    torch.testing.assert_close(table[49408:], torch.cat([one[None], two]), rtol=0, atol=0)
    a = run(ours, "a <sparkle> <duo> circle")
    torch.testing.assert_close(a, run(theirs, "a <sparkle> <duo> circle"), **TOL)
    assert (a - before).abs().max() > 1e-2  # the new tokens carry their vectors
