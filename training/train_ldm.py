"""Train a text-to-image latent diffusion model (Rombach et al. 2022) with Accelerate.

    accelerate launch --config_file accelerate_config.yaml training/train_ldm.py [--flags]

Read top to bottom: config -> models -> data -> optimizer -> resume -> loop (encode, noise,
predict, loss, step, EMA, log, checkpoint, validate) -> save the pipeline in diffusers layout.
The setup each step needs lives in `ldm/` (models, data, checkpoint, trace); the loop is here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch training/train_ldm.py` runs this as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # --help without importing torch (seconds)
    from ldm.config import exit_early_for_help

    exit_early_for_help()
    gc.disable()  # until the imports are done (the end of this file)

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.data_loader import prepare_data_loader
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, parse_flag_from_env, set_seed
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ldm import checkpoint as ckpt
from ldm.attention import configure_attention
from ldm.cache import TextEmbeddingCache, first_moments
from ldm.captions import TagOptions, tag_captions, with_prefix
from ldm.config import TrainConfig, resolve_train_config, save_config
from ldm.data import load_captioned_dataset, pick_caption, set_loader_epoch, training_dataloader
from ldm.diffusion import (add_noise, annealed_multiplier, gather, min_snr_weight, offset_noise, perturb_noise,
                           snr, timestep_probabilities, training_target)
from ldm.draws import categorical, randn, sample_generators
from ldm.ema import TrainingEMA
from ldm.evaluation import evaluate_pipeline, held_out_cases, save_report, summary
from ldm.images import labelled_grid
from ldm.errors import run_cli
from ldm.lora import save_lora, trainable_parameters
from ldm.masks import latent_mask, masked_mean
from ldm.model_card import caption_stats, write_model_card
from ldm.models import (components_for_training, count_parameters, denoise, denoiser_kwargs, image_size_divisor,
                        prepare_for_training, training_dtypes, with_resolution)
from ldm.open_clip_text import use_text_encoder, with_open_clip_text
from ldm.plots import write_training_curves
from ldm.prior import class_dataset, ensure_class_images, prior_preservation_loss, with_class_data
from ldm.posthoc_ema import SNAPSHOT_DIR, PowerEMA, named_trainable, prune_snapshots, save_snapshots, snapshot_due
from ldm.presets import ModelConfig, model_preset
from ldm.run_folder import check_output_dir, clear_run_files
from ldm.optimizers import evaluation_weights, make_optimizer, set_train_mode
from ldm.runtime import (GracefulStop, StopRequested, effective_global_batch, gpu_settings, requested_mixed_precision,
                         resolve_mixed_precision, throughput, use_cpu_cores)
from ldm.schedulers import make_sampler, training_scheduler
from ldm.text import drop_captions, encode_tokens, tokenize
from ldm.trace import StepTrace
from ldm.validation_loss import (caption_encoder, encode_held_out, eval_mode, fixed_captions,
                                 timestep_grid, validation_data, validation_loss, validation_summary)
from ldm.vae_utils import first_stage_fit
from pipelines import TextToImagePipeline

logger = get_logger("train_ldm")


def all_finite(loss: torch.Tensor, accelerator: Accelerator) -> bool:
    """Whether the loss is finite on every process (one all-reduce when there are several)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


@contextlib.contextmanager
def ema_weights(emas: dict[str, EMAModel], modules: dict[str, torch.nn.Module]):
    """The EMA weights in place of the trained ones inside the block; the trained ones after."""
    for name, ema in emas.items():
        ema.store(trainable_parameters(modules[name]))
        ema.copy_to(trainable_parameters(modules[name]))
    try:
        yield
    finally:
        for name, ema in emas.items():
            ema.restore(trainable_parameters(modules[name]))


