"""The checks a training run passes at startup, before models are built, data read or anything
written: each mistake is a `UsageError` naming the flag and value (one line at the command line).
`validate` runs them all on a resolved `TrainConfig` (`ldm.config.resolve_train_config`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ldm.errors import UsageError
from ldm.presets import PRESETS, denoiser_downsampling, model_preset

if TYPE_CHECKING:
    from ldm.config import TrainConfig


def validate(cfg: TrainConfig) -> None:
    """Refuse a run that cannot work, at startup: before models are built, data read or anything
    written. Each mistake is a `UsageError` naming the flag and value (one line at the command line)."""
    if cfg.preset not in PRESETS:
        raise UsageError(f"--preset {cfg.preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    if cfg.train_data_dir and cfg.dataset_name:
        raise UsageError("give --train_data_dir or --dataset_name, not both")
    if cfg.prediction_type not in (None, "epsilon", "v_prediction"):
        raise UsageError(f"--prediction_type must be epsilon or v_prediction, got {cfg.prediction_type!r}")
    for name in ("noise_offset", "input_perturbation"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.on_bad_data not in ("skip", "fail"):
        raise UsageError(f"--on_bad_data must be skip or fail, got {cfg.on_bad_data!r}")
    if cfg.lora_rank < 0:
        raise UsageError(f"--lora_rank must be >= 0, got {cfg.lora_rank}")
    if cfg.train_dtype not in ("float32", "float64"):
        raise UsageError(f"--train_dtype must be float32 or float64, got {cfg.train_dtype!r}")
    if cfg.train_dtype != "float32" and (cfg.lora_rank or cfg.mixed_precision not in (None, "auto", "no")):
        raise UsageError(f"--train_dtype {cfg.train_dtype} is for full training without mixed precision "
                         f"(got --lora_rank {cfg.lora_rank}, --mixed_precision {cfg.mixed_precision})")
    if bool(cfg.text_encoder_open_clip) != bool(cfg.text_encoder_weights):
        raise UsageError("--text_encoder_open_clip ARCH and --text_encoder_weights FILE go together")
    if cfg.text_encoder_layer not in ("last", "penultimate"):
        raise UsageError(f"--text_encoder_layer must be last or penultimate, got {cfg.text_encoder_layer!r}")
    if cfg.lora_rank and not cfg.pretrained_model_name_or_path:
        raise UsageError("--lora_rank adapts a pretrained model: give --pretrained_model_name_or_path")
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise UsageError(f"--caption_dropout must be in [0, 1), got {cfg.caption_dropout}")
    check_tags_and_prior(cfg)
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "max_image_pixels"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("num_validation_images", "validation_steps", "checkpointing_steps", "eval_images_per_case"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    from ldm.diffusion import timestep_probabilities  # fail now, not after the models are built

    try:
        timestep_probabilities(1000, cfg.timestep_bias_strategy, cfg.timestep_bias_multiplier,
                               cfg.timestep_bias_portion)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.timestep_bias_end_multiplier is not None and cfg.timestep_bias_end_multiplier < 0:
        raise UsageError(f"--timestep_bias_end_multiplier must be >= 0 (0: constant), "
                         f"got {cfg.timestep_bias_end_multiplier}")
    if cfg.mixed_precision not in (None, "auto", "no", "fp16", "bf16"):
        raise UsageError(f"--mixed_precision must be auto, no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.attention_backend not in ("auto", "sdpa", "xformers"):
        raise UsageError(f"--attention_backend must be auto, sdpa or xformers, got {cfg.attention_backend!r}")
    check_posthoc_ema(cfg)
    check_validation_data(cfg)
    from ldm.optimizers import check_optimizer  # the optional packages are found, not imported

    check_optimizer(cfg.optimizer)
    check_output_dir(cfg.output_dir)
    check_resume(cfg.resume_from_checkpoint)
    check_pretrained(cfg)
    check_resolution(cfg)
    if cfg.train_data_dir:  # the folder's layout and captions (no image is read yet)
        from ldm.datacheck import check_layout

        check_layout(cfg.train_data_dir, cfg.caption_column)


def check_posthoc_ema(cfg: TrainConfig) -> None:
    """--posthoc_ema needs snapshots (an interval), sigma_rels its profiles can have, and full weights."""
    if not cfg.posthoc_ema:
        return
    from ldm.posthoc_ema import MAX_SIGMA_REL

    for s in cfg.posthoc_ema_sigma_rels:
        if not 0 < s <= MAX_SIGMA_REL:
            raise UsageError(f"--posthoc_ema_sigma_rels {s}: must be in (0, {MAX_SIGMA_REL:.4f}]")
    if len(set(cfg.posthoc_ema_sigma_rels)) < 2:
        raise UsageError(f"--posthoc_ema_sigma_rels {cfg.posthoc_ema_sigma_rels}: give at least two different "
                         "values (the reconstruction combines profiles of different lengths)")
    if cfg.posthoc_ema_snapshot_steps is not None and cfg.posthoc_ema_snapshot_steps < 1:
        raise UsageError(f"--posthoc_ema_snapshot_steps must be >= 1, got {cfg.posthoc_ema_snapshot_steps}")
    if not (cfg.posthoc_ema_snapshot_steps or cfg.checkpointing_steps):
        raise UsageError("--posthoc_ema with --checkpointing_steps 0 needs --posthoc_ema_snapshot_steps N")
    if cfg.lora_rank:
        raise UsageError("--posthoc_ema with --lora_rank is not supported (the snapshots hold full weights)")


def check_validation_data(cfg: TrainConfig) -> None:
    """--validation_split in [0, 1), or --validation_data_dir (a usable folder other than the training
    one), not both; --validation_loss_timesteps >= 1."""
    if not 0.0 <= cfg.validation_split < 1.0:
        raise UsageError(f"--validation_split must be in [0, 1), got {cfg.validation_split}")
    if cfg.validation_loss_timesteps < 1:
        raise UsageError(f"--validation_loss_timesteps must be >= 1, got {cfg.validation_loss_timesteps}")
    if not cfg.validation_data_dir:
        return
    if cfg.validation_split:
        raise UsageError("give --validation_split or --validation_data_dir, not both")
    if cfg.train_data_dir and Path(cfg.validation_data_dir).resolve() == Path(cfg.train_data_dir).resolve():
        raise UsageError(f"--validation_data_dir {cfg.validation_data_dir} is the training folder: its images "
                         "would be trained on (use --validation_split to hold some out)")
    from ldm.datacheck import check_layout

    try:
        check_layout(cfg.validation_data_dir, cfg.caption_column)
    except UsageError as e:
        raise UsageError(f"--validation_data_dir {e}") from None


def check_tags_and_prior(cfg: TrainConfig) -> None:
    """--keep_tokens, --tag_dropout, and the prior-preservation flags (`ldm.prior`)."""
    if cfg.keep_tokens < 0:
        raise UsageError(f"--keep_tokens must be >= 0, got {cfg.keep_tokens}")
    if not 0.0 <= cfg.tag_dropout < 1.0:
        raise UsageError(f"--tag_dropout must be in [0, 1), got {cfg.tag_dropout}")
    if not cfg.class_data_dir:
        if cfg.class_prompt:
            raise UsageError("--class_prompt is for prior preservation: give --class_data_dir too")
        return
    if not cfg.class_prompt or not cfg.class_prompt.strip():
        raise UsageError("--class_data_dir needs --class_prompt (the class images' caption, e.g. 'a photo of a dog')")
    if cfg.num_class_images < 1:
        raise UsageError(f"--num_class_images must be >= 1, got {cfg.num_class_images}")
    if cfg.prior_loss_weight < 0:
        raise UsageError(f"--prior_loss_weight must be >= 0, got {cfg.prior_loss_weight}")
    if cfg.aspect_buckets:
        raise UsageError("--class_data_dir trains square images: drop --aspect_buckets")
    if Path(cfg.class_data_dir).exists() and not Path(cfg.class_data_dir).is_dir():
        raise UsageError(f"--class_data_dir {cfg.class_data_dir}: not a folder")
    from ldm.prior import count_images

    have = count_images(cfg.class_data_dir)
    if have < cfg.num_class_images and not cfg.pretrained_model_name_or_path:
        raise UsageError(f"--class_data_dir {cfg.class_data_dir} holds {have} of --num_class_images "
                         f"{cfg.num_class_images} images; generating the rest needs the base model: give "
                         "--pretrained_model_name_or_path")


def check_output_dir(output_dir: str, flag: str = "--output_dir") -> None:
    """The output folder, or the first of its parents that exists, must be a folder."""
    for path in (Path(output_dir), *Path(output_dir).parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == Path(output_dir) else f" (its parent {path} is a file)"
                raise UsageError(f"{flag} {output_dir}: not a folder{where}")
            return


def check_resume(resume: str | None) -> None:
    """"latest", or a complete checkpoint folder (checkpoint-<step> holding its completion marker)."""
    if not resume or resume == "latest":
        return
    from ldm.checkpoint import MARKER, complete_checkpoints

    path = Path(resume)
    if not path.is_dir():
        raise UsageError(f"--resume_from_checkpoint {resume}: no such checkpoint folder (give 'latest', or a "
                         f"checkpoint-<step> folder or its name under --output_dir/checkpoints)")
    if path.resolve() not in [p.resolve() for _, p in complete_checkpoints(path.parent.parent)]:
        raise UsageError(f"--resume_from_checkpoint {resume}: not a complete checkpoint folder "
                         f"(checkpoint-<step> with a {MARKER} marker)")


def check_pretrained(cfg: TrainConfig) -> None:
    """--pretrained_model_name_or_path and --pretrained_vae_name_or_path point at something loadable
    (`ldm.hub`: a local folder with the expected parts, a single file, or a reachable hub id)."""
    from ldm import hub

    if cfg.pretrained_model_name_or_path:
        hub.check_pipeline_source(cfg.pretrained_model_name_or_path)
    if cfg.pretrained_vae_name_or_path and cfg.pretrained_vae_name_or_path != "none":
        hub.check_vae_source(cfg.pretrained_vae_name_or_path)
    if cfg.single_file_config:
        hub.check_pipeline_source(cfg.single_file_config, "--single_file_config")


def model_downsampling(cfg: TrainConfig) -> tuple[int, int] | None:
    """(VAE factor, denoiser factor) of the model the run trains, read from the preset or from local
    config.json files; None when a pretrained part's configs are not on disk (a hub id)."""
    from ldm import hub

    preset = model_preset(cfg.preset)
    denoiser = preset.dit.patch_size if preset.dit else 2 ** (len(preset.unet.block_out_channels) - 1)
    vae_levels = len(preset.vae.block_out_channels)
    vae_source = cfg.pretrained_vae_name_or_path
    if cfg.pretrained_model_name_or_path:
        source = cfg.single_file_config or cfg.pretrained_model_name_or_path
        if Path(source).is_file():  # a single file without --single_file_config: the sd15 preset's configs
            sd15 = model_preset("sd15")
            denoiser, vae_levels = 2 ** (len(sd15.unet.block_out_channels) - 1), len(sd15.vae.block_out_channels)
        else:
            net = hub.local_config(source, "unet/config.json", "transformer/config.json")
            vae = hub.local_config(source, "vae/config.json")
            if net is None or vae is None:
                return None
            denoiser, vae_levels = denoiser_downsampling(net), len(vae["block_out_channels"])
    elif vae_source is None:
        vae_source = preset.pretrained_vae
    if vae_source and vae_source != "none":
        vae = hub.local_config(vae_source, "vae/config.json", "config.json")
        if vae is None:
            return None
        vae_levels = len(vae["block_out_channels"])
    return 2 ** (vae_levels - 1), denoiser


def check_resolution(cfg: TrainConfig) -> None:
    """--resolution > 0 and a multiple of the VAE's times the denoiser's downsampling (the pipeline
    refuses other sizes), naming the nearest valid ones."""
    from ldm import hub

    resolution = cfg.resolution if cfg.resolution is not None else model_preset(cfg.preset).resolution
    factors = model_downsampling(cfg)
    step = factors[0] * factors[1] if factors else 1
    if resolution > 0 and resolution % step == 0:
        return
    below = resolution // step * step
    nearest = " or ".join(str(r) for r in (below, below + step) if r > 0) or str(step)
    net = "DiT's patch" if model_preset(cfg.preset).dit or (cfg.pretrained_model_name_or_path and hub.local_config(
        cfg.single_file_config or cfg.pretrained_model_name_or_path, "transformer/config.json")) else "U-Net's"
    why = f"a multiple of {step} (the VAE's x{factors[0]} times the {net} x{factors[1]} downsampling)" \
        if factors and step > 1 else "a positive number of pixels"
    raise UsageError(f"--resolution {resolution}: must be {why}; nearest: {nearest}")
