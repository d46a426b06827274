"""Text-to-image sampling with classifier-free guidance.

A diffusers `DiffusionPipeline`, so `from_pretrained` / `save_pretrained` / `to()` / progress
bars / offloading come from diffusers. The folder it saves says `StableDiffusionPipeline` in
`model_index.json`, so `diffusers.DiffusionPipeline.from_pretrained(folder)` elsewhere loads it.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.diffusion import classifier_free_guidance, rescale_guidance
from ldm.schedulers import diffusers_class, make_sampler, set_timesteps, with_fixes
from ldm.text import encode_tokens, tokenize, write_bpe_files
from ldm.models import vae_scale_factor
from ldm.vae_utils import configure_vae, decode_latents

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSORS = ("latents", "prompt_embeds", "noise_pred")


@dataclass
class TextToImageOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class TextToImagePipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """`load_lora_weights(dir_or_file)` / `fuse_lora()` / `unload_lora_weights()` come from diffusers'
    Stable Diffusion LoRA loader (the files `training/train_ldm.py --lora_rank N` writes)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: SchedulerMixin):
        super().__init__()
        scheduler = with_fixes(scheduler)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler)
        self.vae_scale_factor = vae_scale_factor(self.vae.config)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ conveniences
    def set_sampler(self, name: str) -> "TextToImagePipeline":
        """Swap the scheduler for another diffusers sampler on the same noise schedule:
        ddpm, ddim, dpm++, euler, euler_a, pndm, unipc."""
        self.scheduler = make_sampler(name, self.scheduler.config)
        return self

    def enable_vae_tiling(self, tile_size: int | None = None) -> None:
        """Decode images larger than `tile_size` pixels (default: the VAE config's sample_size) in
        overlapping, blended tiles: memory follows the tile, not the image (seams may show slightly)."""
        configure_vae(self.vae, tiling=True, slicing=self.vae.use_slicing, tile_size=tile_size)

    def disable_vae_tiling(self) -> None:
        configure_vae(self.vae, tiling=False, slicing=self.vae.use_slicing)

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time: same images, lower peak memory."""
        configure_vae(self.vae, tiling=self.vae.use_tiling, slicing=True)

    def disable_vae_slicing(self) -> None:
        configure_vae(self.vae, tiling=self.vae.use_tiling, slicing=False)

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True, **kwargs):
        """diffusers layout, safetensors. `model_index.json` names StableDiffusionPipeline (with no
        safety checker) so the rest of the ecosystem loads the folder; the tokenizer folder also
        gets `vocab.json` / `merges.txt` for tokenizer libraries that do not read tokenizer.json."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = "StableDiffusionPipeline"
        index.setdefault("safety_checker", [None, None])
        index.setdefault("feature_extractor", [None, None])
        index.setdefault("image_encoder", [None, None])
        index["requires_safety_checker"] = False
        # Our samplers that extend a diffusers class are saved under that class's name (loading
        # here turns it back into ours, ldm.schedulers.with_fixes).
        scheduler_class = diffusers_class(self.scheduler).__name__
        index["scheduler"] = ["diffusers", scheduler_class]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        scheduler_path = Path(save_directory) / "scheduler" / "scheduler_config.json"
        scheduler_config = json.loads(scheduler_path.read_text())
        scheduler_config["_class_name"] = scheduler_class
        scheduler_path.write_text(json.dumps(scheduler_config, indent=2, sort_keys=True) + "\n")
        write_bpe_files(Path(save_directory) / "tokenizer")

    # ------------------------------------------------------------------ steps of __call__
    def encode_prompt(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """(B,) prompts -> (B, L, D) text embeddings."""
        ids = tokenize(self.tokenizer, prompts)
        embeds = encode_tokens(self.text_encoder, ids.to(device))
        return embeds.to(dtype=self.text_encoder.dtype, device=device)

    def check_inputs(self, prompt, negative_prompt, num_inference_steps, guidance_scale, guidance_rescale,
                     height, width, num_images_per_prompt, generator, latents, output_type,
                     callback_on_step_end_tensor_inputs) -> tuple[list[str], list[str], int, int]:
        """Every argument of `__call__` checked before any work: a ValueError naming the argument
        and what it accepts. Returns (prompts, negative prompts, height, width)."""
        prompts = _strings("prompt", prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _strings("negative_prompt", negative_prompt)
            if isinstance(negative_prompt, str):
                negatives = negatives * len(prompts)
            elif len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        _positive_int("num_inference_steps", num_inference_steps)
        _positive_int("num_images_per_prompt", num_images_per_prompt)
        _finite("guidance_scale", guidance_scale)
        _finite("guidance_rescale", guidance_rescale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(CALLBACK_TENSORS)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must name some of {CALLBACK_TENSORS}, "
                             f"got {sorted(unknown)}")
        batch = len(prompts) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images "
                             f"({len(prompts)} prompts x {num_images_per_prompt})")
        f = self.vae_scale_factor
        default = self.unet.config.sample_size * f
        height = default if height is None else height
        width = default if width is None else width
        for name, value in (("height", height), ("width", width)):
            _positive_int(name, value)
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling), "
                             f"got {height}x{width}")
        if latents is not None:
            shape = (batch, self.unet.config.in_channels, height // f, width // f)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents must be a tensor of shape {shape} (prompts x num_images_per_prompt, "
                                 f"latent channels, height/{f}, width/{f}), got {got}")
        return prompts, negatives, height, width

    def _step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
    ) -> TextToImageOutput | tuple:
        """Generate images.

        generator: one generator, or a list with one per image (B * num_images_per_prompt);
            with a list, each image depends only on its own generator, not on the batch size.
        guidance_scale: classifier-free guidance s; 1 gives the conditional model alone.
        guidance_rescale: phi of Lin et al. 2023 (0 disables).
        callback_on_step_end(pipe, step_index, timestep, {name: tensor}) -> dict of replacements,
            as in diffusers; tensors named in callback_on_step_end_tensor_inputs ("latents",
            "prompt_embeds", "noise_pred").
        """
        prompts, negatives, height, width = self.check_inputs(
            prompt, negative_prompt, num_inference_steps, guidance_scale, guidance_rescale, height, width,
            num_images_per_prompt, generator, latents, output_type, callback_on_step_end_tensor_inputs)
        batch = len(prompts) * num_images_per_prompt
        device = self._execution_device
        do_cfg = guidance_scale != 1.0

        # 1. Text: (B*N, L, D), unconditional first when guiding (one U-Net call per step).
        cond = self.encode_prompt(prompts, device).repeat_interleave(num_images_per_prompt, dim=0)
        prompt_embeds = cond
        if do_cfg:
            uncond = self.encode_prompt(negatives, device).repeat_interleave(num_images_per_prompt, dim=0)
            prompt_embeds = torch.cat([uncond, cond])

        # 2. Initial noise x_T ~ N(0, sigma_max^2): (B*N, C, H/f, W/f).
        set_timesteps(self.scheduler, num_inference_steps, device)
        timesteps = self.scheduler.timesteps
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        else:
            latents = latents.to(device=device, dtype=prompt_embeds.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)

        # 3. Reverse process.
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_in = torch.cat([latents] * 2) if do_cfg else latents
                model_in = self.scheduler.scale_model_input(model_in, t)
                noise_pred = self.unet(model_in, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
                if do_cfg:
                    pred_uncond, pred_cond = noise_pred.chunk(2)
                    noise_pred = classifier_free_guidance(pred_uncond, pred_cond, guidance_scale)
                    noise_pred = rescale_guidance(noise_pred, pred_cond, guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    named = {"latents": latents, "prompt_embeds": prompt_embeds, "noise_pred": noise_pred}
                    out = callback_on_step_end(self, i, t, {k: named[k] for k in callback_on_step_end_tensor_inputs})
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                progress.update()

        # 4. Decode: x = D(z / scaling_factor), in [-1, 1]. A float16 VAE decodes in float32 when its
        # config says force_upcast, or after it overflowed (ldm.vae_utils.decode_latents), which
        # raises FloatingPointError rather than return a NaN image.
        self._refuse_non_finite(latents, "latents", num_inference_steps)
        if output_type == "latent":
            images = latents
        else:
            z = latents / self.vae.config.scaling_factor
            try:
                decoded = decode_latents(self.vae, z)
            except FloatingPointError:
                self.maybe_free_model_hooks()
                raise
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return TextToImageOutput(images=images)

    def _refuse_non_finite(self, x: torch.Tensor, what: str, num_inference_steps: int) -> None:
        """A NaN image decodes to black without a word: say so instead (one host sync per call)."""
        if torch.isfinite(x).all():
            return
        self.maybe_free_model_hooks()
        raise FloatingPointError(
            f"{what} are not finite ({int((~torch.isfinite(x)).sum())} of {x.numel()} values) after "
            f"{num_inference_steps} steps of the {type(self.scheduler).__name__} sampler; try another sampler "
            f"(pipe.set_sampler('dpm++'), or 'euler_a' for our NaN-safe Euler-ancestral), another "
            f"num_inference_steps, or float32 weights")


def _strings(name: str, value) -> list[str]:
    """A string or a non-empty list/tuple of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    got = f"an empty {type(value).__name__}" if isinstance(value, (list, tuple)) and not value else (
        repr(value) if not isinstance(value, (list, tuple)) else "a list holding a non-string")
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {got}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")