def validate(pipe: TextToImagePipeline, cfg: TrainConfig, accelerator: Accelerator, step: int, *, resolution: int,
             half: torch.dtype | None, stop: GracefulStop) -> None:
    """A grid of the validation prompts (rows: prompts, each labelled; the step in the title) at
    samples/step_<step>.png."""
    n = cfg.num_validation_images
    gens = [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(cfg.validation_prompts) * n)]
    try:
        with torch.autocast(accelerator.device.type, enabled=half is not None, dtype=half):
            images = pipe(cfg.validation_prompts, num_images_per_prompt=n, generator=gens,
                          num_inference_steps=cfg.validation_inference_steps,
                          guidance_scale=cfg.validation_guidance_scale, height=resolution, width=resolution,
                          callback_on_step_end=lambda *args: stop.check() or {}).images
    except StopRequested:
        logger.warning("validation at step %d interrupted by the stop request", step)
        return
    except FloatingPointError as err:  # e.g. a half-precision overflow: training itself may be fine
        logger.warning("validation at step %d gave no grid: %s", step, err)
        return
    (Path(cfg.output_dir) / "samples").mkdir(exist_ok=True)
    grid = labelled_grid(images, rows=len(cfg.validation_prompts), cols=n, row_labels=cfg.validation_prompts,
                         title=f"step {step}")
    grid.save(Path(cfg.output_dir) / "samples" / f"step_{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    write_training_curves(cfg.output_dir)


def start(cfg: TrainConfig) -> tuple[Accelerator, TrainConfig]:
    """The run's Accelerator, logging and CPU threads; `cfg` with the mixed precision that runs.
    Nothing is written to the output folder yet (`write_run_files`)."""
    out = Path(cfg.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    asked = requested_mixed_precision(cfg.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION"))
    if asked == "auto" and cfg.train_dtype != "float32":  # float64 numerical checks: no mixed precision
        asked = "no"
    # ACCELERATE_USE_CPU must reach the shared state created here, or each process of a CPU group
    # would see a world of its own
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    precision = resolve_mixed_precision(asked, device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
    if asked == "fp16" and precision == "no":  # accelerate would silently run float32
        logging.getLogger("train_ldm").warning("fp16 mixed precision needs a GPU; running float32 on the CPU "
                                               "(bf16 works on CPUs); recorded as mixed_precision: no")
    cfg = dataclasses.replace(cfg, mixed_precision=precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Same shuffled order on every process (each takes its own shard), reseeded per epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    for noisy in ("httpx", "datasets", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if accelerator.device.type == "cpu":
        use_cpu_cores(accelerator.num_processes, cfg.cpu_threads)
    logger.info("processes: %d, device: %s (%d threads), mixed precision: %s", accelerator.num_processes,
                accelerator.device, torch.get_num_threads(), accelerator.mixed_precision)
    return accelerator, dataclasses.replace(cfg, mixed_precision=accelerator.mixed_precision)


def write_run_files(cfg: TrainConfig, model_cfg: ModelConfig, previous_run: list[Path]) -> None:
    """Main process, once every check has passed: clear a previous run (--overwrite_output_dir)
    and leftovers of failed saves, then write the resolved configs."""
    out = Path(cfg.output_dir)
    clear_run_files(previous_run)
    for stale in ckpt.clean_stale_temps(out):
        logger.warning("removed %s, left by a save that did not finish", stale)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "train_config.yaml")
    save_config(model_cfg, out / "model_config.yaml")


def check_first_stage(vae, dataset, cfg: TrainConfig, resolution: int, cached=None) -> float:
    """PSNR of the frozen VAE's reconstructions of up to 32 training images, logged; a warning
    naming the command that trains a VAE on this data when it is too low to learn from. `cached`:
    the training loader's data set; a square latent cache's posteriors of these images are decoded
    (not encoded again)."""
    from ldm.data import image_transform, to_rgb

    n = min(32, len(dataset))
    tf = image_transform(resolution, center_crop=True, random_flip=False)  # the square cache's transform
    images = torch.stack([tf(to_rgb(dataset[i]["image"])) for i in range(n)])
    moments = first_moments(cached, n) if cached is not None and not cfg.aspect_buckets else None
    value, warning = first_stage_fit(vae, images, moments=moments, data_dir=cfg.train_data_dir or "DIR",
                                     vae_dir=str(Path(cfg.output_dir).parent / "vae"))
    logger.info("first stage: %.1f dB PSNR on %d training images", value, n)
    if warning:
        logger.warning(warning)
    return value


def cache_text(cfg: TrainConfig, accelerator: Accelerator, text_encoder, tokenizer, cells: list,
               procs: dict) -> TextEmbeddingCache:
    """A frozen text encoder's output for every caption of `cells`, encoded once (into --cache_dir,
    else in memory)."""
    text_cache = TextEmbeddingCache(cfg.cache_dir, text_encoder, tokenizer, in_memory=cfg.cache_in_memory,
                                    settings={"autocast": accelerator.mixed_precision})
    with accelerator.autocast():  # as the prepared encoder runs in the loop
        logger.info("text cache: %s", text_cache.ensure(cells, **procs))
    return text_cache


def make_class_images(cfg: TrainConfig, comps, scheduler_config, accelerator: Accelerator, resolution: int,
                      half: torch.dtype | None) -> None:
    """Prior preservation: the class images --class_data_dir lacks, generated by the base model
    before its first step (ldm/prior.py; validation's sampler steps and guidance)."""
    pipe = TextToImagePipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                               **denoiser_kwargs(comps.denoiser), scheduler=make_sampler(cfg.sampler, scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    with torch.autocast(accelerator.device.type, enabled=half is not None, dtype=half):
        made = ensure_class_images(
            cfg.class_data_dir, pipe.to(accelerator.device), prompt=cfg.class_prompt, num_images=cfg.num_class_images,
            seed=cfg.seed, resolution=resolution, num_inference_steps=cfg.validation_inference_steps,
            guidance_scale=cfg.validation_guidance_scale, batch_size=cfg.train_batch_size,
            base_model=cfg.pretrained_model_name_or_path, rank=accelerator.process_index,
            world_size=accelerator.num_processes, wait_for_everyone=accelerator.wait_for_everyone)
    logger.info("prior preservation: %d class images generated in %s", made, cfg.class_data_dir)


def save_pipeline(pipe: TextToImagePipeline, cfg: TrainConfig, *, train_te: bool, run_info: dict,
                  captions: list) -> None:
    """The trained model in diffusers layout (with --lora_rank: the adapters alone), the held-out
    score on the built-in data (eval/), run_info.json, training_curves.png and the model card."""
    out = Path(cfg.output_dir)
    if cfg.lora_rank:  # the adapters alone (small); load with pipe.load_lora_weights(out)
        save_lora(out, pipe.denoiser, pipe.text_encoder if train_te else None,
                  info={"base_model": cfg.pretrained_model_name_or_path, "rank": cfg.lora_rank,
                        "alpha": cfg.lora_alpha or cfg.lora_rank})
    else:
        pipe.save_pretrained(out)
    if cfg.eval_images_per_case and not (cfg.train_data_dir or cfg.dataset_name):
        report, images = evaluate_pipeline(pipe, held_out_cases(), images_per_case=cfg.eval_images_per_case,
                                           guidance_scale=cfg.validation_guidance_scale, seed=cfg.seed)
        path = save_report(report, images, out / "eval", cfg.eval_images_per_case,
                           title=f"step {run_info.get('global_step')}")
        logger.info("held-out compositions: %s -> %s", summary(report), path)
        print(f"held-out compositions: {summary(report)}")
    else:
        report = None
    run_info = {**run_info, "torch": torch.__version__}
    (out / "run_info.json").write_text(json.dumps(run_info, indent=2) + "\n")
    if run_info.get("final_loss") is not None:
        write_training_curves(out)
    grids = sorted((out / "samples").glob("step_*.png"))
    captions = [c for cell in captions for c in ([cell] if isinstance(cell, str) else cell)]  # cells may hold several
    write_model_card(out, cfg.to_dict(), run_info=run_info, defaults=TrainConfig().to_dict(),
                     data_stats={"source": cfg.train_data_dir or cfg.dataset_name or "built-in shapes",
                                 "size": run_info.get("num_examples"),
                                 **({"captions": caption_stats(captions)} if captions else {})},  # none: unknown
                     metrics={"final_loss": run_info.get("final_loss"), **({"held_out": report} if report else {}),
                              # the saved weights' (the EMA's with --use_ema)
                              "val_loss": run_info.get("final_val_loss_ema", run_info.get("final_val_loss"))},
                     grid=grids[-1] if grids else None)
    logger.info("saved pipeline to %s", out)


def main(argv: list[str] | None = None) -> Path:
    started = time.perf_counter()
    cfg: TrainConfig = resolve_train_config(argv)
    model_cfg = with_resolution(model_preset(cfg.preset), cfg.resolution)
    model_cfg, open_clip_text = with_open_clip_text(model_cfg, cfg.text_encoder_open_clip, cfg.text_encoder_weights,
                                                    cfg.text_encoder_layer)  # converted to a CLIPTextModel
    out = Path(cfg.output_dir)
    # One run per folder: another run's files there are refused (or cleared, once all checks pass)
    previous_run = check_output_dir(out, resuming=bool(cfg.resume_from_checkpoint), overwrite=cfg.overwrite_output_dir)
    accelerator, cfg = start(cfg)

    # ---------------------------------------------------------------- 1. models
    weight_dtype, train_dtype = training_dtypes(accelerator.mixed_precision, cfg.train_dtype)
    half = weight_dtype if weight_dtype in (torch.float16, torch.bfloat16) else None
    set_seed(cfg.seed)  # same initial weights on every process
    pretrained_vae = cfg.pretrained_vae_name_or_path
    if pretrained_vae is None and not cfg.pretrained_model_name_or_path:
        pretrained_vae = model_cfg.pretrained_vae  # the preset's own first stage
    comps = components_for_training(model_cfg, pretrained=cfg.pretrained_model_name_or_path,
                                    pretrained_vae=None if pretrained_vae == "none" else pretrained_vae,
                                    prediction_type=cfg.prediction_type, seed=cfg.seed,
                                    single_file_config=cfg.single_file_config)
    use_text_encoder(comps, open_clip_text)  # --text_encoder_open_clip's tower in place of the CLIP one
    # `unet` is the denoiser: the U-Net, or the DiT of a transformer preset (ldm.models.denoise calls either)
    vae, text_encoder, tokenizer, unet = comps.vae, comps.text_encoder, comps.tokenizer, comps.denoiser
    # x_t is drawn from this schedule (zero-terminal-SNR rescale applied), and SNR weights from its alphas
    noise_scheduler = training_scheduler(comps.noise_scheduler.config, zero_terminal_snr=cfg.zero_terminal_snr)
    prediction_type = noise_scheduler.config.prediction_type
    if cfg.class_data_dir:  # DreamBooth: the missing class images, from the model as it is before training
        make_class_images(cfg, comps, noise_scheduler.config, accelerator, model_cfg.resolution, half)
    trained = prepare_for_training(comps, train_text_encoder=cfg.train_text_encoder,
                                   train_token_embedding=cfg.train_token_embedding, lora_rank=cfg.lora_rank,
                                   lora_alpha=cfg.lora_alpha, weight_dtype=weight_dtype, train_dtype=train_dtype,
                                   gradient_checkpointing=cfg.gradient_checkpointing)  # name -> module
    train_te = "text_encoder" in trained
    configure_attention([unet, vae], cfg.attention_backend, accelerator.device, weight_dtype)  # + flash check
    gpu_settings(unet, vae, accelerator.device, channels_last=cfg.channels_last, torch_compile=cfg.torch_compile)
    logger.info("parameters: unet %.2fM, vae %.2fM (frozen), text encoder %.2fM (%s); prediction: %s",
                count_parameters(unet) / 1e6, count_parameters(vae) / 1e6,
                count_parameters(text_encoder) / 1e6, "trained" if train_te else "frozen", prediction_type)
    # diffusers' EMAModel, updated in one in-place pass (same weights, ~3x less time: ldm/ema.py)
    emas = {name: TrainingEMA(trainable_parameters(m), decay=cfg.ema_decay, use_ema_warmup=True, foreach=True)
            for name, m in trained.items()} if cfg.use_ema else {}

    # ---------------------------------------------------------------- 2. data
    stop = GracefulStop()  # SIGTERM / SIGINT: checkpoint at the next step boundary, exit 0
    dataset = load_captioned_dataset(
        train_data_dir=cfg.train_data_dir, dataset_name=cfg.dataset_name, image_column=cfg.image_column,
        caption_column=cfg.caption_column, builtin_num_images=cfg.builtin_num_images,
        resolution=model_cfg.resolution, seed=cfg.seed, on_bad_data=cfg.on_bad_data,
        max_image_pixels=cfg.max_image_pixels, tokenizer=tokenizer)
    if cfg.max_train_samples:
        dataset = dataset.select(range(min(cfg.max_train_samples, len(dataset))))
    dataset, tags = with_prefix(dataset, cfg.caption_prefix), TagOptions.from_config(cfg)  # tag-style captions
    # Held-out images for the validation loss (never trained on): a seeded split, or a folder
    dataset, held_out_rows = validation_data(dataset, split=cfg.validation_split, data_dir=cfg.validation_data_dir,
                                             seed=cfg.seed, caption_column=cfg.caption_column,
                                             on_bad_data=cfg.on_bad_data, max_image_pixels=cfg.max_image_pixels,
                                             tokenizer=tokenizer)
    held_out_captions = fixed_captions(held_out_rows["text"], cfg.seed) if held_out_rows is not None else []
    num_instance = len(dataset) if cfg.class_data_dir else None  # prior preservation: class rows after these
    if cfg.class_data_dir:
        dataset = with_class_data(dataset, class_dataset(cfg.class_data_dir, cfg.class_prompt, cfg.num_class_images,
                                                         max_image_pixels=cfg.max_image_pixels))
    global_batch = effective_global_batch(cfg, accelerator.num_processes, len(dataset))
    procs = dict(rank=accelerator.process_index, world_size=accelerator.num_processes,
                 wait_for_everyone=accelerator.wait_for_everyone, should_stop=stop.check)
    vae.to(accelerator.device)  # frozen: encodes the cached latents, or each batch in the loop
    held_out = encode_held_out(held_out_rows, vae, resolution=model_cfg.resolution, seed=cfg.seed) \
        if held_out_rows is not None and accelerator.is_main_process else None  # the main process computes val_loss
    text_cache = None
    try:  # the frozen VAE (and a frozen text encoder, with --cache_dir) encode the data once
        dataloader, sampler = training_dataloader(
            dataset, resolution=model_cfg.resolution, batch_size=cfg.train_batch_size, seed=cfg.seed, vae=vae,
            bucket_divisor=image_size_divisor(vae.config, unet.config) if cfg.aspect_buckets else None,
            bucket_no_upscale=cfg.bucket_no_upscale, cache_latents=cfg.cache_latents, cache_dir=cfg.cache_dir,
            cache_in_memory=cfg.cache_in_memory, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
            num_workers=cfg.dataloader_num_workers, num_instance=num_instance, **procs)
        if cfg.cache_text_embeddings and not train_te and not tags.random:  # in memory, or under --cache_dir
            text_cache = cache_text(cfg, accelerator, text_encoder.to(accelerator.device, dtype=weight_dtype),
                                    tokenizer, [*dataset["text"], *held_out_captions], procs)
    except StopRequested:
        pass
    if stop.agreed(accelerator):  # nothing trained yet: nothing to save
        logger.warning("stopped while caching latents (before step 1); nothing to save")
        stop.restore()
        return out
    # after the cache: the sampled images' cached latents are decoded, not encoded a second time
    first_stage_psnr = check_first_stage(vae, dataset, cfg, model_cfg.resolution, cached=dataloader.dataset) \
        if accelerator.is_main_process else None

    # ---------------------------------------------------------------- 3. optimizer
    base_lrs = [cfg.learning_rate, *([cfg.text_encoder_lr or cfg.learning_rate] if train_te else [])]
    groups = [{"params": trainable_parameters(m), "lr": lr} for m, lr in zip([unet, text_encoder], base_lrs)]
    optimizer = make_optimizer(cfg.optimizer, groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                               weight_decay=cfg.adam_weight_decay, warmup_steps=cfg.lr_warmup_steps)
    # The prepared scheduler steps once per process per optimizer step, hence the factor.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    if sampler is None:
        dataloader = accelerator.prepare(dataloader)
    else:  # already sharded: wrapped (device placement, end-of-epoch accumulation sync), not re-sharded
        dataloader = prepare_data_loader(dataloader, accelerator.device, num_processes=1, process_index=0,
                                         put_on_device=True)
    # Frozen parts in the compute dtype; the VAE stays float32 under fp16 (SD's VAE overflows).
    if weight_dtype == torch.bfloat16:
        vae.to(dtype=torch.bfloat16)
    if not train_te:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    for ema in emas.values():
        ema.to(accelerator.device)
    ema_params = {name: trainable_parameters(trained[name]) for name in emas}  # once, after prepare
    # --posthoc_ema: power-function EMAs whose snapshots rebuild any EMA length later (training/posthoc_ema.py)
    posthoc = PowerEMA(named_trainable(trained), tuple(cfg.posthoc_ema_sigma_rels)) if cfg.posthoc_ema else None
    extra_state = {"posthoc_ema": posthoc} if posthoc else {}  # saved with each checkpoint, restored on resume
    alpha_bar = noise_scheduler.alphas_cumprod.to(accelerator.device)  # (T,)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    timestep_probs = timestep_probabilities(num_timesteps, cfg.timestep_bias_strategy,
                                            cfg.timestep_bias_multiplier, cfg.timestep_bias_portion).float()
    steps_per_epoch = math.ceil(len(dataloader) / cfg.gradient_accumulation_steps)
    num_epochs = math.ceil(cfg.max_train_steps / steps_per_epoch)

    # ---------------------------------------------------------------- 4. resume
    # What defines the run, in every checkpoint's marker: resuming a different run is refused.
    fingerprint = ckpt.run_fingerprint(cfg, model_cfg, world_size=accelerator.num_processes,
                                       zero_terminal_snr=noise_scheduler.config.rescale_betas_zero_snr,
                                       pretrained_vae=pretrained_vae, prediction_type=prediction_type,
                                       trained=list(trained), data=ckpt.data_fingerprint(dataset))
    resumed = ckpt.resume(accelerator, out, cfg.resume_from_checkpoint, fingerprint, emas,
                          allow_config_drift=cfg.allow_config_drift, lr_scheduler=lr_scheduler,
                          learning_rates=base_lrs, extra=extra_state)  # its step, or None
    set_train_mode(optimizer, True)  # Schedule-Free: a checkpoint holds x (saved in eval mode); train from y
    global_step = resumed or 0
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * cfg.gradient_accumulation_steps
    if accelerator.is_main_process:
        write_run_files(cfg, model_cfg, previous_run)
        if redone := prune_snapshots(out / SNAPSHOT_DIR, global_step):  # another run's, or steps to be redone
            logger.warning("removed %d post-hoc EMA snapshots of steps after %d", len(redone), global_step)
    trace = StepTrace(out / "train_log.jsonl", resumed_step=resumed, enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_ldm", config={k: v for k, v in cfg.to_dict().items()
                                                        if isinstance(v, (int, float, str, bool))})

    def build_pipeline() -> TextToImagePipeline:
        pipe = TextToImagePipeline(vae=vae, text_encoder=accelerator.unwrap_model(text_encoder),
                                   tokenizer=tokenizer, **denoiser_kwargs(accelerator.unwrap_model(unet)),
                                   scheduler=make_sampler(cfg.sampler, noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_checkpoint(step: int) -> None:
        with evaluation_weights(optimizer, restore=False):  # Schedule-Free: save x, then y from it as a resume does
            ckpt.save(accelerator, out, step, fingerprint, {"unet": unet, "text_encoder": text_encoder}, emas,
                      keep=cfg.checkpoints_total_limit, extra=extra_state)

    def save_posthoc_snapshots(step: int, *, end: bool = False) -> None:
        # in the loop: every interval; at the end: unless the last step was one (written already)
        if posthoc is not None and accelerator.is_main_process:
            if snapshot_due(step, cfg.posthoc_ema_snapshot_steps or cfg.checkpointing_steps) != end:
                save_snapshots(posthoc, out / SNAPSHOT_DIR, step)

    def validate_with_ema(step: int) -> None:
        with evaluation_weights(optimizer):  # every process (Schedule-Free: x inside)
            if accelerator.is_main_process and cfg.validation_prompts and cfg.num_validation_images:
                with ema_weights(emas, trained):
                    validate(build_pipeline(), cfg, accelerator, step, resolution=model_cfg.resolution, half=half,
                             stop=stop)

    def held_out_losses(step: int) -> dict:
        """val_loss (and val_loss_ema) over the held-out set, every --validation_steps and at the end."""
        due = step >= cfg.max_train_steps or (cfg.validation_steps and step % cfg.validation_steps == 0)
        if held_out_rows is None or not due:
            return {}
        with evaluation_weights(optimizer):  # every process (Schedule-Free: x inside)
            if not accelerator.is_main_process:
                return {}
            model, te = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
            loss = functools.partial(
                validation_loss, model, held_out, caption_encoder(te, tokenizer, text_cache, weight_dtype),
                alpha_bar=alpha_bar, grid=timestep_grid(num_timesteps, cfg.validation_loss_timesteps),
                prediction_type=prediction_type, snr_gamma=cfg.snr_gamma, seed=cfg.seed,
                scaling_factor=vae.config.scaling_factor, batch_size=cfg.train_batch_size, dtype=train_dtype)
            with eval_mode(model, te), accelerator.autocast():
                losses = {"val_loss": loss()}
                if emas:
                    with ema_weights(emas, trained):
                        losses["val_loss_ema"] = loss()
            return losses

    # ---------------------------------------------------------------- 5. train
    logger.info("training: %d examples, %d steps, global batch %d, %d epochs", len(dataset),
                cfg.max_train_steps, global_batch, num_epochs)
    progress = tqdm(range(cfg.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    loss_sum, loss_count, loss = torch.zeros((), device=accelerator.device), 0, torch.zeros(())
    bad_update, skipped, consecutive_bad, stopped = False, 0, 0, False
    step_loss = None
    for epoch in range(first_epoch, num_epochs):
        if global_step >= cfg.max_train_steps:  # resumed from a checkpoint at or past the end
            break
        set_loader_epoch(dataloader, epoch)  # the shuffle, and the random crops and flips
        batches = dataloader
        if epoch == first_epoch and skip_batches:  # resume mid-epoch: the batches not yet done
            batches = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch in batches:
            with accelerator.accumulate(unet, text_encoder):
                # Every draw of a sample comes from its own generator, keyed by (seed, step, index):
                # the same whatever the batch split, process count or resume (ldm/draws.py).
                gens = sample_generators(cfg.seed, global_step, batch["index"].tolist())
                with torch.no_grad():  # z ~ q(z|x), scaled: (B, C, H/f, W/f)
                    if "moments" in batch:  # cached posterior parameters
                        posterior = DiagonalGaussianDistribution(batch["moments"].to(accelerator.device))
                    else:
                        posterior = vae.encode(batch["pixel_values"].to(accelerator.device, vae.dtype)).latent_dist
                    latents = posterior.sample(generator=gens).to(train_dtype) * vae.config.scaling_factor
                noise = offset_noise(randn(latents.shape, gens, latents.device, train_dtype), cfg.noise_offset, gens)
                if cfg.timestep_bias_end_multiplier:  # annealed bias (0 / None: constant): this step's weights
                    timestep_probs = timestep_probabilities(
                        num_timesteps, cfg.timestep_bias_strategy,
                        annealed_multiplier(cfg.timestep_bias_multiplier, cfg.timestep_bias_end_multiplier,
                                            global_step, cfg.max_train_steps), cfg.timestep_bias_portion).float()
                timesteps = categorical(timestep_probs, gens).to(latents.device)
                a_t = gather(alpha_bar, timesteps)  # (B,)
                noisy = add_noise(latents, perturb_noise(noise, cfg.input_perturbation, gens), a_t)  # x_t, DDPM eq. 4
                captions = [pick_caption(cell, g) for cell, g in zip(batch["text"], gens)]
                captions = tag_captions(captions, tags, gens, untouched=batch.get("prior"))  # class prompts stay
                captions = drop_captions(captions, cfg.caption_dropout, generator=gens)
                if text_cache is not None:
                    context = text_cache.lookup(captions).to(accelerator.device, weight_dtype)  # (B, L, D), encoded up front
                else:
                    ids = tokenize(tokenizer, captions).to(accelerator.device)
                    with torch.set_grad_enabled(train_te):
                        context = encode_tokens(text_encoder, ids)  # (B, L, D)
                pred = denoise(unet, noisy, timesteps, context)  # (B, C, h, w): epsilon or v
                target = training_target(prediction_type, latents, noise, a_t)
                loss = F.mse_loss(pred.to(train_dtype), target.to(train_dtype), reduction="none")  # (B, C, h, w)
                loss = masked_mean(loss, latent_mask(batch, latents))  # (B,): the mean over each mask (all, without)
                if cfg.snr_gamma:
                    loss = loss * min_snr_weight(snr(a_t), cfg.snr_gamma, prediction_type)
                loss = prior_preservation_loss(loss, batch.get("prior"), cfg.prior_loss_weight)  # mean, or DreamBooth's
                # A non-finite loss on any process poisons the whole update: no backward, and
                # optimizer, LR schedule and EMA are left as they were (every process agrees).
                if all_finite(loss, accelerator):
                    accelerator.backward(loss)
                else:
                    bad_update = True
                if accelerator.sync_gradients:
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if not bad_update else None
                    # fp16's grad scaler handles overflowing gradients itself (skip + lower scale)
                    if grad_norm is not None and accelerator.scaler is None and not torch.isfinite(grad_norm):
                        bad_update = True
                if not bad_update:
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            trace.add(captions, accelerator.gather(batch["index"].to(accelerator.device)).tolist())  # every process's
            if not bad_update:
                loss_sum += loss.detach()
                loss_count += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if bad_update:
                skipped, consecutive_bad, bad_update = skipped + 1, consecutive_bad + 1, False
                logger.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", global_step, skipped)
                if consecutive_bad >= cfg.max_nonfinite_steps:
                    raise RuntimeError(
                        f"{consecutive_bad} updates in a row had a non-finite loss or gradient (step {global_step}); "
                        f"stopping. Resume from the last checkpoint under {out / 'checkpoints'} with a lower "
                        "--learning_rate (and --allow_config_drift), or check the data and --mixed_precision.")
            else:
                consecutive_bad = 0
                for name, ema in emas.items():
                    ema.step(ema_params[name])
                if posthoc is not None:
                    posthoc.step(named_trainable(trained))
            step_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
            loss_sum.zero_()
            loss_count = 0
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "skipped_updates": skipped,
                    **held_out_losses(global_step)}
            accelerator.log(logs, step=global_step)
            trace.write(global_step, logs)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}")
            saved = cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0
            save_posthoc_snapshots(global_step)  # before the checkpoint: a resume never misses one
            if saved:
                save_checkpoint(global_step)
            if cfg.validation_steps and global_step % cfg.validation_steps == 0:
                validate_with_ema(global_step)
            if stop.agreed(accelerator):
                if not saved:
                    save_checkpoint(global_step)
                stopped = True
                break
            if global_step >= cfg.max_train_steps:
                break
        if global_step >= cfg.max_train_steps or stopped:
            break
    progress.close()
    if stopped:
        logger.warning("stopped by a signal at step %d; resume with --resume_from_checkpoint latest", global_step)
        accelerator.end_training()
        stop.restore()
        return out

    # ---------------------------------------------------------------- 6. save the pipeline
    accelerator.wait_for_everyone()
    set_train_mode(optimizer, False)  # Schedule-Free: the validated and saved weights are x
    if accelerator.is_main_process:
        if not cfg.validation_steps or global_step % cfg.validation_steps:
            validate_with_ema(global_step)
        save_posthoc_snapshots(global_step, end=True)
        for name, ema in emas.items():  # the saved model holds the EMA weights
            ema.copy_to(trainable_parameters(trained[name]))
        save_pipeline(build_pipeline(), cfg, train_te=train_te, captions=list(dataset["text"]), run_info={
            "global_step": global_step, "num_processes": accelerator.num_processes, "final_loss": step_loss,
            "prediction_type": prediction_type, "skipped_updates": skipped, "num_examples": len(dataset),
            "mixed_precision": accelerator.mixed_precision, "first_stage_psnr_db": first_stage_psnr,
            **({"validation_examples": len(held_out_rows), **validation_summary(trace.path)} if held_out is not None else {}),
            **throughput(time.perf_counter() - started, global_step - (resumed or 0), global_batch, accelerator.device)})
    accelerator.end_training()
    stop.restore()
    return out


if __name__ == "__main__":
    # The imports made ~0.5M objects that live as long as the process: collecting them 8 times
    # while importing cost ~0.9 s, every full collection of the run ~0.2 s and the one at exit ~1.3 s.
    gc.freeze()  # out of every later collection (those objects are never freed before the exit anyway)
    gc.enable()
    run_cli(main)
    gc.freeze()  # what the run made, out of the collection at exit
