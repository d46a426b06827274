"""The training run's steps around its loop (training/train_ldm.py): the Accelerator and logging
(`start`), the run's files, the first-stage check, the text cache, the validation grid and the final
save in diffusers layout. Pipelines are built by the caller and passed in (ldm/ imports nothing from
pipelines/)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, parse_flag_from_env
from diffusers import DiffusionPipeline
from diffusers.training_utils import EMAModel

from ldm import checkpoint as ckpt
from ldm.cache import first_moments
from ldm.config import TrainConfig, default_config, save_config
from ldm.evaluation import evaluate_pipeline, held_out_cases, save_report, summary
from ldm.images import labelled_grid
from ldm.lora import save_lora, trainable_parameters
from ldm.model_card import caption_stats, write_model_card
from ldm.plots import write_training_curves
from ldm.presets import ModelConfig
from ldm.run_folder import clear_run_files
from ldm.runtime import (GracefulStop, StopRequested, requested_mixed_precision, resolve_mixed_precision,
                         use_cpu_cores)
from ldm.text_cache import TextEmbeddingCache
from ldm.vae_utils import first_stage_fit

logger = get_logger("train_ldm")  # the script's name in every log line


def all_finite(loss: torch.Tensor, accelerator: Accelerator) -> bool:
    """Whether the loss is finite on every process (one all-reduce when there are several)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def clip_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`accelerator.clip_grad_norm_(params, max_norm)`: the total norm, gradients scaled to at most
    `max_norm`. On a plain CPU run (one process or DDP), gradients already within the limit are
    left alone instead of multiplied by 1 (the same bits; a tiny U-Net's gradients usually are,
    and the multiply is ~2% of its step); there the check's `.item()` costs no device sync."""
    if accelerator.device.type != "cpu" or accelerator.distributed_type not in (DistributedType.NO,
                                                                                  DistributedType.MULTI_CPU):
        return accelerator.clip_grad_norm_(params, max_norm)
    accelerator.unscale_gradients()
    grads = [p.grad for p in params if p.grad is not None]
    # accelerate's reduction, to the bit: the norm of the (single) group's norm
    norm = torch.linalg.vector_norm(torch.stack([torch.nn.utils.get_total_norm(grads, 2.0)]), 2.0)
    if not (max_norm / (norm + 1e-6)).item() >= 1.0:  # torch's factor, clamped to 1 when it is not below
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


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


def validate(pipe: DiffusionPipeline, cfg: TrainConfig, accelerator: Accelerator, step: int, *, resolution: int,
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
        # Same shuffled order on every process (each takes its own shard), reseeded per epoch; on
        # a GPU, batches (pinned by the loader) are copied without making the host wait.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=device.type == "cuda"),
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



def save_pipeline(pipe: DiffusionPipeline, cfg: TrainConfig, *, train_te: bool, run_info: dict,
                  captions: list) -> str | None:
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
    else:
        report = None
    run_info = {**run_info, "torch": torch.__version__}
    (out / "run_info.json").write_text(json.dumps(run_info, indent=2) + "\n")
    if run_info.get("final_loss") is not None:
        write_training_curves(out)
    grids = sorted((out / "samples").glob("step_*.png"))
    captions = [c for cell in captions for c in ([cell] if isinstance(cell, str) else cell)]  # cells may hold several
    write_model_card(out, cfg.to_dict(), run_info=run_info, defaults=default_config(cfg).to_dict(),
                     data_stats={"source": cfg.train_data_dir or cfg.dataset_name or "built-in shapes",
                                 "size": run_info.get("num_examples"),
                                 **({"captions": caption_stats(captions)} if captions else {})},  # none: unknown
                     metrics={"final_loss": run_info.get("final_loss"), **({"held_out": report} if report else {}),
                              # the saved weights' (the EMA's with --use_ema)
                              "val_loss": run_info.get("final_val_loss_ema", run_info.get("final_val_loss"))},
                     grid=grids[-1] if grids else None)
    logger.info("saved pipeline to %s", out)
    return f"held-out compositions: {summary(report)}" if report else None
