"""training/export.py: the single file loads back in diffusers' `from_single_file` with the same
weights and images, the kohya LoRA file loads back in `load_lora_weights` with the same images as
the diffusers-format file, and user mistakes get one line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from test_single_file import tiny_sd1, to_original

from conftest import make_pipeline
from ldm.errors import run_cli
from ldm.export import (LORA_WEIGHT_NAME, load_single_file_pipeline, lora_to_kohya, pipeline_to_original,
                        unet_module_map)
from ldm.lora import add_lora, save_lora, trainable_parameters
from ldm.models import build_components
from ldm.presets import model_preset
from training.export import main

PROMPTS = ["a red circle", "a blue square"]


def images(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=4.0, generator=gens, output_type="pt").images


def assert_same_weights(ours, theirs):
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def tiny_without_text_time():
    """The tiny preset's U-Net levels (3, channels 32 / 64 / 128, one layer, attention at the two
    lower levels) without the text-time embedding, i.e. an architecture SD's layout can hold."""
    cfg = model_preset("tiny")
    return replace(cfg, unet=replace(cfg.unet, text_time_embedding=False))


def test_unet_block_numbering_matches_stable_diffusion_15():
    from ldm.models import build_unet

    with torch.device("meta"):
        unet = build_unet(model_preset("sd15").unet, in_channels=4, sample_size=64, cross_attention_dim=768)
    m = unet_module_map(unet.config)
    # known names of SD 1.5's original checkpoint
    assert m["down_blocks.0.downsamplers.0.conv"][0] == "input_blocks.3.0.op"
    assert m["down_blocks.3.resnets.1"][0] == "input_blocks.11.0"
    assert m["up_blocks.0.upsamplers.0.conv"][0] == "output_blocks.2.1.conv"  # no attention at that level
    assert m["up_blocks.1.upsamplers.0.conv"][0] == "output_blocks.5.2.conv"
    assert m["up_blocks.3.attentions.2"][0] == "output_blocks.11.1"
    assert "up_blocks.3.upsamplers.0.conv" not in m and "down_blocks.3.attentions.0" not in m


def test_sd1_shaped_export_equals_an_independent_mapping():
    """Four levels and two layers (SD 1.x's shape): the same keys and tensors as the hand-written
    mapping of tests/test_single_file.py."""
    cfg = tiny_sd1()
    c = build_components(cfg, seed=0)
    ours, unmapped = pipeline_to_original(c.unet, c.vae, c.text_encoder)
    theirs = to_original(c, cfg)
    assert not unmapped
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_single_file_loads_back_in_from_single_file_with_the_same_weights_and_images(tmp_path):
    c = build_components(tiny_without_text_time(), seed=0)
    folder, out = tmp_path / "pipe", tmp_path / "model.safetensors"
    make_pipeline(c, "ddim").save_pretrained(folder)
    main(["--pipeline", str(folder), "--single_file", str(out)])

    keys = load_file(str(out)).keys()
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for k in keys)
    # three levels, one layer: level 0's downsampler is input block 2, level 1's upsampler output block 3
    assert {"model.diffusion_model.input_blocks.2.0.op.weight", "model.diffusion_model.output_blocks.3.2.conv.weight",
            "model.diffusion_model.middle_block.1.proj_in.weight", "first_stage_model.decoder.up.1.upsample.conv.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"} <= keys

    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(folder), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(reference, name), getattr(loaded, name))
    torch.testing.assert_close(images(loaded), images(reference), rtol=0, atol=0)


def test_tiny_preset_exports_whole_and_warns_about_the_text_time_embedding(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    main(["--pipeline", str(tiny_pipeline_dir), "--single_file", str(out), "--half"])
    err = capsys.readouterr().err
    assert "add_embedding" in err and "v_prediction" in err
    stored = load_file(str(out))
    assert stored["model.diffusion_model.add_embedding.proj.weight"].dtype == torch.float16

    main(["--pipeline", str(tiny_pipeline_dir), "--single_file", str(out)])
    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    loaded = load_single_file_pipeline(out, tiny_pipeline_dir)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(reference, name), getattr(loaded, name))
    torch.testing.assert_close(images(loaded), images(reference), rtol=0, atol=0)


