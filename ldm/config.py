"""Typed configuration of the training runs, their parser and YAML files.

`TrainConfig` holds every flag of `training/train_ldm.py`, whose argparse parser is generated from
the dataclass so that `--help` always shows the real defaults; `VAETrainConfig` does the same for
`training/train_vae.py`. The model architectures (`PRESETS`) are in `ldm.presets`, the checks a
run passes at startup in `ldm.config_checks`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ldm.config_checks import validate
from ldm.errors import UsageError
from ldm.presets import PRESETS, ObjectiveConfig, model_preset


# --------------------------------------------------------------------------------------------
# Training run
# --------------------------------------------------------------------------------------------
def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    # model
    preset: str = _help("architecture preset: " + ", ".join(PRESETS), default="tiny")
    pretrained_model_name_or_path: str | None = _help(
        "diffusers-layout folder, hub id, or single-file SD1.x checkpoint (.safetensors) to start from",
        default=None)
    single_file_config: str | None = _help(
        "for a single-file checkpoint: a diffusers-layout folder with its configs (default: one written "
        "from the sd15 preset, so nothing is fetched from the hub)", default=None)
    pretrained_vae_name_or_path: str | None = _help(
        "diffusers-layout VAE folder (or a pipeline folder with vae/) to use frozen; default: the "
        "preset's own (tiny ships one), 'none' for a random one", default=None)
    train_text_encoder: bool | None = _help(
        "train the text encoder (default: the preset's choice for a model built from scratch; a "
        "pretrained one stays frozen)", default=None)
    prediction_type: str | None = _help("epsilon | v_prediction (default: the model's own)", default=None)
    attention_backend: str = _help("auto | sdpa | xformers", default="auto")
    lora_rank: int = _help("train LoRA adapters of this rank (peft) instead of every U-Net weight; the text "
                           "encoder, when trained, gets adapters too. 0: full fine-tune", default=0)
    lora_alpha: float | None = _help("LoRA scale numerator (default: the rank, i.e. scale 1)", default=None)
    text_encoder_open_clip: str | None = _help(
        "condition on an OpenCLIP text tower: an open_clip architecture name (e.g. ViT-H-14) or "
        "local-dir:FOLDER (its open_clip_config.json); converted to transformers' CLIPTextModel (frozen "
        "unless --train_text_encoder), so the saved pipeline stays in diffusers layout. Needs "
        "--text_encoder_weights", default=None)
    text_encoder_weights: str | None = _help(
        "the open_clip checkpoint of --text_encoder_open_clip (.safetensors; .bin / .pt read with "
        "torch.load(weights_only=True))", default=None)
    text_encoder_layer: str = _help(
        "with --text_encoder_open_clip: last | penultimate (SD 2's choice: the converted encoder keeps every "
        "layer but the last, so every pipeline then gives the penultimate layer's states)", default="last")
    # data
    train_data_dir: str | None = _help(
        "image folder: metadata.jsonl / metadata.csv (HF imagefolder) or sidecar .txt / .caption files",
        default=None)
    dataset_name: str | None = _help("HF hub data set name", default=None)
    image_column: str = _help("image column of the data set", default="image")
    caption_column: str = _help("caption column of the data set", default="text")
    on_bad_data: str = _help("skip (report and drop) | fail: unreadable, truncated, oversized or uncaptioned "
                             "images found by the check before training", default="skip")
    max_image_pixels: int = _help("larger images are refused (decompression bombs)", default=89_478_485)
    resolution: int | None = _help("training resolution (default: the preset's)", default=None)
    aspect_buckets: bool = _help("aspect-ratio bucketing: batches of one shape near resolution**2 pixels "
                                 "instead of square crops", default=False)
    bucket_no_upscale: bool = _help("with --aspect_buckets: never enlarge a small image", default=False)
    center_crop: bool = _help("center crop instead of random crop", default=True)
    random_flip: bool = _help("random horizontal flip (off: flips swap left/right in captions)",
                              default=False)
    caption_dropout: float = _help("probability of an empty caption (classifier-free guidance)",
                                   default=0.1)
    caption_prefix: str = _help("written in front of every caption of the data (a trigger, e.g. 'sks style, '); "
                                "never shuffled or dropped, not given to class images", default="")
    shuffle_tags: bool = _help("shuffle each caption's comma-separated tags every step (the first --keep_tokens "
                               "stay in place)", default=False)
    keep_tokens: int = _help("with --shuffle_tags / --tag_dropout: leading tags kept in place and never dropped",
                             default=0)
    tag_dropout: float = _help("leave out each tag after the first --keep_tokens with this probability, every step",
                               default=0.0)
    class_data_dir: str | None = _help(
        "prior preservation (DreamBooth): a folder of class images, filled up to --num_class_images by the base "
        "model with --class_prompt before training; trained alongside the instance images", default=None)
    class_prompt: str | None = _help("with --class_data_dir: the caption of every class image, e.g. 'a photo of a "
                                     "dog'", default=None)
    num_class_images: int = _help("with --class_data_dir: class images to train with (missing ones generated)",
                                  default=100)
    prior_loss_weight: float = _help("with --class_data_dir: loss = instance loss + this x class loss", default=1.0)
    # The objective: unset (None) takes the preset's `ObjectiveConfig` when training from scratch
    # and the Stable Diffusion one (min-SNR 5, uniform timesteps) from a pretrained model.
    snr_gamma: float | None = _help(
        "min-SNR-gamma loss weighting (Hang et al. 2023; 0: off; default: the preset's)", default=None)
    timestep_bias_strategy: str | None = _help(
        "none | later (more of the noisiest timesteps) | earlier (default: the preset's)", default=None)
    timestep_bias_multiplier: float | None = _help(
        "weight of the biased timesteps against the others (default: the preset's)", default=None)
    timestep_bias_portion: float | None = _help(
        "fraction of the timesteps that is biased (default: the preset's)", default=None)
    timestep_bias_end_multiplier: float | None = _help(
        "move the multiplier linearly to this by the last step (1: uniform at the end; 0: constant; "
        "default: the preset's)", default=None)
    noise_offset: float = _help("offset noise: add this x N(0,1) per sample and channel to the noise "
                                "(Guttenberg 2023; ~0.05-0.1 lets SD fine-tunes reach very dark/bright images)",
                                default=0.0)
    input_perturbation: float = _help("input perturbation (Ning et al. 2023; 0.1 is the paper's): x_t is built "
                                      "from noise + this x N(0, I), the target from the noise", default=0.0)
    zero_terminal_snr: bool | None = _help(
        "rescale the betas to zero terminal SNR (Lin et al. 2023; needs v_prediction; sampling then uses "
        "trailing timesteps). Default: the model's own schedule", default=None)
    builtin_num_images: int = _help("size of the built-in synthetic data set (no data flags)",
                                    default=4096)
    max_train_samples: int | None = _help("use only the first N samples", default=None)
    cache_latents: bool = _help("encode the data once with the frozen VAE (not with random crop/flip)",
                                default=True)
    cache_dir: str | None = _help("on-disk latent / text-embedding cache, keyed by image content, model "
                                  "weights and preprocessing (default: in memory only)", default=None)
    cache_text_embeddings: bool = _help("with a frozen text encoder, encode each caption once (in memory, or "
                                        "under --cache_dir) instead of every step", default=True)
    cache_in_memory: bool = _help("load the --cache_dir entries into memory (off: read each step, for data "
                                  "larger than RAM)", default=True)
    dataloader_num_workers: int = _help("data loader worker processes", default=0)
    cpu_threads: int | None = _help("torch threads per process on CPU (default: $LDM_CPU_THREADS, else "
                                    "cores / processes on this machine)", default=None)
    # optimisation
    train_batch_size: int = _help("batch size per process", default=32)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=1)
    max_train_steps: int | None = _help("optimizer steps (default: the preset's: 3,600; tiny-dit 8,000)",
                                        default=None)
    learning_rate: float | None = _help("peak learning rate (default: the preset's: 1e-3; tiny-dit 3e-3)",
                                        default=None)
    text_encoder_lr: float | None = _help(
        "text encoder learning rate (default: the preset's when training from scratch, else learning_rate)",
        default=None)
    train_token_embedding: bool | None = _help(
        "with a trained text encoder, also train its token embedding table (default: the preset's when "
        "training from scratch, else yes)", default=None)
    lr_scheduler: str = _help("constant | constant_with_warmup | linear | cosine | ...",
                              default="cosine")
    lr_warmup_steps: int = _help("warm-up steps", default=100)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    adam_weight_decay: float = _help("AdamW weight decay", default=1e-2)
    max_grad_norm: float = _help("gradient clipping norm", default=1.0)
    optimizer: str = _help(
        "adamw | adamw8bit (bitsandbytes; CUDA) | prodigy (prodigyopt: estimates its own step size, --learning_rate "
        "1.0 by convention) | schedulefree (schedulefree's AdamWScheduleFree: no decay needed). prodigy and "
        "schedulefree run a constant LR schedule (--lr_scheduler is set to constant; schedulefree warms up over "
        "--lr_warmup_steps itself)", default="adamw")
    use_8bit_adam: bool = _help("deprecated: the same as --optimizer adamw8bit", default=False)
    max_nonfinite_steps: int = _help(
        "stop with an error after this many updates in a row skipped for a non-finite loss or "
        "gradient", default=20)
    mixed_precision: str = _help(
        "auto | no | fp16 | bf16. auto: accelerate's config when it asks for fp16/bf16 (its 'no', what "
        "accelerate_config.yaml says, counts as unset), else bf16 on a CUDA GPU that supports it and "
        "float32 elsewhere (CPU). Give 'no' for float32 on a GPU", default="auto")
    train_dtype: str = _help("without mixed precision, the dtype of the models and the loss: float32, or float64 "
                             "for numerical checks (slower; e.g. 1 vs 2 processes train the same weights within 1e-6)", default="float32")
    gradient_checkpointing: bool = _help("trade compute for memory", default=False)
    channels_last: bool | None = _help("channels_last memory format for the U-Net and the VAE (default: on for "
                                       "CUDA, off on CPU where it is no faster)", default=None)
    torch_compile: bool = _help("torch.compile the U-Net's repeated blocks (regional compilation: short compile "
                                "time; the first steps are slower)", default=False)
    use_ema: bool = _help("keep an EMA of the weights and save it", default=True)
    ema_decay: float = _help("EMA decay (with warm-up)", default=0.999)
    posthoc_ema: bool = _help("post-hoc EMA (Karras et al. 2024): keep power-function EMAs and save their snapshots "
                              "(<output_dir>/posthoc_ema/), from which training/posthoc_ema.py rebuilds the EMA of "
                              "any length after training", default=False)
    posthoc_ema_sigma_rels: list[float] = _help("lengths (sigma_rel) of the EMAs kept for --posthoc_ema",
                                                default_factory=lambda: [0.05, 0.10])
    posthoc_ema_snapshot_steps: int | None = _help("--posthoc_ema snapshots every N steps (default: "
                                                   "--checkpointing_steps; each is the trained weights' size)",
                                                   default=None)
    seed: int = _help("seed of weights, data order and noise", default=0)
    # outputs
    output_dir: str = _help("where the pipeline, logs and checkpoints go", default="outputs/ldm")
    checkpointing_steps: int = _help("save a resumable checkpoint every N steps (0: never)",
                                     default=500)
    checkpoints_total_limit: int | None = _help("keep at most N checkpoints", default=2)
    resume_from_checkpoint: str | None = _help("a checkpoint folder or 'latest'", default=None)
    overwrite_output_dir: bool = _help(
        "start afresh in an --output_dir holding another run: its checkpoints, samples, logs and model are "
        "deleted first (without this, such a start is refused)", default=False)
    allow_config_drift: bool = _help(
        "resume even if the global batch, world size, accumulation, resolution, seed, model or data "
        "differ from the checkpoint's run (each difference is logged)", default=False)
    validation_prompts: list[str] = _help(
        "prompts for the validation grid",
        default_factory=lambda: ["a red circle on the left", "a blue square at the top",
                                 "a small green triangle in the middle",
                                 "a yellow circle on the left and a purple square on the right"])
    validation_steps: int = _help("validation grid (and validation loss) every N steps (0: only at the end)",
                                  default=500)
    validation_split: float = _help(
        "hold out this fraction of the data (seeded, by each image's content: the same images whatever the order, "
        "batch or processes; never trained on) and log the loss on it every --validation_steps (0: none)",
        default=0.0)
    validation_data_dir: str | None = _help(
        "a folder of held-out images (laid out like --train_data_dir) for the validation loss, instead of "
        "--validation_split", default=None)
    validation_loss_timesteps: int = _help("the validation loss's timesteps: an even grid of this many over "
                                           "[0, T), each held-out image at every one", default=8)
    num_validation_images: int = _help("images per validation prompt (0: no validation grids)", default=2)
    validation_inference_steps: int = _help("sampler steps for validation", default=25)
    validation_guidance_scale: float = _help("CFG scale for validation", default=4.0)
    sampler: str = _help("scheduler saved with the pipeline: ddpm | ddim | dpm++ | euler | ...",
                         default="euler_a")
    eval_images_per_case: int = _help(
        "held-out evaluation at the end, images per composition (built-in data only; 0: skip)", default=8)
    report_to: str = _help("tensorboard | none", default="tensorboard")
    config: str | None = _help("YAML file of these same keys (flags given win)", default=None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _arg_type(tp: Any) -> tuple[Any, bool]:
    """(argparse type, is_list) from a dataclass annotation such as `int | None`."""
    base = tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None -> X
        base = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(base) is list:
        return typing.get_args(base)[0], True
    return base, False


def _str2bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser(cls: type = TrainConfig) -> argparse.ArgumentParser:
    """One flag per dataclass field. Booleans take `--flag` / `--no-flag`."""
    parser = argparse.ArgumentParser(
        description="Train a text-to-image latent diffusion model (run with `accelerate launch`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = _arg_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        flag = "--" + f.name
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=tp, nargs="+" if is_list else None, **kw)
        # ArgumentDefaultsHelpFormatter reads .default; show the real default but keep SUPPRESS
        # so that we can tell which flags were actually given (they override --config).
        if "default" not in kw["help"]:  # some helps say it in words ("the preset's")
            parser._actions[-1].help = f"{kw['help']} (default: {default})"
    return parser


def exit_early_for_help(cls: type = TrainConfig, description: str | None = None,
                        argv: list[str] | None = None) -> None:
    """Answer -h / --help and exit, for a script to call before its heavy imports (torch and
    diffusers take seconds to import; the help needs neither)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        parser = build_parser(cls)
        if description:
            parser.description = description
        parser.parse_args(["--help"])


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a `--config` file; a missing, unreadable or malformed file is a UsageError."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: not readable ({e})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UsageError(f"--config {path}: not valid YAML{at} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of TrainConfig keys, got {type(data).__name__}")
    return data


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """A YAML value converted to the field's type (YAML reads `1e-4` as a string), or a
    ValueError naming the key."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{source}: {key} may not be empty")
    tp, is_list = _arg_type(annotation)
    try:
        if is_list:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list):
                raise TypeError
            return [_coerce(key, v, tp, source) for v in items]
        if tp is bool:
            return value if isinstance(value, bool) else _str2bool(str(value))
        if tp is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if tp is float and not isinstance(value, bool):
            return float(value)
        if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        pass
    raise UsageError(f"{source}: {key}={value!r} is not a valid {annotation}")


def resolve_train_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < YAML (`--config`) < flags given on the command line."""
    cfg = resolve_config(TrainConfig, argv)
    if cfg.preset not in PRESETS:
        raise UsageError(f"--preset {cfg.preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    objective = preset_objective(cfg)
    cfg = fill_objective(cfg, objective, ("learning_rate", "max_train_steps"))  # the optimizer's checks read them
    cfg = resolve_optimizer(cfg)  # before the rest of the objective: Prodigy's one rate for every group
    cfg = fill_objective(cfg, objective)
    cfg = resolve_resume_name(cfg)
    validate(cfg)
    return cfg


def resolve_optimizer(cfg: TrainConfig) -> TrainConfig:
    """--use_8bit_adam (deprecated) becomes --optimizer adamw8bit; prodigy and schedulefree get a
    constant LR schedule (they set their own step size); each change is one logged line. Prodigy
    takes one learning rate for every group: the text encoder's is --learning_rate (a preset's slower
    one does not apply; a different --text_encoder_lr given is refused)."""
    import logging

    log = logging.getLogger("ldm.config")
    if cfg.use_8bit_adam:
        if cfg.optimizer not in ("adamw", "adamw8bit"):
            raise UsageError(f"--use_8bit_adam with --optimizer {cfg.optimizer}: give only --optimizer")
        log.warning("--use_8bit_adam is deprecated: use --optimizer adamw8bit")
        cfg = replace(cfg, optimizer="adamw8bit", use_8bit_adam=False)
    if cfg.optimizer in ("prodigy", "schedulefree") and cfg.lr_scheduler != "constant":
        log.warning("--optimizer %s runs a constant LR schedule (it sets its own step size): --lr_scheduler %s "
                    "replaced by constant", cfg.optimizer, cfg.lr_scheduler)
        cfg = replace(cfg, lr_scheduler="constant")
    if cfg.optimizer == "schedulefree" and cfg.use_ema:
        log.warning("--optimizer schedulefree with --use_ema: the EMA averages the train-mode weights and is what "
                    "is saved; --no-use_ema saves schedule-free's own average (x)")
    if cfg.optimizer == "prodigy":
        if cfg.text_encoder_lr not in (None, cfg.learning_rate):
            raise UsageError(f"--optimizer prodigy takes one learning rate for every trained part: --text_encoder_lr "
                             f"{cfg.text_encoder_lr:g} differs from --learning_rate {cfg.learning_rate:g} (leave it unset)")
        cfg = replace(cfg, text_encoder_lr=cfg.learning_rate)
    if cfg.optimizer == "prodigy" and cfg.learning_rate < 0.1:
        log.warning("--optimizer prodigy: --learning_rate %g multiplies the step size Prodigy estimates (1.0 by "
                    "convention); an AdamW-sized rate makes every step that much smaller", cfg.learning_rate)
    return cfg


def preset_objective(cfg: TrainConfig) -> ObjectiveConfig:
    """What the flags left unset take: the preset's recipe when training from scratch, the usual
    Stable Diffusion objective when fine-tuning a pretrained model."""
    return ObjectiveConfig() if cfg.pretrained_model_name_or_path else model_preset(cfg.preset).objective


def default_config(cfg: TrainConfig) -> TrainConfig:
    """The defaults a run's model card compares against: the dataclass's, with the objective the
    run's preset (or fine-tuning) fills in for flags left unset."""
    return fill_objective(TrainConfig(), preset_objective(cfg))


def fill_objective(cfg: TrainConfig, objective: ObjectiveConfig, names: tuple[str, ...] | None = None) -> TrainConfig:
    """Objective flags that were not given (all, or `names`) take `objective`'s values;
    `--snr_gamma 0` means off."""
    names = names or tuple(f.name for f in dataclasses.fields(ObjectiveConfig))
    values = {name: getattr(objective, name) for name in names if getattr(cfg, name) is None}
    cfg = dataclasses.replace(cfg, **values)
    if cfg.snr_gamma == 0:
        cfg = dataclasses.replace(cfg, snr_gamma=None)
    return cfg


def resolve_config(cls: type, argv: list[str] | None = None, description: str | None = None) -> Any:
    """Any config dataclass with a `config` field: defaults < YAML < command-line flags."""
    parser = build_parser(cls)
    if description:
        parser.description = description
    given = vars(parser.parse_args(argv))
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if given.get("config"):
        from_yaml = load_yaml(given["config"])
        unknown = sorted(set(from_yaml) - set(hints))
        if unknown:
            raise UsageError(f"{given['config']}: unknown config keys {unknown} (see --help for the keys)")
        values.update({k: _coerce(k, v, hints[k], given["config"]) for k, v in from_yaml.items()})
    values.update(given)
    return cls(**values)


def resolve_resume_name(cfg: TrainConfig) -> TrainConfig:
    """`--resume_from_checkpoint checkpoint-500` (a bare name) is the one under --output_dir."""
    name = cfg.resume_from_checkpoint
    under = Path(cfg.output_dir) / "checkpoints" / str(name)
    if name and name != "latest" and not Path(name).exists() and under.is_dir():
        return dataclasses.replace(cfg, resume_from_checkpoint=str(under))
    return cfg


@dataclass
class VAETrainConfig:
    """`training/train_vae.py`: a KL-regularised autoencoder (Rombach et al. 2022, sec. 3)."""

    output_dir: str = _help("where the VAE (diffusers layout) goes", default="outputs/vae")
    train_data_dir: str | None = _help("image folder (default: --data)", default=None)
    data: str = _help("without --train_data_dir: builtin (the shapes) | diverse (shapes, gradients, textures, "
                      "text, scenes and scikit-image's photos: ldm/first_stage_data.py)", default="builtin")
    diverse_num_images: int = _help("--data diverse: images per epoch (generated on demand)", default=100000)
    diverse_mix: str = _help("--data diverse: shares to change, e.g. builtin=0.3,photo=0.3 (kinds: builtin, shapes, "
                             "gradient, texture, text, scene, photo; relative weights, the rest keep theirs)",
                             default="")
    image_column: str = _help("image column of the data set", default="image")
    caption_column: str = _help("unused: a VAE needs no captions (kept so that older configs load)",
                                default="text")
    builtin_num_images: int = _help("size of the built-in data set", default=4096)
    builtin_colors: str = _help("built-in set only: named (the captions' palette) | random (any RGB for objects "
                                "and background, so the VAE reproduces colours users bring) | mixed (half each)",
                                default="named")
    resolution: int = _help("image side", default=32)
    block_out_channels: list[int] = _help("channels per level; downsampling 2**(levels-1)",
                                          default_factory=lambda: [32, 64])
    layers_per_block: int = _help("resnet layers per level", default=1)
    latent_channels: int = _help("latent channels", default=4)
    norm_num_groups: int = _help("group norm groups", default=8)
    kl_weight: float = _help("weight of KL(q(z|x) || N(0, I)) against the summed L1 reconstruction",
                             default=1e-6)
    l2_weight: float = _help("weight of the squared error added to L1 (both per pixel element)", default=0.0)
    scale_equivariance_weight: float = _help(
        "weight of the scale-equivariance loss: the decoded 2x-downsampled latent against the 2x-downsampled "
        "image (Skorokhodov et al. 2025); smoother latents that a diffusion model learns faster", default=0.0)
    lpips_weights: str | None = _help("local LPIPS weights (the lpips package's full state dict, backbone + heads, "
                                      ".safetensors or .pth): adds the perceptual loss; never downloaded",
                                      default=None)
    perceptual_weight: float = _help("weight of LPIPS (with --lpips_weights)", default=1.0)
    disc_weight: float = _help("PatchGAN hinge loss weight, times the adaptive weight (0: no discriminator; "
                               "LDM: 0.5)", default=0.0)
    disc_start: int = _help("step at which the discriminator starts (LDM: 50001)", default=0)
    disc_channels: int = _help("discriminator channels at its first layer", default=64)
    pretrained_vae_name_or_path: str | None = _help(
        "fine-tune this VAE (diffusers folder, pipeline folder with vae/, hub id, or single-file SD VAE "
        ".safetensors) instead of building one from the architecture flags", default=None)
    single_file_config: str | None = _help("for a single-file VAE: a folder with its diffusers config.json "
                                           "(default: the sd15 preset's VAE)", default=None)
    train_decoder_only: bool = _help("freeze the encoder (latents stay as they are; sd-vae-ft-mse did this)",
                                     default=False)
    use_ema: bool = _help("keep an EMA of the weights and save it", default=False)
    ema_decay: float = _help("EMA decay (with warm-up)", default=0.999)
    gradient_checkpointing: bool = _help("trade compute for memory", default=False)
    checkpointing_steps: int = _help("save a resumable checkpoint every N steps (0: never)", default=0)
    checkpoints_total_limit: int | None = _help("keep at most N checkpoints", default=2)
    resume_from_checkpoint: str | None = _help("latest | a checkpoint folder", default=None)
    validation_steps: int = _help("reconstructions PNG every N steps (0: only at the end)", default=0)
    latent_shift: bool = _help("also store shift_factor = mean of the latents (z -> (z - shift) * scale)",
                               default=False)
    lr_warmup_steps: int = _help("linear warm-up steps of the cosine schedule", default=50)
    train_batch_size: int = _help("batch size per process", default=64)
    max_train_steps: int = _help("optimizer steps", default=1800)
    learning_rate: float = _help("peak learning rate (cosine decay after the warm-up)", default=2e-3)
    random_flip: bool = _help("random horizontal flips", default=True)
    mixed_precision: str | None = _help("no | fp16 | bf16", default=None)
    cpu_threads: int | None = _help("torch threads per process on CPU (default: $LDM_CPU_THREADS, else "
                                    "cores / processes on this machine)", default=None)
    seed: int = _help("seed", default=0)
    config: str | None = _help("YAML file of these same keys (flags given win)", default=None)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML. A run's own config (train_config.yaml, train_vae_config.yaml)
    reads back with its script's `--config`; model_config.yaml only records the resolved
    architecture (its keys are not flags, so `--config` refuses it)."""
    data = dataclasses.asdict(cfg)
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False))
