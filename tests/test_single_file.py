"""Single-file Stable Diffusion 1.x checkpoints (original CompVis key layout) load offline through
diffusers' single-file loaders, and a pickled checkpoint that would run code is refused.

The test writes its own tiny checkpoint: a tiny SD1-shaped model (two resnets per level, attention
on the first three levels, as SD 1.x) converted to the original layout by the inverse of the
mapping diffusers applies when loading (after diffusers' scripts/convert_diffusers_to_original_
stable_diffusion.py)."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from ldm.models import build_components, load_pretrained, write_pipeline_configs
from ldm.presets import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, model_preset
from ldm.text import encode_tokens, tokenize


def tiny_sd1() -> ModelConfig:
    return replace(model_preset("sd15"), resolution=32,
                   unet=UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=2, attention_head_dim=8,
                                   norm_num_groups=32),
                   vae=VAEConfig(block_out_channels=(32, 32), layers_per_block=2, norm_num_groups=32),
                   text=TextEncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_length=77, projection_dim=32))


# ---------------------------------------------------------------------- diffusers -> original keys
def _unet_prefixes() -> list[tuple[str, str]]:
    pairs = []
    for i in range(4):
        for j in range(2):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i < 3:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            if i > 0:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        if i < 3:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    return pairs


UNET_DIRECT = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_to_original(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module in UNET_DIRECT:
            out[f"{UNET_DIRECT[module]}.{param}"] = value
            continue
        new = key
        for hf, orig in _unet_prefixes():
            if new.startswith(hf):
                rest = new[len(hf):]
                if "resnets" in hf:
                    for a, b in UNET_RESNET:
                        rest = rest.replace(a, b)
                new = orig + rest
                break
        out[new] = value
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


VAE_PAIRS = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"), ("mid_block.attentions.0.", "mid.attn_1.")]


def vae_to_original(sd: dict, levels: int, layers: int) -> dict:
    rename = []
    for i in range(levels):
        for j in range(layers):
            rename.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        if i < levels - 1:
            rename.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            rename.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
        for j in range(layers + 1):
            rename.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}."))
    for j in range(2):
        rename.append((f"mid_block.resnets.{j}.", f"mid.block_{j + 1}."))
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in sd.items():
        new = key
        for a, b in rename + VAE_PAIRS:
            new = new.replace(a, b)
        if ".mid.attn_1." in new:
            for a, b in attn:
                new = new.replace(a, b)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value[:, :, None, None]  # linear -> 1x1 conv, as the original stores them
        out[f"first_stage_model.{new}"] = value
    return out


def to_original(c, cfg: ModelConfig) -> dict:
    sd = unet_to_original(c.unet.state_dict())
    sd.update(vae_to_original(c.vae.state_dict(), len(cfg.vae.block_out_channels), cfg.vae.layers_per_block))
    te = c.text_encoder.state_dict()  # transformers 5 names these without the "text_model." of SD checkpoints
    sd.update({f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
               for k, v in te.items()})
    return {k: v.contiguous() for k, v in sd.items()}


# ---------------------------------------------------------------------- tests
def outputs(c) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x, img = torch.randn(2, 4, 16, 16, generator=g), torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ctx = encode_tokens(c.text_encoder, tokenize(c.tokenizer, ["a red circle", "a blue square"]))
        return (ctx, c.unet(x, torch.tensor([3, 600]), encoder_hidden_states=ctx).sample,
                c.vae.decode(c.vae.encode(img).latent_dist.mode()).sample)


def test_single_file_checkpoint_loads_offline_with_a_local_config(tmp_path):
    cfg = tiny_sd1()
    c = build_components(cfg, seed=0)
    ckpt = tmp_path / "tiny-sd1.safetensors"
    save_file(to_original(c, cfg), str(ckpt))
    configs = write_pipeline_configs(cfg, tmp_path / "configs")
    loaded = load_pretrained(str(ckpt), single_file_config=str(configs))
    for ours, theirs in zip(outputs(c), outputs(loaded)):
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert loaded.text_encoder_pretrained and loaded.noise_scheduler.config.prediction_type == "epsilon"


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file when unpickled


def test_a_malicious_ckpt_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "model.ckpt"
    with open(ckpt, "wb") as fh:
        pickle.dump({"state_dict": {"x": Exploit(marker)}}, fh)
    with pytest.raises(ValueError, match="weights_only"):
        load_pretrained(str(ckpt))
    assert not marker.exists()
