"""Time per training step without and with the on-disk caches (`ldm/cache.py`), and their one-off costs.

One step is the real training work at one batch: the batch's inputs (uncached: preprocess the
images, VAE-encode them, tokenize and run the text encoder; cached: read moments / embeddings),
z ~ q(z|x), noise, the U-Net's forward and backward, AdamW. Cases, each against its own uncached
baseline:
    text encoder trained (the tiny preset's default for a model built from scratch): latents cached
        in memory, latents cached and read from disk per step;
    text encoder frozen (a pretrained one): latents cached, latents + text embeddings cached.
One-off costs: what the in-memory cache (`ldm.cache.LatentCache` without a cache_dir) pays on every run,
building the disk cache (first run) and starting from it (a second run: every entry a hit).

    python benchmarks/cache_speed.py                      # tiny preset, CPU
    python benchmarks/cache_speed.py --preset sd15 --resolution 512 --device cuda \
        --mixed_precision bf16 --batch_size 16 --num_images 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm.cache import LatentCache, Preprocess, content_hash, weights_hash
from ldm.text_cache import TextEmbeddingCache
from ldm.data import collate_latents, image_transform
from ldm.diffusion import add_noise, gather, training_target
from ldm.draws import categorical, randn, sample_generators
from ldm.models import build_components, load_vae, with_resolution
from ldm.presets import model_preset
from ldm.schedulers import training_scheduler
from ldm.synthetic import make_dataset
from ldm.text import drop_captions, encode_tokens, tokenize


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--resolution", type=int, default=None, help="default: the preset's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                        help="autocast for the U-Net and text encoder (the VAE stays float32)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_images", type=int, default=1024, help="data set size for the one-off costs")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cache_dir", default=None, help="default: a temporary folder, removed at the end")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    cfg = with_resolution(model_preset(args.preset), args.resolution)
    R, B = cfg.resolution, args.batch_size
    comps = build_components(cfg, seed=args.seed)  # random weights except the tiny preset's shipped VAE
    vae = (load_vae(cfg.pretrained_vae) if cfg.pretrained_vae else comps.vae).to(device).eval().requires_grad_(False)
    te, tokenizer, unet = comps.text_encoder.to(device), comps.tokenizer, comps.unet.to(device)
    scheduler = training_scheduler(comps.noise_scheduler.config, zero_terminal_snr=False)
    alpha_bar = scheduler.alphas_cumprod.to(device)
    probs = torch.ones(scheduler.config.num_train_timesteps)
    prediction = scheduler.config.prediction_type
    print(f"preset {args.preset}, {R} px, batch {B}, device {device} ({torch.get_num_threads()} threads), "
          f"autocast {args.mixed_precision}; unet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M, "
          f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, "
          f"text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.2f}M parameters")

    data = make_dataset(args.num_images, R, args.seed)
    images, captions = list(data["image"]), list(data["text"])
    square = image_transform(R, center_crop=True, random_flip=False)
    tmp = tempfile.TemporaryDirectory()
    cache_dir = Path(args.cache_dir or tmp.name) / f"{args.preset}_{R}"

    # ------------------------------------------------------------ one-off costs
    print("\none-off costs (seconds):")
    def memory_cache():
        cache, items = LatentCache(None, vae), [(str(i), Preprocess((R, R))) for i in range(len(images))]
        cache.ensure(items, lambda idx: [images[i] for i in idx], batch_size=64)
        return cache.dataset(items, captions)

    seconds, _ = timed(memory_cache, device)
    print(f"  in-memory latents (LatentCache without a cache_dir), every run: {seconds:8.2f}")
    seconds, _ = timed(lambda: weights_hash(vae), device)
    print(f"  VAE weights hash: {seconds:.3f}; text encoder: {timed(lambda: weights_hash(te), device)[0]:.3f}")
    load = lambda idx: [images[i] for i in idx]  # noqa: E731

    def start_latents():
        hashes = [content_hash(img) for img in images]
        cache = LatentCache(cache_dir, vae)
        items = [(h, Preprocess((R, R))) for h in hashes]
        stats = cache.ensure(items, load, batch_size=64)
        return stats, cache.dataset(items, captions, in_memory=True)

    def start_text():
        te.eval().requires_grad_(False)
        cache = TextEmbeddingCache(cache_dir, te, tokenizer, in_memory=True)
        return cache.ensure(captions, batch_size=256), cache

    for run in ("first run (builds)", "second run (all hits)"):
        seconds, (stats, _) = timed(start_latents, device)
        print(f"  latent disk cache, {run}: {seconds:8.2f}  [{stats}]")
    for run in ("first run (builds)", "second run (all hits)"):
        seconds, (stats, _) = timed(start_text, device)
        print(f"  text disk cache, {run}:   {seconds:8.2f}  [{stats}]")
    _, in_memory = start_latents()
    _, text_cache = start_text()
    on_disk = LatentCache(cache_dir, vae).dataset([(content_hash(img), Preprocess((R, R))) for img in images],
                                                  captions, in_memory=False)
    size = sum(p.stat().st_size for p in cache_dir.rglob("*.safetensors"))
    print(f"  cache size: {size / 2**20:.1f} MiB in {len(list(cache_dir.rglob('*.safetensors')))} files")

    # ------------------------------------------------------------ steps
    def step(batch_idx: list[int], step_no: int, latents_from: str, text_from: str, opt) -> None:
        gens = sample_generators(args.seed, step_no, batch_idx)
        with torch.no_grad():
            if latents_from == "vae":
                pixels = torch.stack([square(images[i]) for i in batch_idx]).to(device)
                moments = vae.encode(pixels).latent_dist.parameters
            else:
                source = in_memory if latents_from == "memory" else on_disk
                moments = collate_latents([source[i] for i in batch_idx])["moments"].to(device)
            latents = DiagonalGaussianDistribution(moments).sample(generator=gens).float() * vae.config.scaling_factor
        noise = randn(latents.shape, gens, device)
        t = categorical(probs, gens).to(device)
        a_t = gather(alpha_bar, t)
        texts = drop_captions([captions[i] for i in batch_idx], 0.1, generator=gens)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            if text_from == "cache":
                context = text_cache.lookup(texts).to(device)
            else:
                with torch.set_grad_enabled(text_from == "trained"):
                    context = encode_tokens(te, tokenize(tokenizer, texts))
            pred = unet(add_noise(latents, noise, a_t), t, encoder_hidden_states=context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), training_target(prediction, latents, noise, a_t).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Frozen first: the trained cases change the text encoder the text cache was made from.
    cases = [("text encoder frozen", "uncached (baseline)", "vae", "frozen"),
             ("text encoder frozen", "latents cached, in memory", "memory", "frozen"),
             ("text encoder frozen", "latents + text cached, in memory", "memory", "cache"),
             ("text encoder trained", "uncached (baseline)", "vae", "trained"),
             ("text encoder trained", "latents cached, in memory", "memory", "trained"),
             ("text encoder trained", "latents cached, read from disk", "disk", "trained")]
    print(f"\nseconds per training step (batch {B}; median of {args.steps} after {args.warmup} warm-up):")
    baseline = {}
    generator = torch.Generator().manual_seed(args.seed)
    for group, name, latents_from, text_from in cases:
        trained = text_from == "trained"
        te.train(trained).requires_grad_(trained)
        params = list(unet.parameters()) + (list(te.parameters()) if trained else [])
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for k in range(args.warmup + args.steps):
            idx = torch.randperm(len(images), generator=generator)[:B].tolist()
            seconds, _ = timed(lambda: step(idx, k, latents_from, text_from, opt), device)
            if k >= args.warmup:
                times.append(seconds)
        median = statistics.median(times)
        baseline.setdefault(group, median)
        print(f"  {group:21s} {name:33s} {median:8.4f}  (min {min(times):.4f}, max {max(times):.4f})  "
              f"x{baseline[group] / median:.2f} vs uncached")
    tmp.cleanup()


if __name__ == "__main__":
    main()
