"""LoRA adapters: what is trained, what is saved, and that both our pipeline and diffusers'
StableDiffusionPipeline load the file to the same outputs."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from ldm.lora import WEIGHT_NAME, add_lora, save_lora, trainable_parameters
from ldm.models import build_components
from ldm.presets import model_preset
from ldm.schedulers import make_sampler
from pipelines import TextToImagePipeline


def tiny_pipeline() -> TextToImagePipeline:
    c = build_components(model_preset("tiny"), seed=0)
    return TextToImagePipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                               scheduler=make_sampler("ddim", c.noise_scheduler.config))


def randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """lora_B starts at zero (the adapter is a no-op); give every adapter weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def unet_out(unet, text_encoder, tokenizer) -> torch.Tensor:
    from ldm.text import encode_tokens, tokenize

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = encode_tokens(text_encoder, tokenize(tokenizer, ["a red circle", "a blue square"]))
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=ctx).sample


def images(pipe) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return pipe(["a red circle", "a blue square"], num_inference_steps=2, generator=gens, output_type="pt").images


def test_only_adapters_train_and_the_base_stays_put():
    pipe = tiny_pipeline()
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    add_lora(pipe.unet, rank=4)
    params = trainable_parameters(pipe.unet)
    names = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for p in params)
    before = unet_out(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, 32, 64)
    pipe.unet(x, torch.tensor([5, 500]), encoder_hidden_states=ctx).sample.square().mean().backward()
    opt.step()
    after = pipe.unet.state_dict()
    for k, v in base.items():  # peft keeps the base weights under base_layer
        key = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key], v), k
    assert not torch.allclose(unet_out(pipe.unet, pipe.text_encoder, pipe.tokenizer), before)


def test_lora_file_is_small_and_loads_in_our_pipeline_and_in_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    reference_base = images(pipe)
    add_lora(pipe.unet, rank=4)
    add_lora(pipe.text_encoder, rank=4)
    randomise_lora(pipe.unet, 0)
    randomise_lora(pipe.text_encoder, 1)
    expected_unet = unet_out(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    expected = images(pipe)
    assert not torch.allclose(expected, reference_base, atol=1e-3)

    path = save_lora(tmp_path / "lora", pipe.unet, pipe.text_encoder, info={"rank": 4})
    assert path.name == WEIGHT_NAME
    saved = load_file(str(path))
    assert saved and all(k.startswith(("unet.", "text_encoder.")) and "lora" in k for k in saved)
    assert any(k.startswith("text_encoder.") for k in saved)
    lora_bytes = path.stat().st_size
    base_bytes = (tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert lora_bytes < base_bytes / 5, (lora_bytes, base_bytes)

    ours = TextToImagePipeline.from_pretrained(tmp_path / "base")
    torch.testing.assert_close(images(ours), reference_base)
    ours.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(unet_out(ours.unet, ours.text_encoder, ours.tokenizer), expected_unet,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(images(ours), expected, rtol=1e-4, atol=1e-4)

    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)
    theirs.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(unet_out(theirs.unet, theirs.text_encoder, theirs.tokenizer), expected_unet,
                               rtol=1e-5, atol=1e-5)
    # fusing into the weights gives the same model without the adapters' overhead
    ours.fuse_lora()
    torch.testing.assert_close(unet_out(ours.unet, ours.text_encoder, ours.tokenizer), expected_unet,
                               rtol=1e-4, atol=1e-4)


def test_an_alpha_other_than_the_rank_loads_at_the_trained_scale(tmp_path):
    """alpha / rank scales the adapters: the file carries it, so both loaders apply it."""
    from diffusers import StableDiffusionPipeline

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    add_lora(pipe.unet, rank=4, alpha=8)
    add_lora(pipe.text_encoder, rank=4, alpha=8)
    randomise_lora(pipe.unet, 0)
    randomise_lora(pipe.text_encoder, 1)
    expected = unet_out(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    save_lora(tmp_path / "lora", pipe.unet, pipe.text_encoder)
    for loaded in (TextToImagePipeline.from_pretrained(tmp_path / "base"),
                   StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)):
        loaded.load_lora_weights(tmp_path / "lora")
        torch.testing.assert_close(unet_out(loaded.unet, loaded.text_encoder, loaded.tokenizer), expected,
                                   rtol=1e-5, atol=1e-5)
