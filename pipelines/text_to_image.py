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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.loaders import FromSingleFileMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.diffusion import classifier_free_guidance, rescale_guidance
from ldm.schedulers import diffusers_class, make_sampler, set_timesteps, with_fixes
from ldm.text import encode_tokens, tokenize, write_bpe_files
from ldm.models import denoise, vae_scale_factor
from ldm.runtime import gpu_settings
from ldm.vae_utils import configure_vae, decode_latents

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSORS = ("latents", "prompt_embeds", "noise_pred")


@dataclass
class TextToImageOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class TextToImagePipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin,
                          FromSingleFileMixin):
    """`load_lora_weights(dir_or_file)` / `fuse_lora()` / `unload_lora_weights()` come from diffusers'
    Stable Diffusion LoRA loader (the files `training/train_ldm.py --lora_rank N` writes);
    `load_textual_inversion(file, token=...)` from its textual-inversion loader (a new token in the
    tokenizer, its vector in the text encoder's embedding table); `from_single_file(file, config=folder)`
    from its single-file loader (the file `training/export.py --single_file` writes)."""

    model_cpu_offload_seq = "text_encoder->unet->transformer->vae"
    # The denoiser is `unet` (a U-Net), or `transformer` (a DiT, --preset tiny-dit / dit-b2) with unet=None.
    _optional_components = ["unet", "transformer"]

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel | None, scheduler: SchedulerMixin,
                 transformer: PixArtTransformer2DModel | None = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("give the denoiser as unet (a U-Net) or as transformer (a DiT), exactly one of them")
        scheduler = with_fixes(scheduler)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, transformer=transformer)
        self.vae_scale_factor = vae_scale_factor(self.vae.config)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def denoiser(self) -> UNet2DConditionModel | PixArtTransformer2DModel:
        """The U-Net, or the DiT of a transformer pipeline: what `ldm.models.denoise` calls."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def text_width(self) -> int:
        """D of the (B, L, D) text embeddings the denoiser takes (a DiT projects them to its width)."""
        config = self.denoiser.config
        return config.cross_attention_dim if self.unet is not None else config.caption_channels

    # ------------------------------------------------------------------ conveniences
    def set_sampler(self, name: str) -> "TextToImagePipeline":
        """Swap the scheduler for another diffusers sampler on the same noise schedule:
        ddpm, ddim, dpm++, euler, euler_a, pndm, unipc."""
        self.scheduler = make_sampler(name, self.scheduler.config)
        return self

    def enable_gpu_settings(self, *, channels_last: bool | None = None, compile: bool = False) -> dict:
        """Training's GPU set-up, for sampling on the pipeline's device: TF32 matmuls on CUDA, the
        denoiser and VAE in channels_last (None: on for CUDA, off on CPU) and, with `compile`,
        regional torch.compile of the denoiser's repeated blocks (the first call compiles). Call
        after `.to(device)`; returns what was applied."""
        return gpu_settings(self.denoiser, self.vae, self.device, channels_last=channels_last, torch_compile=compile)

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
        # A DiT folder loads with this class only (diffusers' PixArt pipelines expect a T5 text encoder)
        index["_class_name"] = "StableDiffusionPipeline" if self.unet is not None else type(self).__name__
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

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        """diffusers' Stable Diffusion LoRA loader for a U-Net. For a DiT: its `transformer.*` adapters
        through peft (`ldm.lora.load_transformer_lora`), any `text_encoder.*` ones as for a U-Net."""
        if self.unet is not None:
            return super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        from ldm.lora import load_transformer_lora

        state_dict, alphas, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict,
                                                            return_lora_metadata=True, **kwargs)
        load_transformer_lora(self.transformer, state_dict, metadata)
        if any(k.startswith("text_encoder.") for k in state_dict):
            self.load_lora_into_text_encoder(state_dict, alphas, self.text_encoder, lora_scale=self.lora_scale,
                                             adapter_name=adapter_name, _pipeline=self, metadata=metadata)

    # ------------------------------------------------------------------ steps of __call__
    def encode_prompt(self, prompts: list[str], device: torch.device, clip_skip: int | None = None,
                      lora_scale: float | None = None) -> torch.Tensor:
        """(B,) prompts -> (B, L, D) text embeddings.

        clip_skip: k > 0 takes the hidden states k layers before the last, through the final layer
            norm (what Stable Diffusion's `clip_skip` and A1111's "CLIP skip" k+1 give).
        lora_scale: the text encoder's LoRA adapters scaled by this during the call (peft)."""
        prompts = self.maybe_convert_prompt(prompts, self.tokenizer)  # multi-vector textual inversion tokens
        ids = tokenize(self.tokenizer, prompts).to(device)
        if lora_scale is not None:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            if not clip_skip:
                embeds = encode_tokens(self.text_encoder, ids)
            else:
                hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states  # (layers + 1) x (B, L, D)
                # transformers 5's CLIPTextModel holds final_layer_norm itself (no .text_model wrapper)
                embeds = self.text_encoder.final_layer_norm(hidden[-(clip_skip + 1)])
        finally:
            if lora_scale is not None:
                unscale_lora_layers(self.text_encoder, lora_scale)
        return embeds.to(dtype=self.text_encoder.dtype, device=device)

    def check_inputs(self, prompt, negative_prompt, num_inference_steps, guidance_scale, guidance_rescale,
                     height, width, num_images_per_prompt, generator, latents, output_type,
                     callback_on_step_end_tensor_inputs, prompt_embeds=None, negative_prompt_embeds=None,
                     clip_skip=None, cross_attention_kwargs=None
                     ) -> tuple[list[str] | None, list[str] | None, int, int, int]:
        """Every argument of `__call__` checked before any work: a ValueError naming the argument
        and what it accepts. Returns (prompts, negative prompts, number of prompts, height, width);
        prompts is None when prompt_embeds are given, negative prompts when negative_prompt_embeds are."""
        num_prompts = self._check_embeds(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)
        prompts = None if prompt_embeds is not None else _strings("prompt", prompt)
        if negative_prompt_embeds is not None:
            negatives = None
        elif negative_prompt is None:
            negatives = [""] * num_prompts
        else:
            negatives = _strings("negative_prompt", negative_prompt)
            if isinstance(negative_prompt, str):
                negatives = negatives * num_prompts
            elif len(negatives) != num_prompts:
                raise ValueError(f"{len(negatives)} negative prompts for {num_prompts} prompts")
        if clip_skip is not None:
            layers = self.text_encoder.config.num_hidden_layers
            if isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral) or not 0 <= clip_skip < layers:
                raise ValueError(f"clip_skip must be an integer from 0 to {layers - 1} (the text encoder has "
                                 f"{layers} layers), got {clip_skip!r}")
        if cross_attention_kwargs is not None:
            if not isinstance(cross_attention_kwargs, dict):
                raise ValueError(f"cross_attention_kwargs must be a dict such as {{'scale': 0.5}}, "
                                 f"got {cross_attention_kwargs!r}")
            _finite("cross_attention_kwargs['scale']", cross_attention_kwargs.get("scale", 1.0))
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
        batch = num_prompts * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images "
                             f"({num_prompts} prompts x {num_images_per_prompt})")
        f = self.vae_scale_factor
        default = self.denoiser.config.sample_size * f
        height = default if height is None else height
        width = default if width is None else width
        for name, value in (("height", height), ("width", width)):
            _positive_int(name, value)
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling), "
                             f"got {height}x{width}")
        if latents is not None:
            shape = (batch, self.denoiser.config.in_channels, height // f, width // f)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents must be a tensor of shape {shape} (prompts x num_images_per_prompt, "
                                 f"latent channels, height/{f}, width/{f}), got {got}")
        return prompts, negatives, num_prompts, height, width

    def _check_embeds(self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds) -> int:
        """prompt or prompt_embeds (not both); embeddings (B, L, D) with the text encoder's width D.
        Returns the number of prompts B."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give either prompt or prompt_embeds, not both")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give either negative_prompt or negative_prompt_embeds, not both")
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("prompt must be a string or a non-empty list of strings, got None "
                                 "(or give prompt_embeds)")
            num_prompts = len(_strings("prompt", prompt))
        else:
            _embeddings("prompt_embeds", prompt_embeds, self.text_width)
            num_prompts = prompt_embeds.shape[0]
        if negative_prompt_embeds is not None:
            _embeddings("negative_prompt_embeds", negative_prompt_embeds, self.text_width)
            if negative_prompt_embeds.shape[0] != num_prompts:
                raise ValueError(f"negative_prompt_embeds hold {negative_prompt_embeds.shape[0]} prompts, "
                                 f"for {num_prompts} prompts")
        # the two halves of a guided batch are concatenated: the same number of tokens
        lengths = {name: e.shape[1] for name, e in (("prompt_embeds", prompt_embeds),
                                                    ("negative_prompt_embeds", negative_prompt_embeds)) if e is not None}
        if lengths and len(lengths) == 1:
            lengths["the tokenizer's"] = self.tokenizer.model_max_length
        if len(set(lengths.values())) > 1:
            raise ValueError("prompt and negative embeddings must have the same number of tokens, got "
                             + ", ".join(f"{n} {v}" for n, v in lengths.items()))
        return num_prompts

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
        prompt: str | list[str] | None = None,
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
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> TextToImageOutput | tuple:
        """Generate images. The arguments named as in diffusers' StableDiffusionPipeline act as there.

        generator: one generator, or a list with one per image (B * num_images_per_prompt);
            with a list, each image depends only on its own generator, not on the batch size.
        guidance_scale: classifier-free guidance s; 1 gives the conditional model alone.
        guidance_rescale: phi of Lin et al. 2023 (0 disables).
        callback_on_step_end(pipe, step_index, timestep, {name: tensor}) -> dict of replacements,
            as in diffusers; tensors named in callback_on_step_end_tensor_inputs ("latents",
            "prompt_embeds", "noise_pred").
        prompt_embeds / negative_prompt_embeds: (B, L, D) text embeddings used instead of encoding
            prompt / negative_prompt (e.g. from a prompt-weighting library such as compel).
        clip_skip: take the text encoder's hidden states this many layers before the last (then its
            final layer norm), for the prompt and the negative prompt alike.
        cross_attention_kwargs: {"scale": s} scales the LoRA adapters (U-Net and text encoder) by s
            for this call; the rest goes to the U-Net's attention processors.
        timesteps / sigmas: a custom schedule instead of num_inference_steps evenly spaced steps
            (for samplers whose set_timesteps accepts them, e.g. euler).
        """
        prompts, negatives, num_prompts, height, width = self.check_inputs(
            prompt, negative_prompt, num_inference_steps, guidance_scale, guidance_rescale, height, width,
            num_images_per_prompt, generator, latents, output_type, callback_on_step_end_tensor_inputs,
            prompt_embeds, negative_prompt_embeds, clip_skip, cross_attention_kwargs)
        batch = num_prompts * num_images_per_prompt
        device = self._execution_device
        do_cfg = guidance_scale != 1.0
        lora_scale = (cross_attention_kwargs or {}).get("scale")

        # 1. Text: (B*N, L, D), unconditional first when guiding (one U-Net call per step).
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompts, device, clip_skip, lora_scale)
        cond = prompt_embeds.to(dtype=self.text_encoder.dtype, device=device)
        prompt_embeds = cond = cond.repeat_interleave(num_images_per_prompt, dim=0)
        if do_cfg:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self.encode_prompt(negatives, device, clip_skip, lora_scale)
            uncond = negative_prompt_embeds.to(dtype=cond.dtype, device=device)
            prompt_embeds = torch.cat([uncond.repeat_interleave(num_images_per_prompt, dim=0), cond])

        # 2. Initial noise x_T ~ N(0, sigma_max^2): (B*N, C, H/f, W/f).
        if timesteps is None and sigmas is None:
            set_timesteps(self.scheduler, num_inference_steps, device)
            timesteps = self.scheduler.timesteps
        else:  # diffusers' helper: a ValueError for a sampler that takes no custom schedule
            with warnings.catch_warnings():  # numpy >= 2's copy-keyword warning, as in set_timesteps
                warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
                timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, None, device, timesteps, sigmas)
        shape = (batch, self.denoiser.config.in_channels, height // self.vae_scale_factor,
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
                noise_pred = denoise(self.denoiser, model_in, t, prompt_embeds, cross_attention_kwargs)
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


def _embeddings(name: str, value, width: int) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != 3 or value.shape[-1] != width or not len(value):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor of shape (prompts, tokens, {width}) (the text encoder's "
                         f"output: the U-Net's cross_attention_dim), got {got}")


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

