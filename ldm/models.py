"""The thin boundary to diffusers / transformers: build components from a preset, or load them.

Everything returned is a stock diffusers / transformers module, so a folder we save is a
Stable Diffusion folder and a Stable Diffusion folder is ours.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.hub import SINGLE_FILE_SUFFIXES
from ldm.presets import DiTConfig, ModelConfig, NoiseConfig, UNetConfig, VAEConfig, denoiser_downsampling
from ldm.text import build_clip_tokenizer, build_text_encoder

logger = logging.getLogger(__name__)


@dataclass
class Components:
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel | None  # None when the denoiser is a transformer
    noise_scheduler: DDPMScheduler
    text_encoder_pretrained: bool = False
    transformer: PixArtTransformer2DModel | None = None

    @property
    def denoiser(self) -> UNet2DConditionModel | PixArtTransformer2DModel:
        """The network that predicts the noise (or v): the U-Net, or the DiT of a transformer preset."""
        return self.unet if self.unet is not None else self.transformer


def denoiser_kwargs(model: torch.nn.Module) -> dict[str, torch.nn.Module | None]:
    """`unet=` / `transformer=` for `TextToImagePipeline` or `Components`: the slot `model` goes in."""
    is_dit = isinstance(_unwrap(model), PixArtTransformer2DModel)
    return {"unet": None, "transformer": model} if is_dit else {"unet": model, "transformer": None}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel (accelerate's multi-process wrapper)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def denoise(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor | int, context: torch.Tensor,
            cross_attention_kwargs: dict | None = None) -> torch.Tensor:
    """The denoiser's output (epsilon or v, as its schedule says) for x_t (B, C, h, w) at timesteps
    t (a scalar or (B,)) given text tokens context (B, L, D): (B, C, h, w). The one place where a
    U-Net and a DiT differ in signature; training and the pipeline both call this.
    cross_attention_kwargs: {"scale": s} scales LoRA adapters (both), the rest goes to the attention."""
    if not isinstance(_unwrap(model), PixArtTransformer2DModel):
        return model(x_t, t, encoder_hidden_states=context, cross_attention_kwargs=cross_attention_kwargs,
                     return_dict=False)[0]
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    kwargs = dict(cross_attention_kwargs or {})
    scale = kwargs.pop("scale", None)  # PixArt's forward has no LoRA scale of its own
    t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])  # adaLN-single embeds (B,) timesteps
    if scale is not None:
        scale_lora_layers(model, scale)
    try:
        return model(x_t, encoder_hidden_states=context, timestep=t, cross_attention_kwargs=kwargs or None,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    finally:
        if scale is not None:
            unscale_lora_layers(model, scale)


def build_unet(cfg: UNetConfig, *, in_channels: int, sample_size: int,
               cross_attention_dim: int) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention))
    extra = {}
    if cfg.text_time_embedding:
        extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4}
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups,
        **extra,
    )


def build_transformer(cfg: DiTConfig, *, in_channels: int, sample_size: int,
                      caption_channels: int) -> PixArtTransformer2DModel:
    """A DiT: patchify (B, C, h, w) into (h/p * w/p) tokens with 2-D sin-cos positions, blocks of
    self-attention, cross-attention to the projected text tokens and an MLP, each modulated by
    adaLN-single (one timestep MLP shared by all blocks, PixArt-alpha sec. 2.3), then unpatchify."""
    return PixArtTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=in_channels,
        out_channels=in_channels,  # epsilon or v only: no learned-variance channels (DiT's 2C output)
        num_layers=cfg.num_layers,
        cross_attention_dim=cfg.width,  # the text tokens are projected to the width first
        caption_channels=caption_channels,
        sample_size=sample_size,
        patch_size=cfg.patch_size,
        use_additional_conditions=False,  # no resolution / aspect-ratio embedding (PixArt's 1024 px models)
    )


def build_denoiser(cfg: ModelConfig, *, in_channels: int, sample_size: int) -> torch.nn.Module:
    """The preset's U-Net, or its DiT when it has one."""
    if cfg.dit is not None:
        return build_transformer(cfg.dit, in_channels=in_channels, sample_size=sample_size,
                                 caption_channels=cfg.text.hidden_size)
    return build_unet(cfg.unet, in_channels=in_channels, sample_size=sample_size,
                      cross_attention_dim=cfg.text.hidden_size)


