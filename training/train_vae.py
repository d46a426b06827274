"""Train the first stage: a KL-regularised autoencoder (Rombach et al. 2022, sec. 3 and app. G).

    accelerate launch --config_file accelerate_config.yaml training/train_vae.py [--flags]

loss = sum |x - D(z)| / N + kl_weight * sum KL(q(z|x) || N(0, I)) / N,  z ~ q(z|x),  N = pixels
(the LDM paper's weighting, with both sums divided by the same N). At the end the latent
scaling factor 1 / std(z) over the training images is stored in the VAE's config, so that the
diffusion model sees unit-variance latents, and the VAE is saved in diffusers layout.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # --help without importing torch
    from ldm.config import VAETrainConfig, exit_early_for_help

    exit_early_for_help(VAETrainConfig, __doc__.splitlines()[0])

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ldm import datacheck
from ldm.config import VAEConfig, VAETrainConfig, check_output_dir, resolve_config, save_config
from ldm.data import collate, load_captioned_dataset, make_batch_transform
from ldm.errors import UsageError, run_cli
from ldm.images import image_grid, tensor_to_pil
from ldm.models import build_vae, count_parameters
from ldm.runtime import use_cpu_cores

logger = get_logger("train_vae")


class ReconstructionWithKL(torch.nn.Module):
    """x -> (D(z), KL(q(z|x) || N(0, I)) per sample), z ~ q(z|x). One forward, so that DDP /
    FSDP wrappers see the whole computation (calling the unwrapped VAE would skip their hooks)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl()


def vae_loss(x: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, reconstruction) per pixel element; `kl` is (B,) summed over latent elements."""
    n = x.numel()
    rec = (x - recon).abs().sum() / n
    return rec + kl_weight * kl.sum() / n, rec


@torch.no_grad()
def latent_std(vae, batches) -> float:
    """std of posterior samples z ~ q(z|x) over the given batches (what the LDM will train on)."""
    zs = [vae.encode(b).latent_dist.sample() for b in batches]
    return torch.cat(zs).float().std().item()


def image_folder(root: str, max_image_pixels: int = datacheck.DEFAULT_MAX_IMAGE_PIXELS):
    """The good images of a folder as a `datasets.Dataset` (image, text ""): a VAE needs no
    captions, so any metadata or caption files are ignored; bad images are reported and skipped."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    scan = datacheck.folder_rows(root, captions=False)
    kept, report = datacheck.check_rows(scan.rows, source=str(root), max_image_pixels=max_image_pixels,
                                        captions=False)
    datacheck.log_report(report)
    datacheck.apply_policy(report, "skip")
    if not kept:
        raise UsageError(datacheck.no_images_message(root) if not scan.rows else
                         f"{root}: every one of {report.total} images is bad (see the report above)")
    return Dataset.from_dict({"image": [{"path": str(k.row.path), "bytes": None} for k in kept],
                              "text": [""] * len(kept)},
                             features=Features({"image": ImageFeature(), "text": Value("string")}))


