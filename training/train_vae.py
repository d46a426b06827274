"""Train or fine-tune the first stage: a KL-regularised autoencoder (Rombach et al. 2022, sec. 3, app. G).

    accelerate launch --config_file accelerate_config.yaml training/train_vae.py [--flags]

The LDM recipe (ldm/vae_losses.py has the maths): L1 (+ --l2_weight squared error) reconstruction,
--kl_weight * KL(q(z|x) || N(0, I)), LPIPS with --lpips_weights, and with --disc_weight > 0 a
PatchGAN discriminator (hinge loss) from --disc_start on, weighted adaptively by the gradient-norm
ratio at the decoder's last layer. Data: an image folder (--train_data_dir, no captions needed),
the built-in shapes, or the diverse mix (--data diverse). At the end the latent scaling factor
1 / std(z) over a data sample (and with --latent_shift the mean as shift_factor) goes into the
VAE's config, and the VAE is saved in diffusers layout (safetensors).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # --help without importing torch
    from ldm.config import VAETrainConfig, exit_early_for_help

    exit_early_for_help(VAETrainConfig, __doc__.splitlines()[0])

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ldm import checkpoint as ckpt
from ldm import datacheck
from ldm.config import VAETrainConfig, resolve_config, save_config
from ldm.config_checks import check_output_dir
from ldm.data import collate, load_captioned_dataset, make_batch_transform
from ldm.errors import UsageError, run_cli
from ldm.first_stage_data import FirstStageImages, parse_mix
from ldm.images import image_grid, tensor_to_pil
from ldm.models import build_vae, count_parameters, is_single_file, load_vae
from ldm.presets import VAEConfig
from ldm.runtime import use_cpu_cores
from ldm.vae_losses import (PatchDiscriminator, adaptive_weight, disc_factor, hinge_d_loss, hinge_g_loss,
                            kl_standard_normal, latent_scaling, patch_layers_for, reconstruction_loss,
                            scale_equivariance_loss)

logger = get_logger("train_vae")


class ReconstructionWithKL(torch.nn.Module):
    """x -> (D(z), mean, logvar), z ~ q(z|x). One forward, so that DDP / FSDP wrappers see the whole
    computation (calling the unwrapped VAE would skip their hooks). A frozen encoder runs without
    gradients."""

    def __init__(self, vae: AutoencoderKL, train_encoder: bool = True):
        super().__init__()
        self.vae, self.train_encoder = vae, train_encoder

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, downsampled: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """downsampled: also decode the 2x average-pooled z (the scale-equivariance loss's input)."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(x).latent_dist  # (B, C, h, w) each
        z = posterior.sample(generator)
        small = self.vae.decode(torch.nn.functional.avg_pool2d(z, 2)).sample if downsampled else None
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar, small


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The draws of one step (flips, z ~ q(z|x)) on one process, keyed by (seed, step, rank): the
    loader prefetches a batch ahead, so draws from the global RNG would not survive a resume."""
    return torch.Generator(device).manual_seed(hash((seed, step, rank)) & (2**63 - 1))


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


def load_pretrained_vae(path: str, config: str | None = None) -> AutoencoderKL:
    """A diffusers VAE folder / pipeline folder / hub id, or a single-file SD VAE checkpoint
    (.safetensors, original key layout) read offline with `config` (a folder with config.json;
    default: the sd15 preset's VAE)."""
    if not is_single_file(path):
        return load_vae(path)
    if config:
        return AutoencoderKL.from_single_file(path, config=config, local_files_only=True)
    from ldm.presets import model_preset

    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            build_vae(model_preset("sd15").vae, 512).save_config(tmp)
        return AutoencoderKL.from_single_file(path, config=tmp, local_files_only=True)


def load_lpips(path: str | None):
    """LPIPS (Zhang et al. 2018) from a local file of the lpips package's full state dict, frozen;
    None (said once) without one: its VGG backbone would need a download, which we never do."""
    if not path:
        logger.info("no --lpips_weights: training without the perceptual loss")
        return None
    try:
        import lpips
    except ImportError:
        raise UsageError("--lpips_weights needs the lpips package: pip install lpips") from None
    from safetensors.torch import load_model

    net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)  # nothing downloaded
    try:  # .safetensors: written with safetensors.torch.save_model (the heads share tensors)
        if path.endswith(".safetensors"):
            load_model(net, path)
        else:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except RuntimeError as err:
        raise UsageError(f"--lpips_weights {path}: not an LPIPS(net='vgg') state dict ({str(err).splitlines()[0]})")
    logger.info("perceptual loss: LPIPS (VGG) from %s", path)
    return net.eval().requires_grad_(False)


def validate(cfg: VAETrainConfig) -> None:
    """Refuse what cannot work before anything is built or written (`UsageError`, one line)."""
    for name in ("resolution", "train_batch_size", "max_train_steps", "builtin_num_images", "layers_per_block",
                 "latent_channels", "norm_num_groups", "diverse_num_images", "disc_channels"):
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
    if cfg.data not in ("builtin", "diverse"):
        raise UsageError(f"--data must be builtin or diverse, got {cfg.data!r}")
    if cfg.data == "diverse" and cfg.train_data_dir:
        raise UsageError("--data diverse and --train_data_dir: give one of them")
    if cfg.diverse_mix:
        if cfg.data != "diverse" or cfg.train_data_dir:
            raise UsageError("--diverse_mix changes --data diverse: give --data diverse with it")
        try:
            parse_mix(cfg.diverse_mix)
        except ValueError as err:
            raise UsageError(str(err)) from None
    for name in ("kl_weight", "l2_weight", "scale_equivariance_weight", "perceptual_weight", "disc_weight", "disc_start", "checkpointing_steps",
                 "validation_steps", "lr_warmup_steps"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lpips_weights and not Path(cfg.lpips_weights).is_file():
        raise UsageError(f"--lpips_weights {cfg.lpips_weights}: no such file")
    check_output_dir(cfg.output_dir)
    if cfg.train_data_dir:
        datacheck.check_layout(cfg.train_data_dir, captions=False)
    if cfg.single_file_config and not (Path(cfg.single_file_config) / "config.json").is_file():
        raise UsageError(f"--single_file_config {cfg.single_file_config}: no config.json there")
    if cfg.pretrained_vae_name_or_path and not is_single_file(cfg.pretrained_vae_name_or_path):
        from ldm.hub import check_vae_source

        check_vae_source(cfg.pretrained_vae_name_or_path)
    if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint != "latest":
        path = Path(cfg.resume_from_checkpoint)
        if not path.exists() and (ckpt.checkpoint_dir(cfg.output_dir, 0).parent / path).exists():
            cfg.resume_from_checkpoint = str(ckpt.checkpoint_dir(cfg.output_dir, 0).parent / path)  # a bare name
    try:
        ckpt.resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    except (FileNotFoundError, RuntimeError) as err:
        raise UsageError(str(err)) from None


def make_dataset(cfg: VAETrainConfig):
    """The training images: a folder, the diverse mix or the built-in shapes; items hold
    pixel_values (3, R, R) in [-1, 1]."""
    if cfg.data == "diverse" and not cfg.train_data_dir:
        return FirstStageImages(cfg.diverse_num_images, cfg.resolution, seed=cfg.seed,
                                mix=parse_mix(cfg.diverse_mix) if cfg.diverse_mix else None)
    if cfg.train_data_dir:
        dataset = image_folder(cfg.train_data_dir)
    else:
        dataset = load_captioned_dataset(train_data_dir=None, dataset_name=None, image_column=cfg.image_column,
                                         caption_column=cfg.caption_column, builtin_num_images=cfg.builtin_num_images,
                                         resolution=cfg.resolution, seed=cfg.seed, builtin_colors=cfg.builtin_colors)
    return dataset.with_transform(make_batch_transform(cfg.resolution, True, False))  # flips: in the loop


def save_reconstructions(vae: AutoencoderKL, x: torch.Tensor, path: Path) -> float:
    """Originals and posterior-mode reconstructions side by side (8 pairs a row); the mean L1."""
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([tensor_to_pil(t) for pair in zip(x, recon) for t in pair], cols=16).save(path)
    return (x - recon).abs().mean().item()


def main(argv: list[str] | None = None) -> Path:
    cfg: VAETrainConfig = resolve_config(VAETrainConfig, argv, description=__doc__.splitlines()[0])
    validate(cfg)
    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.device.type == "cpu":
        use_cpu_cores(accelerator.num_processes, cfg.cpu_threads)
    logger.info("processes: %d, device: %s (%d threads), mixed precision: %s", accelerator.num_processes,
                accelerator.device, torch.get_num_threads(), accelerator.mixed_precision)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "train_vae_config.yaml")

    # ---------------------------------------------------------------- models
    if cfg.pretrained_vae_name_or_path:
        vae = load_pretrained_vae(cfg.pretrained_vae_name_or_path, cfg.single_file_config).float()
        arch = {"pretrained": cfg.pretrained_vae_name_or_path}
    else:
        vae_cfg = VAEConfig(block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                            latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                            scaling_factor=1.0)
        vae = build_vae(vae_cfg, cfg.resolution)
        arch = {"vae": vae_cfg}
    if cfg.train_decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    params = [p for p in vae.parameters() if p.requires_grad]
    logger.info("VAE: %.2fM parameters (%.2fM trained), downsampling x%d, %d latent channels",
                count_parameters(vae) / 1e6, sum(p.numel() for p in params) / 1e6,
                2 ** (len(vae.config.block_out_channels) - 1), vae.config.latent_channels)
    disc = PatchDiscriminator(channels=cfg.disc_channels, layers=patch_layers_for(cfg.resolution)) \
        if cfg.disc_weight > 0 else None
    lpips_net = load_lpips(cfg.lpips_weights)
    emas = {"vae": EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True)} if cfg.use_ema else {}

    # ---------------------------------------------------------------- data
    dataset = make_dataset(cfg)
    # Full batches only (drop_last), but never fewer images than one batch per process: a small
    # folder trains with what there is.
    batch_size = min(cfg.train_batch_size, len(dataset) // accelerator.num_processes)
    if batch_size < 1:
        raise UsageError(f"{cfg.train_data_dir}: {len(dataset)} images for {accelerator.num_processes} processes")
    if batch_size < cfg.train_batch_size:
        logger.warning("only %d images: batch size %d instead of %d", len(dataset), batch_size, cfg.train_batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                         drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
    val_x = collate([dataset[i] for i in range(min(16, len(dataset)))])["pixel_values"]  # (<=16, 3, R, R)

    # ---------------------------------------------------------------- optimizers
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(
        ReconstructionWithKL(vae, train_encoder=not cfg.train_decoder_only), optimizer, loader, lr_scheduler)
    if disc is not None:  # LDM: Adam, betas (0.5, 0.9), same learning rate
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=cfg.learning_rate, betas=(0.5, 0.9))
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    if lpips_net is not None:
        lpips_net.to(accelerator.device)
    for ema in emas.values():
        ema.to(accelerator.device)
    last_layer = accelerator.unwrap_model(model).vae.decoder.conv_out.weight  # the adaptive weight's reference

    # ---------------------------------------------------------------- resume
    fingerprint = {"global_batch": batch_size * accelerator.num_processes, "world_size": accelerator.num_processes,
                   "resolution": cfg.resolution, "seed": cfg.seed, "max_train_steps": cfg.max_train_steps,
                   "learning_rate": cfg.learning_rate,
                   "model": ckpt.model_fingerprint(VAEConfig(), arch, cfg.train_decoder_only, cfg.disc_weight > 0),
                   "data": cfg.train_data_dir or (f"diverse {cfg.diverse_num_images} {cfg.diverse_mix}".strip() if cfg.data == "diverse"
                                                  else f"builtin {cfg.builtin_num_images} {cfg.builtin_colors}"),
                   "objective": [cfg.kl_weight, cfg.l2_weight, cfg.perceptual_weight if lpips_net else 0,
                                 cfg.disc_weight, cfg.disc_start,
                                 *([cfg.scale_equivariance_weight] if cfg.scale_equivariance_weight else [])]}
    try:
        global_step = ckpt.resume(accelerator, out, cfg.resume_from_checkpoint, fingerprint, emas) or 0
    except ValueError as err:  # another run's checkpoint
        raise UsageError(str(err).replace("\n", " ").replace("--allow_config_drift", "another --output_dir"))
    steps_per_epoch = len(loader)
    modules = {"vae": model, **({"disc": disc} if disc is not None else {})}

    # ---------------------------------------------------------------- train
    progress = tqdm(total=cfg.max_train_steps, initial=global_step, desc="vae steps",
                    disable=not accelerator.is_local_main_process)
    rec = torch.zeros(())
    for epoch in range(global_step // steps_per_epoch, math.ceil(cfg.max_train_steps / steps_per_epoch)):
        if global_step >= cfg.max_train_steps:
            break
        loader.set_epoch(epoch)
        batches = loader
        if epoch == global_step // steps_per_epoch and global_step % steps_per_epoch:  # resumed mid-epoch
            batches = accelerator.skip_first_batches(loader, global_step % steps_per_epoch)
        for batch in batches:
            x = batch["pixel_values"]  # (B, 3, R, R) in [-1, 1]
            gen = step_generator(cfg.seed, global_step, accelerator.process_index, x.device)
            if cfg.random_flip:
                x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen, device=x.device) < 0.5, x.flip(-1), x)
            recon, mean, logvar, small = model(x, gen, downsampled=cfg.scale_equivariance_weight > 0)
            rec = reconstruction_loss(x, recon, cfg.l2_weight)
            if small is not None:
                rec = rec + cfg.scale_equivariance_weight * scale_equivariance_loss(x, small, cfg.l2_weight)
            if lpips_net is not None:
                rec = rec + cfg.perceptual_weight * lpips_net(recon.float(), x.float()).mean()
            # Both sums over the same N elements as in the LDM paper's weighting.
            kl = kl_standard_normal(mean.float(), logvar.float()).sum() / x.numel()
            loss = rec + cfg.kl_weight * kl
            gan = disc is not None and disc_factor(global_step, cfg.disc_start) > 0
            if gan:
                g_loss = hinge_g_loss(disc(recon))
                weight = adaptive_weight(torch.autograd.grad(rec, last_layer, retain_graph=True)[0],
                                         torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0])
                loss = loss + cfg.disc_weight * weight * g_loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if gan:  # the discriminator's step: real x against the detached reconstructions
                disc_optimizer.zero_grad(set_to_none=True)  # drop what the generator's loss left
                d_loss = hinge_d_loss(disc(x.detach()), disc(recon.detach()))
                accelerator.backward(d_loss)
                disc_optimizer.step()
                disc_optimizer.zero_grad(set_to_none=True)
            for ema in emas.values():
                ema.step(params)
            global_step += 1
            progress.update(1)
            if global_step % 25 == 0 or global_step == cfg.max_train_steps:
                progress.set_postfix(rec=f"{rec.item():.4f}")
                logger.info("step %d: rec %.4f, kl %.1f%s", global_step, rec.item(), kl.item() * x.numel() / len(x),
                            f", g {g_loss.item():.3f}, d {d_loss.item():.3f}, w {weight.item():.3g}" if gan else "")
            if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
                ckpt.save(accelerator, out, global_step, fingerprint, modules, emas, keep=cfg.checkpoints_total_limit)
            if cfg.validation_steps and global_step % cfg.validation_steps == 0 and accelerator.is_main_process:
                save_reconstructions(accelerator.unwrap_model(model).vae.eval(), val_x.to(accelerator.device),
                                     out / "samples" / f"reconstructions_{global_step:06d}.png")
                model.train()
            if global_step >= cfg.max_train_steps:
                break
    progress.close()

    # ---------------------------------------------------------------- save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.eval()
        for ema in emas.values():  # the saved VAE holds the EMA weights
            ema.copy_to(params)
        sample = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=False, collate_fn=collate)
        with torch.no_grad():  # z ~ q(z|x): what the diffusion model will train on
            zs = [vae.encode(b["pixel_values"].to(accelerator.device)).latent_dist.sample()
                  for _, b in zip(range(8), sample)]
        scale, shift = latent_scaling(torch.cat(zs), shift=cfg.latent_shift)
        vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        l1 = save_reconstructions(vae, val_x.to(accelerator.device), out / "reconstructions.png")
        vae.save_pretrained(out, safe_serialization=True)
        (out / "vae_info.json").write_text(json.dumps({
            "steps": global_step, "final_train_rec": rec.item(), "eval_l1_posterior_mode": l1,
            "latent_std": 1.0 / scale, "scaling_factor": scale, "shift_factor": shift}, indent=2) + "\n")
        logger.info("saved VAE to %s: L1 %.4f (pixels in [-1, 1]), latent std %.3f -> scaling factor %.4f%s",
                    out, l1, 1.0 / scale, scale, f", shift {shift:.4f}" if shift is not None else "")
    accelerator.end_training()
    return out


if __name__ == "__main__":
    run_cli(main)