def build_vae(cfg: VAEConfig, sample_size: int) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=sample_size,
        scaling_factor=cfg.scaling_factor,
    )


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent pixel along a side for a diffusers `AutoencoderKL` config (or a
    `VAEConfig`): every block but the last halves the size, 2 ** (len(block_out_channels) - 1)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def image_size_divisor(vae_config, unet_config) -> int:
    """What an image's sides must be multiples of to come out even through the VAE's and then the
    denoiser's downsampling (the U-Net halves at every block but the last; a DiT cuts patches)."""
    return vae_scale_factor(vae_config) * denoiser_downsampling(unet_config)


def build_noise_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    """The training-time forward process. Its config is what every sampler is built from."""
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing=cfg.timestep_spacing,
    )
    # DDIM / PNDM built from this config use alpha_bar_prev = alpha_bar_0 at the last step, as
    # Stable Diffusion's scheduler config does (DDPM itself has no such option).
    scheduler.register_to_config(set_alpha_to_one=False)
    return scheduler


def build_components(cfg: ModelConfig, seed: int | None = None) -> Components:
    """All components with random weights (seeded when `seed` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    latent_size = cfg.resolution // cfg.vae.downsample_factor
    return Components(
        vae=build_vae(cfg.vae, cfg.resolution),
        text_encoder=build_text_encoder(cfg.text),
        tokenizer=build_clip_tokenizer(cfg.text.max_length),
        noise_scheduler=build_noise_scheduler(cfg.noise),
        **denoiser_kwargs(build_denoiser(cfg, in_channels=cfg.vae.latent_channels, sample_size=latent_size)),
    )


def _subfolder(path: str, name: str) -> dict:
    """Load `name` from a pipeline folder (or hub repo) when it has one, else treat `path` as
    the component's own folder."""
    local = Path(path)
    if local.is_dir() and not (local / name).is_dir():
        return {}
    return {"subfolder": name}


def load_vae(path: str) -> AutoencoderKL:
    from ldm.hub import check_vae_source

    check_vae_source(path)  # a missing folder or an unreachable hub id: one UsageError, not retries
    return AutoencoderKL.from_pretrained(path, **_subfolder(path, "vae"))


def is_single_file(path: str) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def write_pipeline_configs(cfg: ModelConfig, directory: str | Path) -> Path:
    """A diffusers-layout folder holding only configs and the tokenizer (no weights): what
    diffusers' single-file loaders read instead of fetching a config from the hub."""
    directory = Path(directory)
    latent = cfg.resolution // cfg.vae.downsample_factor
    with torch.device("meta"):  # configs only: no memory for SD-sized weights
        unet = build_unet(cfg.unet, in_channels=cfg.vae.latent_channels, sample_size=latent,
                          cross_attention_dim=cfg.text.hidden_size)
        vae = build_vae(cfg.vae, cfg.resolution)
        text_encoder = build_text_encoder(cfg.text)
    unet.save_config(directory / "unet")
    vae.save_config(directory / "vae")
    text_encoder.config.save_pretrained(directory / "text_encoder")
    build_clip_tokenizer(cfg.text.max_length).save_pretrained(directory / "tokenizer")
    build_noise_scheduler(cfg.noise).save_config(directory / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False}
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory


def load_single_file(path: str, config: str | None = None) -> Components:
    """A single-file Stable Diffusion 1.x checkpoint (original CompVis key layout) through diffusers'
    `from_single_file`, offline: `config` is a diffusers-layout folder with the configs (default:
    written from the sd15 preset). Pickled files (.ckpt / .pt / .bin) are read with
    `torch.load(weights_only=True)` only: one that would run code is refused."""
    from diffusers import StableDiffusionPipeline

    if Path(path).suffix.lower() != ".safetensors":
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure of the safe loader is a refusal
            raise ValueError(f"{path}: not loadable with torch.load(weights_only=True), refusing to unpickle it "
                             f"(convert it to .safetensors from a trusted environment): {e}") from e
    with tempfile.TemporaryDirectory() as tmp:
        if config is None:
            from ldm.presets import model_preset

            config = str(write_pipeline_configs(model_preset("sd15"), tmp))
            logger.info("loading single-file checkpoint %s with the sd15 preset's configs", path)
        else:
            logger.info("loading single-file checkpoint %s with the configs in %s", path, config)
        pipe = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
        noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(config, subfolder="scheduler"))
    return Components(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, noise_scheduler,
                      text_encoder_pretrained=True)


def load_pretrained(path: str, single_file_config: str | None = None) -> Components:
    """Every component from a diffusers-layout folder, a hub id, or a single-file checkpoint."""
    from ldm.hub import check_pipeline_source

    check_pipeline_source(path)  # a missing folder, no unet/, an unreachable hub id: one UsageError
    if is_single_file(path):
        return load_single_file(path, single_file_config)
    vae = load_vae(path)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    sched_cfg = DDPMScheduler.load_config(path, subfolder="scheduler")
    noise_scheduler = DDPMScheduler.from_config(sched_cfg)
    return Components(vae, text_encoder, tokenizer, noise_scheduler=noise_scheduler, text_encoder_pretrained=True,
                      **denoiser_kwargs(load_denoiser(path)))