def validate(cfg: VAETrainConfig) -> None:
    """Refuse what cannot work before anything is built or written (`UsageError`, one line)."""
    for name in ("resolution", "train_batch_size", "max_train_steps", "builtin_num_images", "layers_per_block",
                 "latent_channels", "norm_num_groups"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.block_out_channels:
        raise UsageError("--block_out_channels needs at least one level")
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if cfg.resolution % factor:
        below = cfg.resolution // factor * factor
        nearest = " or ".join(str(r) for r in (below, below + factor) if r > 0)
        raise UsageError(f"--resolution {cfg.resolution}: must be a multiple of the VAE's downsampling x{factor}; "
                         f"nearest: {nearest}")
    if cfg.builtin_colors not in ("named", "random", "mixed"):
        raise UsageError(f"--builtin_colors must be named, random or mixed, got {cfg.builtin_colors!r}")
    check_output_dir(cfg.output_dir)
    if cfg.train_data_dir:
        datacheck.check_layout(cfg.train_data_dir, captions=False)


def main(argv: list[str] | None = None) -> Path:
    cfg: VAETrainConfig = resolve_config(VAETrainConfig, argv, description=__doc__.splitlines()[0])
    validate(cfg)
    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.device.type == "cpu":
        use_cpu_cores(accelerator.num_processes, cfg.cpu_threads)
    logger.info("processes: %d, device: %s (%d threads), mixed precision: %s", accelerator.num_processes,
                accelerator.device, torch.get_num_threads(), accelerator.mixed_precision)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "train_vae_config.yaml")

    vae_cfg = VAEConfig(block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                        scaling_factor=1.0)
    vae = build_vae(vae_cfg, cfg.resolution)
    logger.info("VAE: %.2fM parameters, downsampling x%d, %d latent channels", count_parameters(vae) / 1e6,
                vae_cfg.downsample_factor, cfg.latent_channels)

    if cfg.train_data_dir:
        dataset = image_folder(cfg.train_data_dir)
    else:
        dataset = load_captioned_dataset(train_data_dir=None, dataset_name=None, image_column=cfg.image_column,
                                         caption_column=cfg.caption_column, builtin_num_images=cfg.builtin_num_images,
                                         resolution=cfg.resolution, seed=cfg.seed, builtin_colors=cfg.builtin_colors)
    # Full batches only (drop_last), but never fewer images than one batch per process: a small
    # folder trains with what there is.
    batch_size = min(cfg.train_batch_size, len(dataset) // accelerator.num_processes)
    if batch_size < 1:
        raise UsageError(f"{cfg.train_data_dir}: {len(dataset)} images for {accelerator.num_processes} processes")
    if batch_size < cfg.train_batch_size:
        logger.warning("only %d images: batch size %d instead of %d", len(dataset), batch_size, cfg.train_batch_size)
    dataset = dataset.with_transform(make_batch_transform(cfg.resolution, True, cfg.random_flip))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         collate_fn=collate, drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=50 * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(ReconstructionWithKL(vae), optimizer, loader,
                                                                 lr_scheduler)

    step, rec = 0, torch.zeros(())
    progress = tqdm(total=cfg.max_train_steps, desc="vae steps", disable=not accelerator.is_local_main_process)
    for _ in range(math.ceil(cfg.max_train_steps / max(len(loader), 1))):
        for batch in loader:
            x = batch["pixel_values"]  # (B, 3, R, R) in [-1, 1]
            recon, kl = model(x)
            loss, rec = vae_loss(x, recon, kl, cfg.kl_weight)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            progress.set_postfix(l1=f"{rec.item():.4f}")
            if step >= cfg.max_train_steps:
                break
        if step >= cfg.max_train_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.eval()
        eval_batches = [b["pixel_values"].to(accelerator.device) for _, b in zip(range(8), loader)]
        std = latent_std(vae, eval_batches)
        vae.register_to_config(scaling_factor=1.0 / std)
        with torch.no_grad():
            x = eval_batches[0][:16]
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            l1 = (x - recon).abs().mean().item()
        pairs = [tensor_to_pil(t) for pair in zip(x, recon) for t in pair]  # original, reconstruction
        image_grid(pairs, cols=8).save(out / "reconstructions.png")
        vae.save_pretrained(out, safe_serialization=True)
        (out / "vae_info.json").write_text(json.dumps({
            "steps": step, "final_train_l1": rec.item(), "eval_l1_posterior_mode": l1,
            "latent_std": std, "scaling_factor": 1.0 / std}, indent=2) + "\n")
        logger.info("saved VAE to %s: L1 %.4f (pixels in [-1, 1]), latent std %.3f -> scaling factor %.4f",
                    out, l1, std, 1.0 / std)
    accelerator.end_training()
    return out


if __name__ == "__main__":
    run_cli(main)
