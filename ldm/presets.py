"""Model architecture presets: typed, frozen dataclasses of the U-Net / DiT, VAE, text encoder, noise
schedule and objective, and the named presets built from them.

Presets are plain factory code (no classes built from strings). `PRESETS[name]` gives the
architecture; `model_preset(name)` builds it. The training run's settings are in `ldm.config`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class UNetConfig:
    """diffusers `UNet2DConditionModel`. `cross_attention` says which resolution levels attend to text."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    cross_attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    # Stable Diffusion adds nothing to the time embedding. True adds an attention-pooled text
    # embedding (diffusers' addition_embed_type="text"), a global summary of the prompt.
    text_time_embedding: bool = False


@dataclass(frozen=True)
class DiTConfig:
    """diffusers `PixArtTransformer2DModel`: a DiT (Peebles & Xie 2023) on `patch_size` x
    `patch_size` latent patches with PixArt-alpha's adaLN-single timestep conditioning and
    cross-attention to the text tokens (Chen et al. 2023). Width = heads x head dim."""

    patch_size: int = 2
    num_layers: int = 12
    num_attention_heads: int = 12
    attention_head_dim: int = 64

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKL`: downsampling factor is 2 ** (len(block_out_channels) - 1)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """transformers `CLIPTextModel`; `max_length` is the token length (positions) of prompts."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_length: int = 77
    projection_dim: int = 768
    vocab_size: int = 49408  # the CLIP BPE vocabulary shipped with open_clip


@dataclass(frozen=True)
class NoiseConfig:
    """The forward process (DDPM, Ho et al. 2020) as diffusers' scheduler config names it."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    # Which training timesteps a sampler visits: "leading" (Stable Diffusion) never starts at
    # t = T; "trailing" does (Lin et al. 2023, sec. 3.3).
    timestep_spacing: str = "leading"


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective a preset recommends; `TrainConfig` flags left unset take these.

    The default is the usual one for Stable Diffusion training and fine-tuning: uniform
    timesteps with min-SNR-5 weighting (Hang et al. 2023).
    """

    snr_gamma: float | None = 5.0  # None: no re-weighting (plain MSE on the model's target)
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_end_multiplier: float | None = None  # None or 0: the multiplier stays constant
    train_text_encoder: bool | None = None  # None: train one built from scratch, freeze a pretrained one
    text_encoder_lr: float | None = None  # None: the U-Net's learning rate
    # False: a trained text encoder keeps its token embedding table as it is (a from-scratch CLIP
    # encoder's 49,408 x width table is most of its weights, and a dense gradient, AdamW and EMA
    # over all of it each step, for the few dozen rows a small data set's words use).
    train_token_embedding: bool = True
    # The peak learning rate and length the preset is tuned for. The tiny U-Net learns shape from the
    # shipped first stage's latents on every seed tried at 3,600 steps (about 14 minutes on 2 cores).
    learning_rate: float = 1e-3
    max_train_steps: int = 3600


ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class ModelConfig:
    resolution: int
    unet: UNetConfig | None  # None with `dit`: the denoiser is a transformer
    vae: VAEConfig
    text: TextEncoderConfig
    noise: NoiseConfig = NoiseConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    # A pretrained, frozen first stage used when no other is given (None: random weights).
    pretrained_vae: str | None = None
    dit: DiTConfig | None = None


def _tiny() -> ModelConfig:
    """CPU-sized text-to-image model for the default run and every test.

    32 px images -> the shipped f2 VAE -> 16x16x4 latents, so a shape spans 4-7 latent cells.
    Cross-attention has no positional encoding, so "on the left" can only be matched where the
    features know where they are: the U-Net goes down to 4x4, whose mid block (self-attention
    over all 16 cells, zero padding marking the borders) sees the whole layout, and attends to
    the text at 8x8 and 4x4 (attention at 16x16 doubled the step time). An attention-pooled text
    embedding is also added to the time embedding (global attributes such as colour).
    A fourth level (to 2x2) cost more per step and scored lower; dropping the text attention at
    8x8, where square or round is decided, lost shape. The measurements behind this preset are in
    benchmarks/results/README.md.
    """
    return ModelConfig(
        resolution=32,
        unet=UNetConfig(
            block_out_channels=(32, 64, 128),
            cross_attention=(False, True, True),
            layers_per_block=1,
            attention_head_dim=4,
            norm_num_groups=32,
            text_time_embedding=True,
        ),
        vae=VAEConfig(
            block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
            scaling_factor=1.0,
        ),
        text=TextEncoderConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            max_length=32, projection_dim=64,
        ),
        # Flat-coloured 32 px images leak their layout through SD's scaled_linear schedule
        # (alpha_bar_T = 0.0047): a model trained on it reads position from the leaked signal
        # and ignores the words (position was not learned on held-out prompts). The cosine
        # schedule ends at ~zero SNR; v-prediction stays well-posed there (Salimans & Ho 2022),
        # and trailing spacing makes sampling start from t = T.
        noise=NoiseConfig(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                          timestep_spacing="trailing"),
        # Where an object is stays readable from x_t down to SNR ~0.01 (it is large and flat), so
        # only the noisiest few percent of timesteps need the position words; min-SNR weighting
        # gives those a weight of ~SNR, i.e. nothing, and uniform sampling visits them rarely.
        # Hence the plain v-loss with 5x weight on the noisiest tenth (36% of the draws); 3x, or
        # annealing it to uniform (--timestep_bias_end_multiplier 1), did no better across seeds.
        # The text encoder is trained from scratch with the U-Net, but 10x slower. At the U-Net's
        # rate it learns, while the U-Net cannot use them yet, that the direction words change
        # nothing and merges them (benchmarks/word_probe.py shows it), and all directions then
        # draw one layout. Frozen (random) keeps them apart but colour and shape suffer.
        # Its token embedding table (49,408 x 64: 3.2M of its 3.3M weights) stays as initialised:
        # a random vector per word is already distinct, the layers above learn what it means, and
        # the dense gradient, AdamW and EMA over the table cost a noticeable part of a step.
        # Figures for each of these choices: benchmarks/results/README.md.
        objective=ObjectiveConfig(snr_gamma=None, timestep_bias_strategy="later",
                                  timestep_bias_multiplier=5.0, timestep_bias_portion=0.1,
                                  text_encoder_lr=1e-4, train_token_embedding=False),
        pretrained_vae=str(ASSETS / "tiny_vae"),
    )


def _sd15() -> ModelConfig:
    """Stable Diffusion 1.5: UNet ~860M, f8 VAE ~83M, CLIP ViT-L/14 text encoder ~123M."""
    return ModelConfig(resolution=512, unet=UNetConfig(), vae=VAEConfig(), text=TextEncoderConfig())


def _tiny_dit() -> ModelConfig:
    """`tiny` with a DiT in place of the U-Net: 16x16x4 latents in 2x2 patches are 64 tokens.
    Same data, first stage, text encoder, noise schedule and objective, so the two backbones
    compare directly. Width 96 (3 heads of 32) and 4 blocks: at tiny's wall time (8,000 steps of
    it cost about 3,600 of tiny's on a CPU) it scored higher than the wider, deeper DiT that had
    the U-Net's step cost (fewer, dearer steps) and than patch 1 or 4; 3e-3 was the best rate of
    the wider one, and 4e-3 failed there (benchmarks/results/README.md, the DiT sections)."""
    tiny = _tiny()
    return replace(tiny, unet=None, dit=DiTConfig(patch_size=2, num_layers=4, num_attention_heads=3,
                                                  attention_head_dim=32),
                   objective=replace(tiny.objective, learning_rate=3e-3, max_train_steps=8000))


def _dit_b2() -> ModelConfig:
    """DiT-B/2 (Peebles & Xie 2023: width 768, 12 blocks, 12 heads, 2x2 patches) with cross-attention
    to CLIP ViT-L/14 text, at 512 px on the sd15 first stage (64x64x4 latents: 1,024 tokens)."""
    return replace(_sd15(), unet=None, dit=DiTConfig(patch_size=2, num_layers=12, num_attention_heads=12,
                                                      attention_head_dim=64))


PRESETS: dict[str, typing.Callable[[], ModelConfig]] = {"tiny": _tiny, "sd15": _sd15, "tiny-dit": _tiny_dit,
                                                        "dit-b2": _dit_b2}


def model_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def denoiser_downsampling(config: Any) -> int:
    """Latent pixels per side of the denoiser's coarsest grid, from its diffusers config (a dict):
    a DiT's patch size, or 2 for each U-Net level below the first."""
    if "patch_size" in config:
        return config["patch_size"]
    return 2 ** (len(config["block_out_channels"]) - 1)
