"""LoRA (Hu et al. 2021) on the U-Net and the CLIP text encoder, through peft.

The boundary is thin on purpose: peft adds the adapters, diffusers converts and writes them in
its LoRA format (`pytorch_lora_weights.safetensors`, keys `unet.*` / `text_encoder.*`), which
our pipeline and diffusers' `StableDiffusionPipeline.load_lora_weights` both read. A DiT's adapters
(PixArt's transformer has no peft mixin in diffusers) are injected with peft directly and written
under `transformer.*` keys (diffusers' SD3 LoRA format), which `TextToImagePipeline` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Attention projections, as in diffusers' train_text_to_image_lora.py and peft's SD recipes
# (the same names in a DiT's blocks: self-attention attn1, cross-attention attn2).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None,
             targets: tuple[str, ...] | None = None) -> None:
    """Freeze `model` and add trainable rank-`rank` adapters (scale alpha / rank; default 1) to its
    attention projections. B starts at zero, so the model's output is unchanged until trained.
    Works on diffusers' UNet2DConditionModel and PixArtTransformer2DModel and transformers' CLIPTextModel."""
    from diffusers import ModelMixin
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if targets is None:
        targets = UNET_TARGETS if isinstance(model, ModelMixin) else TEXT_ENCODER_TARGETS
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets))
    if hasattr(model, "add_adapter"):
        model.add_adapter(config)
    else:  # diffusers models without its peft mixin (the DiT)
        inject_adapter_in_model(config, model)
    for p in trainable_parameters(model):  # trained in float32 even when the base is half precision
        p.data = p.data.float()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of `model` in diffusers' key format (no base weights)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_lora(directory: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
              info: dict | None = None) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` (+ `lora_info.json` with `info`, e.g. the
    base model and rank). Load it with `pipe.load_lora_weights(directory)`. `unet` may be a DiT."""
    from diffusers import PixArtTransformer2DModel, StableDiffusionPipeline

    directory = Path(directory)
    with_te = text_encoder is not None and _has_lora(text_encoder)
    if isinstance(unet, PixArtTransformer2DModel):
        _save_transformer_lora(directory, unet, text_encoder if with_te else None)
        if info is not None:
            (directory / "lora_info.json").write_text(json.dumps(info, indent=2) + "\n")
        return directory / WEIGHT_NAME
    # The adapter config (rank, alpha) goes into the file's metadata: without it a loader
    # assumes alpha = rank, and a run with another alpha loads at the wrong scale.
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=lora_state_dict(unet),
        text_encoder_lora_layers=lora_state_dict(text_encoder) if with_te else None,
        unet_lora_adapter_metadata=_adapter_metadata(unet),
        text_encoder_lora_adapter_metadata=_adapter_metadata(text_encoder) if with_te else None,
        safe_serialization=True)
    if info is not None:
        (directory / "lora_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return directory / WEIGHT_NAME


def _save_transformer_lora(directory: Path, transformer: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
    """`transformer.*` (peft's lora_A / lora_B names) and `text_encoder.*` keys, adapter configs in the metadata."""
    from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    SD3LoraLoaderMixin.save_lora_weights(
        directory, transformer_lora_layers=get_peft_model_state_dict(transformer),
        text_encoder_lora_layers=lora_state_dict(text_encoder) if text_encoder is not None else None,
        transformer_lora_adapter_metadata=_adapter_metadata(transformer),
        text_encoder_lora_adapter_metadata=_adapter_metadata(text_encoder) if text_encoder is not None else None,
        safe_serialization=True)


def load_transformer_lora(transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                          metadata: dict | None) -> None:
    """Inject the `transformer.*` adapters of a LoRA file (`save_lora` of a DiT) into `transformer`,
    with the rank and alpha its metadata records."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    prefix = "transformer."
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    config = {k[len(prefix):]: v for k, v in (metadata or {}).items() if k.startswith(prefix)}
    if not weights or not config:
        raise ValueError("no transformer.* LoRA weights with their adapter config in this file "
                         "(a DiT's LoRA is written by training/train_ldm.py --lora_rank N)")
    inject_adapter_in_model(LoraConfig(**config), transformer)
    set_peft_model_state_dict(transformer, weights)


def _adapter_metadata(model: torch.nn.Module) -> dict:
    return model.peft_config["default"].to_dict()


def _has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())
