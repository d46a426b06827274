"""Validation loss on held-out data: the training objective over images the run never trains on,
at fixed timesteps, noise and captions, so that the same weights always give the same number and
checkpoints of a run can be compared by it.

    L_val = mean over held-out examples i and grid timesteps t_k of
            w(t_k) * mean((f(x_t, t_k, c_i) - target(z_i, eps_ik, t_k))^2),  x_t = sqrt(a_k) z_i + sqrt(1 - a_k) eps_ik

- t_k: an even grid over [0, T) (`timestep_grid`): the loss under uniform t, whatever
  --timestep_bias_* does to the training draws;
- z_i ~ q(z|x_i) (the frozen VAE's posterior, encoded once) and eps_ik ~ N(0, I): drawn from one
  generator per example keyed by (seed, example) (`fixed_draws`); plain Gaussian noise (no offset
  noise or input perturbation);
- c_i: one caption per example, picked once (`fixed_captions`), never dropped;
- the target and w(t) are training's (`ldm.diffusion.training_target`, `min_snr_weight` with
  --snr_gamma), so the number is on the training loss's scale.

The held-out examples are a seeded split of the data (`held_out_rows`: keyed by each example's
content, so the same ones whatever the data set's order, batch size or process count) or a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm.diffusion import add_noise, gather, min_snr_weight, snr, training_target
from ldm.draws import sample_seed
from ldm.errors import UsageError

# The draws' "step" key of the held-out set: training's steps are >= 0, so no training draw shares it.
VALIDATION_STEP = -1


# --------------------------------------------------------------------------------------------
# Which examples are held out
# --------------------------------------------------------------------------------------------
def example_keys(dataset) -> list[str]:
    """Each row's identity: its image's content hash and caption where the data check recorded
    them (user folders, hub data sets), else its row index (the built-in data, generated in a
    fixed order from the seed)."""
    if "image_hash" in dataset.column_names:
        return [f"{h}/{json.dumps(c)}" for h, c in zip(dataset["image_hash"], dataset["text"])]
    return [str(i) for i in range(len(dataset))]


def held_out_rows(keys: Sequence[str], fraction: float, seed: int) -> list[int]:
    """Sorted indices of the held-out rows: the max(1, round(fraction * n)) rows whose
    blake2b(seed, key) is smallest (ties by row). The set depends on the keys and the seed only, not
    on the rows' order, and grows with `fraction` (what 5% holds out, 10% holds out too).
    fraction 0: none."""
    if fraction <= 0:
        return []
    count = max(1, round(fraction * len(keys)))
    if count >= len(keys):
        raise UsageError(f"--validation_split {fraction} holds out {count} of {len(keys)} examples: none would "
                         "be left to train on")
    rank = sorted(range(len(keys)), key=lambda i: (hashlib.blake2b(f"{seed}/{keys[i]}".encode(),
                                                                   digest_size=8).digest(), i))
    return sorted(rank[:count])


def split_dataset(dataset, fraction: float, seed: int):
    """(training rows, held-out rows) of a `datasets.Dataset` (`held_out_rows`)."""
    held = held_out_rows(example_keys(dataset), fraction, seed)
    kept = sorted(set(range(len(dataset))) - set(held))
    return dataset.select(kept), dataset.select(held)


def validation_data(dataset, *, split: float, data_dir: str | None, seed: int, **check):
    """(training data, held-out data or None): --validation_data_dir loaded and checked like the
    training folder (`check`: `ldm.data.checked_folder`'s settings), else the --validation_split
    of `dataset`."""
    if data_dir:
        from ldm.data import checked_folder

        return dataset, checked_folder(data_dir, **check)
    if split:
        return split_dataset(dataset, split, seed)
    return dataset, None


# --------------------------------------------------------------------------------------------
# Fixed timesteps, noise and captions
# --------------------------------------------------------------------------------------------
def timestep_grid(num_train_timesteps: int, n: int) -> torch.Tensor:
    """(n,) long: the midpoints of n equal cells of [0, T), floor((k + 1/2) T / n); T = 1000,
    n = 4 gives 125, 375, 625, 875."""
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"{n} validation timesteps: must be between 1 and {num_train_timesteps}")
    return torch.tensor([(2 * k + 1) * num_train_timesteps // (2 * n) for k in range(n)], dtype=torch.long)


def example_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of held-out example `index` (`ldm.draws.sample_seed` at VALIDATION_STEP)."""
    return torch.Generator().manual_seed(sample_seed(seed, VALIDATION_STEP, index))


def fixed_captions(cells: Sequence, seed: int) -> list[str]:
    """One caption per example: the cell itself, or one of its list picked with the example's generator."""
    from ldm.data import pick_caption

    return [pick_caption(cell, example_generator(seed, i)) for i, cell in enumerate(cells)]


def fixed_draws(moments: torch.Tensor, indices: Sequence[int], seed: int, num_timesteps: int,
                scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, noise), each (B * K, C, h, w), rows b * K + k: example indices[b]'s z ~ q(z|x)
    (times the VAE's scaling factor) repeated over the K grid timesteps, and its K noises; float32
    on the CPU, from `moments` (B, 2C, h, w) and each example's own generator (z drawn first)."""
    gens = [example_generator(seed, int(i)) for i in indices]
    posterior = DiagonalGaussianDistribution(moments.detach().cpu().float())
    z = posterior.sample(generator=gens) * scaling_factor  # (B, C, h, w)
    noise = torch.stack([torch.randn((num_timesteps, *z.shape[1:]), generator=g) for g in gens])  # (B, K, C, h, w)
    return z.repeat_interleave(num_timesteps, dim=0), noise.flatten(0, 1)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------
def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, snr_t: torch.Tensor, snr_gamma: float | None,
                    prediction_type: str) -> torch.Tensor:
    """(B,): training's loss of each sample, the mean squared error over (C, h, w) times the
    min-SNR weight when `snr_gamma` is set; in float32 (float64 inputs stay float64)."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    loss = F.mse_loss(pred.to(dtype), target.to(dtype), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        loss = loss * min_snr_weight(snr_t.to(dtype), snr_gamma, prediction_type)
    return loss


@dataclass
class HeldOut:
    """The held-out set in memory: the frozen VAE's posterior parameters and one caption each."""

    moments: torch.Tensor  # (N, 2C, h, w), float32, CPU
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def encode_held_out(dataset, vae, *, resolution: int, seed: int, batch_size: int = 64) -> HeldOut:
    """Encode a held-out `datasets.Dataset` once (square centre crops at `resolution`), with the
    training's latent cache code in memory (`ldm.cache.LatentCache`)."""
    from ldm.cache import LatentCache, latent_items

    cache = LatentCache(None, vae)
    items = latent_items(dataset, resolution, hashes=[str(i) for i in range(len(dataset))])
    cache.ensure(items, lambda idx: dataset[idx]["image"], batch_size=batch_size)
    moments = torch.stack([cache.read(h, spec) for h, spec in items]).cpu()
    return HeldOut(moments, fixed_captions(list(dataset["text"]), seed))


def caption_encoder(text_encoder, tokenizer, text_cache=None, dtype: torch.dtype | None = None
                    ) -> Callable[[list[str]], torch.Tensor]:
    """captions -> (B, L, D) context as training computes it: the text cache's entries (frozen
    encoder, in `dtype`), else `text_encoder` on its device."""
    from ldm.text import encode_tokens, tokenize

    device = next(text_encoder.parameters()).device

    def encode(captions: list[str]) -> torch.Tensor:
        if text_cache is not None:
            return text_cache.lookup(captions).to(device, dtype)
        return encode_tokens(text_encoder, tokenize(tokenizer, captions).to(device))

    return encode


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Modules in eval mode (no dropout) inside the block, their own modes after."""
    before = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, before):
            m.train(mode)


@torch.no_grad()
def validation_loss(unet: torch.nn.Module, held_out: HeldOut, encode: Callable[[list[str]], torch.Tensor], *,
                    alpha_bar: torch.Tensor, grid: torch.Tensor, prediction_type: str, snr_gamma: float | None,
                    seed: int, scaling_factor: float, batch_size: int, dtype: torch.dtype = torch.float32) -> float:
    """L_val (module docstring) of `unet` over `held_out` at the timesteps `grid` (K,).

    encode: captions -> (B, L, D) text context on the U-Net's device. alpha_bar: (T,) on that
    device. batch_size: rows (example x timestep) per forward pass. Deterministic: the same weights
    give the same number (the draws are fixed; batches are formed the same way every time)."""
    device = alpha_bar.device
    per_batch = max(1, batch_size // len(grid))  # examples per forward pass
    total, count = torch.zeros((), dtype=torch.float64), 0
    for start in range(0, len(held_out), per_batch):
        index = list(range(start, min(start + per_batch, len(held_out))))
        latents, noise = (t.to(device, dtype) for t in fixed_draws(held_out.moments[index], index, seed, len(grid),
                                                                     scaling_factor))
        timesteps = grid.to(device).repeat(len(index))  # (B * K,), rows b * K + k
        a_t = gather(alpha_bar, timesteps)  # (B * K,)
        context = encode([held_out.captions[i] for i in index]).repeat_interleave(len(grid), dim=0)
        pred = unet(add_noise(latents, noise, a_t), timesteps, encoder_hidden_states=context, return_dict=False)[0]
        loss = per_sample_loss(pred, training_target(prediction_type, latents, noise, a_t), snr(a_t), snr_gamma,
                               prediction_type)
        total += loss.double().sum().cpu()
        count += loss.numel()
    return float(total / count)


# --------------------------------------------------------------------------------------------
# The run's best step
# --------------------------------------------------------------------------------------------
def validation_summary(log: str | Path) -> dict:
    """run_info's best_val_loss, best_val_step and final_val_loss (and the same with _ema) from a
    run's train_log.jsonl, read at the end so that a resumed run counts the steps before its resume;
    {} when no line has a validation loss. Ties: the earliest step."""
    path = Path(log)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    summary = {}
    for key, suffix in (("val_loss", ""), ("val_loss_ema", "_ema")):
        scored = [(r[key], r["step"]) for r in records
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if scored:
            value, step = min(scored)
            summary[f"best_val_loss{suffix}"], summary[f"best_val_step{suffix}"] = value, step
            summary[f"final_val_loss{suffix}"] = max(scored, key=lambda vs: vs[1])[0]
    return summary