def load_denoiser(path: str) -> torch.nn.Module:
    """unet/ of a pipeline folder, or transformer/ (a DiT) in a local folder that has no unet/."""
    local = Path(path)
    if local.is_dir() and not (local / "unet").is_dir() and (local / "transformer").is_dir():
        return PixArtTransformer2DModel.from_pretrained(path, subfolder="transformer")
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet")


def components_for_training(cfg: ModelConfig, *, pretrained: str | None, pretrained_vae: str | None,
                            prediction_type: str | None, seed: int,
                            single_file_config: str | None = None) -> Components:
    """Pretrained where asked, random (seeded) elsewhere; the noise scheduler's prediction type
    set to the one we train."""
    if pretrained:
        comps = load_pretrained(pretrained, single_file_config)
    else:
        comps = build_components(cfg, seed=seed)
    if pretrained_vae:
        comps.vae = load_vae(pretrained_vae)
        expected = cfg.vae.latent_channels if not pretrained else comps.denoiser.config.in_channels
        if comps.vae.config.latent_channels != expected:
            raise ValueError(
                f"VAE at {pretrained_vae} has {comps.vae.config.latent_channels} latent channels, "
                f"the U-Net expects {expected}")
        if not pretrained:  # the denoiser's latent size follows the VAE's real downsampling factor
            factor = vae_scale_factor(comps.vae.config)
            torch.manual_seed(seed)
            comps = replace(comps, **denoiser_kwargs(build_denoiser(cfg, in_channels=expected,
                                                                    sample_size=cfg.resolution // factor)))
    if prediction_type and prediction_type != comps.noise_scheduler.config.prediction_type:
        comps.noise_scheduler = DDPMScheduler.from_config(comps.noise_scheduler.config,
                                                          prediction_type=prediction_type)
    return comps


def training_dtypes(mixed_precision: str, train_dtype: str) -> tuple[torch.dtype, torch.dtype]:
    """(weight dtype, train dtype). Frozen parts run in the mixed-precision dtype; without mixed
    precision everything trained and frozen is in `train_dtype` (float64 only for numerical
    checks, e.g. 1 vs 2 processes)."""
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    train = {"float32": torch.float32, "float64": torch.float64}[train_dtype]
    if half is not None and train != torch.float32:
        raise ValueError(f"--train_dtype {train_dtype} needs --mixed_precision no, got {mixed_precision}")
    return half or train, train


def prepare_for_training(comps: Components, *, train_text_encoder: bool | None, train_token_embedding: bool,
                         lora_rank: int | None, lora_alpha: float | None, weight_dtype: torch.dtype,
                         train_dtype: torch.dtype, gradient_checkpointing: bool) -> dict[str, torch.nn.Module]:
    """Set the components up for training, in place; returns the trained modules by name ("unet":
    the denoiser, U-Net or DiT; and "text_encoder" when it is trained): what the optimizer and the EMA hold.

    The VAE is frozen. A text encoder built from scratch is trained jointly (as in the LDM paper),
    a pretrained one stays frozen (`train_text_encoder` None), else as asked; its token embedding
    table stays frozen unless `train_token_embedding`. With `lora_rank`, only adapters are trained
    (float32), on a frozen base in `weight_dtype`. Trained modules are cast to `train_dtype` when
    it is not float32."""
    from ldm.lora import add_lora

    unet, text_encoder = comps.denoiser, comps.text_encoder
    train_te = (not comps.text_encoder_pretrained) if train_text_encoder is None else train_text_encoder
    comps.vae.requires_grad_(False)
    text_encoder.requires_grad_(train_te)
    if train_te and not train_token_embedding:
        text_encoder.get_input_embeddings().requires_grad_(False)
    if lora_rank:
        unet.to(dtype=weight_dtype)
        add_lora(unet, lora_rank, lora_alpha)
        if train_te:
            text_encoder.to(dtype=weight_dtype)
            add_lora(text_encoder, lora_rank, lora_alpha)
    if train_dtype != torch.float32:
        unet.to(dtype=train_dtype)
        text_encoder.to(dtype=train_dtype)
    unet.train()
    text_encoder.train(train_te)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable()
    return {"unet": unet, "text_encoder": text_encoder} if train_te else {"unet": unet}


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def with_resolution(cfg: ModelConfig, resolution: int | None) -> ModelConfig:
    return cfg if resolution is None else replace(cfg, resolution=resolution)