# ---------------------------------------------------------------------- LoRA
def lora_run(tmp_path, alpha: float):
    """A base pipeline folder, its images, and a LoRA run folder written as training writes it (rank 4)."""
    c = build_components(model_preset("tiny"), seed=0)
    pipe = make_pipeline(c, "ddim")
    pipe.save_pretrained(tmp_path / "base")
    base = images(pipe)
    add_lora(pipe.unet, rank=4, alpha=alpha)
    add_lora(pipe.text_encoder, rank=4, alpha=alpha)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: give every adapter weight a value
        for p in trainable_parameters(pipe.unet) + trainable_parameters(pipe.text_encoder):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_lora(tmp_path / "lora", pipe.unet, pipe.text_encoder, info={"rank": 4, "alpha": alpha})
    return pipe, base


def with_lora(folder, lora_dir, weight_name):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    return pipe


def test_kohya_lora_loads_back_with_the_same_images_as_the_diffusers_file(tmp_path):
    trained, base = lora_run(tmp_path, alpha=4)
    out = main(["--lora", str(tmp_path / "lora"), "--lora_format", "kohya"])
    assert out == tmp_path / "lora" / "lora_kohya.safetensors"
    kohya = load_file(str(out))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in kohya
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in kohya
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in kohya)
    down = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert len(down) == sum(k.endswith(".alpha") for k in kohya) == sum(k.endswith(".lora_up.weight") for k in kohya)
    assert all(kohya[k].shape[0] == 4 for k in down)

    expected = images(trained)
    from_diffusers = images(with_lora(tmp_path / "base", tmp_path / "lora", LORA_WEIGHT_NAME))
    from_kohya = images(with_lora(tmp_path / "base", tmp_path / "lora", out.name))
    torch.testing.assert_close(from_kohya, from_diffusers, rtol=0, atol=0)
    torch.testing.assert_close(from_kohya, expected, rtol=1e-4, atol=1e-4)
    assert (from_kohya - base).abs().max() > 1e-2  # the adapters change the images


def test_kohya_alpha_carries_a_trained_scale_other_than_one(tmp_path):
    """alpha 8 at rank 4 (scale 2): kohya's .alpha carries it, so the loaded U-Net matches training."""
    trained, _ = lora_run(tmp_path, alpha=8)
    out = main(["--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "k.safetensors")])
    kohya = load_file(str(out))
    assert all(float(v) == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))
    loaded = with_lora(tmp_path / "base", tmp_path, out.name)
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 32, 64, generator=g)
    with torch.no_grad():
        expected = trained.unet(x, t, encoder_hidden_states=ctx).sample
        got = loaded.unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_to_kohya_reads_peft_keys_and_refuses_unknown_ones():
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    peft = {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b}
    out = lora_to_kohya(peft)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    assert torch.equal(out[f"{name}.lora_down.weight"], a) and torch.equal(out[f"{name}.lora_up.weight"], b)
    assert float(out[f"{name}.alpha"]) == 2.0  # no alpha anywhere: the rank, i.e. scale 1
    with pytest.raises(ValueError, match="vae.encoder"):
        lora_to_kohya({"vae.encoder.conv_in.lora_A.weight": a})
    with pytest.raises(ValueError, match="only one of"):
        lora_to_kohya({k: v for k, v in peft.items() if "lora_A" in k})


# ---------------------------------------------------------------------- mistakes
@pytest.mark.parametrize("args, message", [
    ([], "give either --pipeline"),
    (["--pipeline", "{tmp}/nowhere", "--single_file", "{tmp}/x.safetensors"], "no such folder"),
    (["--pipeline", "{tmp}", "--single_file", "{tmp}/x.safetensors"], "not a pipeline folder"),
    (["--pipeline", "{lora}", "--single_file", "{tmp}/x.safetensors"], "LoRA adapters only"),
    (["--pipeline", "{pipe}"], "needs --single_file"),
    (["--pipeline", "{pipe}", "--single_file", "{tmp}/x.ckpt"], "safetensors only"),
    (["--lora", "{tmp}"], "no pytorch_lora_weights.safetensors"),
    (["--lora", "{pipe}"], "it is a full pipeline"),
    (["--pipeline", "{dit}", "--single_file", "{tmp}/x.safetensors"], "its denoiser is a transformer"),
])
def test_mistakes_get_one_line(tiny_pipeline_dir, tmp_path, capsys, args, message):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / LORA_WEIGHT_NAME).write_bytes(b"")
    dit = tmp_path / "dit"  # a DiT pipeline folder's layout: transformer/ where the U-Net would be
    for sub in ("transformer", "vae", "text_encoder"):
        (dit / sub).mkdir(parents=True)
        (dit / sub / "config.json").write_text("{}")
    (dit / "model_index.json").write_text("{}")
    argv = [a.format(tmp=tmp_path, lora=lora, pipe=tiny_pipeline_dir, dit=dit) for a in args]
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
