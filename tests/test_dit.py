"""The transformer denoiser (DiT, --preset tiny-dit / dit-b2): diffusers' PixArtTransformer2DModel
trained and sampled by the same toolkit as the U-Net."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel

from ldm.config import TrainConfig
from ldm.config_checks import model_downsampling
from ldm.lora import add_lora, save_lora
from ldm.models import build_components, build_transformer, count_parameters, denoise, load_pretrained
from ldm.presets import DiTConfig, model_preset
from ldm.schedulers import make_sampler
from pipelines import TextToImagePipeline


@pytest.fixture(scope="module")
def dit_components():
    return build_components(model_preset("tiny-dit"), seed=0)


def dit_pipeline(comps, transformer=None) -> TextToImagePipeline:
    pipe = TextToImagePipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=None,
                               transformer=transformer or comps.transformer,
                               scheduler=make_sampler("ddim", comps.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, prompt, **kw) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return pipe(prompt, num_images_per_prompt=2, generator=gens, num_inference_steps=2, output_type="latent",
                **kw).images


def test_presets():
    tiny_dit, tiny = model_preset("tiny-dit"), model_preset("tiny")
    assert tiny_dit.unet is None and tiny_dit.dit.patch_size == 2
    # the same data, first stage, text encoder, schedule and objective as tiny: only the backbone
    # differs, and the rate and length it trains at (tiny's wall time)
    for field in ("resolution", "vae", "text", "noise", "pretrained_vae"):
        assert getattr(tiny_dit, field) == getattr(tiny, field), field
    assert tiny_dit.objective == dataclasses.replace(tiny.objective, learning_rate=3e-3, max_train_steps=8000)
    assert model_downsampling(TrainConfig(preset="tiny-dit")) == (2, 2)
    b2 = model_preset("dit-b2")
    assert (b2.resolution, b2.text.hidden_size, b2.vae, b2.dit.width, b2.dit.num_layers) == \
        (512, 768, model_preset("sd15").vae, 768, 12)
    with torch.device("meta"):
        dit = build_transformer(b2.dit, in_channels=4, sample_size=64, caption_channels=768)
    assert 110e6 < count_parameters(dit) < 140e6  # DiT-B/2 is 130M (cross-attention in, class embedding out)


@pytest.mark.parametrize("patch", [2, 4])
def test_patchify_and_unpatchify_shapes(patch):
    """(B, 4, h, w) -> (B, h/p * w/p, width) tokens -> (B, 4, h, w); a non-square latent gets its own grid."""
    torch.manual_seed(0)
    dit = build_transformer(DiTConfig(patch_size=patch, num_layers=1, num_attention_heads=2, attention_head_dim=16),
                            in_channels=4, sample_size=16, caption_channels=8)
    context = torch.randn(3, 5, 8)
    for h, w in ((16, 16), (16, 8)):
        x = torch.randn(3, 4, h, w)
        assert dit.pos_embed(x).shape == (3, (h // patch) * (w // patch), 32)
        assert denoise(dit, x, 10, context).shape == x.shape
    # patchify is local: a change inside the first p x p patch changes the first token only
    x = torch.zeros(1, 4, 16, 16)
    x[..., :patch, :patch] = torch.randn(4, patch, patch)
    tokens = dit.pos_embed(x) - dit.pos_embed(torch.zeros_like(x))
    assert tokens[0, 0].abs().sum() > 0 and tokens[0, 1:].abs().sum() == 0


def test_denoise_equals_diffusers_reference(dit_components):
    """Our call (a scalar timestep, as the pipeline passes it) equals diffusers' class called as its
    own PixArt pipeline calls it, on a copy loaded from the same weights."""
    ours = dit_components.transformer.eval()
    reference = PixArtTransformer2DModel.from_config(ours.config).eval()
    reference.load_state_dict(ours.state_dict())
    torch.manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 32, 64)
    with torch.no_grad():
        got = denoise(ours, x, torch.tensor(500), context)
        expected = reference(x, encoder_hidden_states=context, timestep=torch.tensor([500, 500]),
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert got.shape == (2, 4, 16, 16)  # epsilon / v only: no learned-variance channels
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(denoise(ours, x, 10, context), got)  # the timestep matters


def test_guidance_scales_one_and_zero(dit_components):
    """Scale 1 is the conditional prediction alone; scale 0 is the unconditional (negative prompt) one."""
    pipe = dit_pipeline(dit_components)
    cond = latents(pipe, "a red circle on the left", guidance_scale=1.0)
    other = latents(pipe, "a blue square on the right", guidance_scale=1.0)
    assert not torch.allclose(cond, other)  # the prompt matters
    torch.testing.assert_close(latents(pipe, "a blue square on the right", negative_prompt="a red circle on the left",
                                       guidance_scale=0.0), cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latents(pipe, "a red circle on the left", negative_prompt="a blue square on the right",
                                       guidance_scale=0.0), other, rtol=1e-5, atol=1e-5)


def test_save_load_gives_the_same_images(dit_components, tmp_path):
    pipe = dit_pipeline(dit_components)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index.get("unet", [None, None]) == [None, None]
    assert index["_class_name"] == "TextToImagePipeline"
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = TextToImagePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet is None and isinstance(loaded.denoiser, PixArtTransformer2DModel)
    assert torch.equal(latents(loaded, "a red circle"), latents(pipe, "a red circle"))
    # diffusers alone loads the transformer; our loader (what --pretrained_model_name_or_path uses) the rest
    alone = PixArtTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), pipe.transformer.state_dict().values()))
    comps = load_pretrained(str(tmp_path))
    assert comps.unet is None and comps.denoiser.config.patch_size == 2


def test_lora_on_the_dit_saves_and_loads(dit_components, tmp_path):
    """peft adapters on the DiT's attention projections (self- and cross-attention), written as
    transformer.* keys and read back by the pipeline with the same outputs."""
    base = dit_components.transformer.state_dict()
    adapted = PixArtTransformer2DModel.from_config(dit_components.transformer.config)
    adapted.load_state_dict(base)
    add_lora(adapted, rank=2)
    trained = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(".attn1.to_q." in n for n in trained) and any(".attn2.to_k." in n for n in trained)
    before = latents(dit_pipeline(dit_components, adapted), "a red circle")
    assert torch.equal(before, latents(dit_pipeline(dit_components), "a red circle"))  # B = 0: unchanged
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    after = latents(dit_pipeline(dit_components, adapted), "a red circle")
    assert not torch.allclose(after, before)
    save_lora(tmp_path, adapted, info={"rank": 2})
    fresh = PixArtTransformer2DModel.from_config(dit_components.transformer.config)
    fresh.load_state_dict(base)
    pipe = dit_pipeline(dit_components, fresh)
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(latents(pipe, "a red circle"), after, rtol=1e-5, atol=1e-5)


def test_a_tiny_dit_overfits_one_batch():
    """One fixed batch (latents, noise, timesteps, text): the v-loss falls twentyfold within 60 steps
    (about a thousandfold in fact; 2 s on one thread)."""
    torch.manual_seed(0)
    dit = build_transformer(DiTConfig(patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=32),
                            in_channels=4, sample_size=8, caption_channels=16)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    context, t = torch.randn(4, 6, 16), torch.tensor([50, 300, 600, 900])
    a = torch.cos(t / 1000 * torch.pi / 2).pow(2).view(-1, 1, 1, 1)  # alpha_bar
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: more threads only contend on a busy machine
    try:
        for _ in range(60):
            loss = F.mse_loss(denoise(dit, x_t, t, context), v)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


@pytest.mark.slow
def test_tiny_dit_trains_resumes_exactly_and_evaluates(tmp_path):
    """train_ldm.py --preset tiny-dit: a run stopped after its step-2 checkpoint and resumed ends
    bit-identical to the uninterrupted one (transformer, text encoder, EMA); the saved folder
    evaluates with training/evaluate.py; a LoRA run adapts it."""
    from safetensors.torch import load_file

    from tests.test_training import FAST, assert_same, launch
    from training.evaluate import main as evaluate

    def weights(run, part):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        return load_file(str(run / part / name))

    a, c = tmp_path / "a", tmp_path / "c"
    args = [*FAST, "--preset", "tiny-dit", "--eval_images_per_case", "0", "--num_validation_images", "0"]
    launch(["--output_dir", str(a), *args])
    assert not (a / "unet").exists()
    (c / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "checkpoint-2", c / "checkpoints" / "checkpoint-2")
    launch(["--output_dir", str(c), *args, "--resume_from_checkpoint", "latest"])
    for comp in ("transformer", "text_encoder"):
        assert_same(weights(a, comp), weights(c, comp))
    assert_same(*(load_file(str(run / "checkpoints" / "checkpoint-4" / "ema_unet.safetensors")) for run in (a, c)))
    report = evaluate(["--pipeline", str(a), "--images_per_case", "1", "--num_inference_steps", "2",
                       "--out", str(tmp_path / "eval")])
    assert 0.0 <= report["all"] <= 1.0 and report["images"] == len(report["cases"])
    lora = tmp_path / "lora"
    launch(["--output_dir", str(lora), *args, "--pretrained_model_name_or_path", str(a), "--lora_rank", "2",
            "--max_train_steps", "1", "--checkpointing_steps", "0"])
    pipe = TextToImagePipeline.from_pretrained(a)
    pipe.load_lora_weights(lora)
    assert any("lora_" in n for n, _ in pipe.transformer.named_parameters())
