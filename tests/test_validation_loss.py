"""Validation loss on held-out data (ldm/validation_loss.py): the split, the fixed grid, noise and
captions, the loss against known answers, determinism, and one training run that logs it."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ldm.diffusion import min_snr_weight, snr
from ldm.errors import UsageError
from ldm.validation_loss import (HeldOut, example_keys, fixed_captions, fixed_draws, held_out_rows, per_sample_loss,
                                 split_dataset, timestep_grid, validation_loss, validation_summary)


# ------------------------------------------------------------------------------- the split
def test_timestep_grid_is_the_cell_midpoints():
    assert timestep_grid(1000, 4).tolist() == [125, 375, 625, 875]
    assert timestep_grid(1000, 1).tolist() == [500]
    assert timestep_grid(10, 10).tolist() == list(range(10))
    assert timestep_grid(1000, 8).dtype == torch.long
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="between 1 and 1000"):
            timestep_grid(1000, bad)


def test_held_out_rows_depend_on_the_keys_not_their_order():
    keys = [f"image-{i}" for i in range(1000)]
    held = held_out_rows(keys, 0.05, seed=0)
    assert len(held) == 50 and held == sorted(held)
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    assert {shuffled[i] for i in held_out_rows(shuffled, 0.05, seed=0)} == {keys[i] for i in held}
    assert set(held) < set(held_out_rows(keys, 0.10, seed=0))  # a larger split holds these out too
    assert set(held) != set(held_out_rows(keys, 0.05, seed=1))  # the seed picks others
    assert held_out_rows(keys, 0.0, seed=0) == []
    assert len(held_out_rows(keys[:3], 0.05, seed=0)) == 1  # at least one
    with pytest.raises(UsageError, match="--validation_split 0.9 holds out 2 of 2 examples: none would be left"):
        held_out_rows(keys[:2], 0.9, seed=0)


def test_split_dataset_by_content_never_trains_on_a_held_out_image():
    from datasets import Dataset

    rows = {"image_hash": [f"{i:064x}" for i in range(40)], "text": [f"caption {i % 7}" for i in range(40)]}
    ds = Dataset.from_dict(rows)
    train, held = split_dataset(ds, 0.25, seed=0)
    assert (len(train), len(held)) == (30, 10)
    train_keys, held_keys = set(example_keys(train)), set(example_keys(held))
    assert not train_keys & held_keys and train_keys | held_keys == set(example_keys(ds))
    reordered = ds.select(list(range(39, -1, -1)))  # the same folder listed in another order
    assert set(example_keys(split_dataset(reordered, 0.25, seed=0)[1])) == held_keys
    # the built-in data (no content hashes) is keyed by row
    assert example_keys(Dataset.from_dict({"text": ["a", "b"]})) == ["0", "1"]


def test_validation_flags_are_checked_with_one_line(tmp_path):
    from ldm.config import resolve_train_config

    data = tmp_path / "data"
    data.mkdir()
    cases = {("--validation_split", "1.0"): "--validation_split must be in [0, 1), got 1.0",
             ("--validation_loss_timesteps", "0"): "--validation_loss_timesteps must be >= 1",
             ("--validation_split", "0.1", "--validation_data_dir", str(data)): "not both",
             ("--train_data_dir", str(data), "--validation_data_dir", str(data)): "is the training folder",
             ("--validation_data_dir", str(tmp_path / "nope")): f"--validation_data_dir {tmp_path / 'nope'}: "}
    for argv, message in cases.items():
        with pytest.raises(UsageError) as err:
            resolve_train_config(["--output_dir", str(tmp_path / "out"), *argv])
        assert message in str(err.value) and "\n" not in str(err.value), argv


# ------------------------------------------------------------------------------- fixed draws
def test_fixed_draws_belong_to_the_example_not_the_batch():
    moments = torch.randn(5, 8, 4, 4)  # (B, 2C, h, w): mean and log-variance of 4 channels
    latents, noise = fixed_draws(moments[[1, 3]], [1, 3], seed=0, num_timesteps=3, scaling_factor=0.5)
    assert latents.shape == noise.shape == (6, 4, 4, 4)
    assert torch.equal(latents[0], latents[2]) and not torch.equal(noise[0], noise[1])  # one z, K noises
    alone_latents, alone_noise = fixed_draws(moments[[3]], [3], seed=0, num_timesteps=3, scaling_factor=0.5)
    assert torch.equal(alone_latents, latents[3:]) and torch.equal(alone_noise, noise[3:])
    again = fixed_draws(moments[[1, 3]], [1, 3], seed=0, num_timesteps=3, scaling_factor=0.5)
    assert torch.equal(again[1], noise) and not torch.equal(fixed_draws(moments[[1, 3]], [1, 3], 1, 3, 0.5)[1], noise)
    # z = scale * (mean + std * n): a posterior of zero variance gives the scaled mean itself
    sure = torch.cat([moments[:, :4], torch.full((5, 4, 4, 4), -60.0)], dim=1)
    z, _ = fixed_draws(sure, range(5), seed=0, num_timesteps=1, scaling_factor=0.5)
    torch.testing.assert_close(z, 0.5 * moments[:, :4])


def test_fixed_captions_pick_one_caption_per_example_once():
    cells = ["a red circle", ["one", "two", "three", "four"], ["x", "y"]]
    picked = fixed_captions(cells, seed=0)
    assert picked[0] == "a red circle" and picked[1] in cells[1] and picked[2] in cells[2]
    assert fixed_captions(cells, seed=0) == picked
    assert len({fixed_captions([cells[1]] * 1, seed=s)[0] for s in range(20)}) > 1  # keyed by the seed


# ------------------------------------------------------------------------------- the loss
def test_per_sample_loss_is_the_mse_times_the_min_snr_weight():
    target = torch.randn(3, 4, 2, 2)
    assert per_sample_loss(target, target, torch.ones(3), None, "epsilon").tolist() == [0.0, 0.0, 0.0]
    off_by_one = per_sample_loss(target + 1, target, torch.ones(3), None, "epsilon")
    torch.testing.assert_close(off_by_one, torch.ones(3))
    snr_t = torch.tensor([10.0, 5.0, 1.0])  # epsilon: min(1, gamma / SNR) = 0.5, 1, 1
    torch.testing.assert_close(per_sample_loss(target + 1, target, snr_t, 5.0, "epsilon"),
                               torch.tensor([0.5, 1.0, 1.0]))


class ZeroModel(torch.nn.Module):
    """Predicts 0 whatever its input."""

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        return (torch.zeros_like(x),)


class NoiseOracle(torch.nn.Module):
    """epsilon for clean latents of 0: x_t = sqrt(1 - a_t) eps, so eps = x_t / sqrt(1 - a_t)."""

    def __init__(self, alpha_bar):
        super().__init__()
        self.alpha_bar = alpha_bar

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        return (x / (1 - self.alpha_bar[t]).sqrt().view(-1, 1, 1, 1),)


def _standard_normal_latents(n: int, log_var: float = 0.0) -> HeldOut:
    """Posteriors N(0, exp(log_var)) over (4, 8, 8) latents."""
    return HeldOut(torch.cat([torch.zeros(n, 4, 8, 8), torch.full((n, 4, 8, 8), log_var)], dim=1),
                   [f"caption {i}" for i in range(n)])


def _loss(model, held_out, alpha_bar, prediction_type="epsilon", snr_gamma=None, batch_size=16, grid=None):
    return validation_loss(model, held_out, lambda captions: torch.zeros(len(captions), 3, 2), alpha_bar=alpha_bar,
                           grid=timestep_grid(1000, 8) if grid is None else grid, prediction_type=prediction_type,
                           snr_gamma=snr_gamma, seed=0, scaling_factor=1.0, batch_size=batch_size)


@pytest.fixture(scope="module")
def alpha_bar():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod


def test_a_model_that_predicts_zero_scores_the_target_variance(alpha_bar):
    """eps ~ N(0, I): E[eps^2] = 1. v = sqrt(a) eps - sqrt(1 - a) z with z ~ N(0, I): E[v^2] = 1 too.
    64 examples x 8 timesteps x 256 elements: the mean is 1 within ~0.005 (one standard deviation)."""
    held_out = _standard_normal_latents(64)
    for prediction_type in ("epsilon", "v_prediction"):
        assert abs(_loss(ZeroModel(), held_out, alpha_bar, prediction_type) - 1.0) < 0.03, prediction_type
    # min-SNR-5 on epsilon: each timestep's E[eps^2] = 1 weighted by min(1, 5 / SNR(t))
    grid = timestep_grid(1000, 8)
    expected = min_snr_weight(snr(alpha_bar[grid]), 5.0, "epsilon").mean().item()
    assert expected < 0.9  # the weights matter here
    assert abs(_loss(ZeroModel(), held_out, alpha_bar, snr_gamma=5.0) - expected) < 0.03


def test_a_model_that_knows_the_noise_scores_zero(alpha_bar):
    """Clean latents of 0 (a posterior of zero variance): the oracle reads eps back exactly, at the
    grid timesteps the loss used to build x_t; a model told other timesteps would not."""
    held_out = _standard_normal_latents(6, log_var=-60.0)
    grid = timestep_grid(1000, 8)[:-1]  # away from t = T - 1, where 1 - a_t divides nothing away
    assert _loss(NoiseOracle(alpha_bar), held_out, alpha_bar, grid=grid) < 1e-8
    shifted = alpha_bar.roll(100)
    assert _loss(NoiseOracle(shifted), held_out, alpha_bar, grid=grid) > 1e-3


def test_the_same_weights_give_the_same_number(tiny_components):
    """The tiny preset's U-Net: repeated calls are equal to the bit, batching changes only rounding,
    other weights give another number."""
    import copy

    unet = copy.deepcopy(tiny_components.unet).eval()
    alpha_bar = tiny_components.noise_scheduler.alphas_cumprod
    moments = torch.randn(3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    held_out = HeldOut(moments, ["a red circle on the left"] * 3)
    context = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(1))
    kw = dict(alpha_bar=alpha_bar, grid=timestep_grid(1000, 2), prediction_type="v_prediction", snr_gamma=None,
              seed=0, scaling_factor=1.0)

    def encode(captions):
        return context.expand(len(captions), -1, -1)

    first = validation_loss(unet, held_out, encode, batch_size=4, **kw)
    assert validation_loss(unet, held_out, encode, batch_size=4, **kw) == first
    assert abs(validation_loss(unet, held_out, encode, batch_size=6, **kw) - first) < 1e-5
    with torch.no_grad():
        next(unet.parameters()).add_(0.1)
    assert abs(validation_loss(unet, held_out, encode, batch_size=4, **kw) - first) > 1e-6


def test_encode_held_out_is_the_vae_posterior_of_the_centre_crop():
    from diffusers import AutoencoderKL

    from ldm.data import image_transform, to_rgb
    from ldm.presets import ASSETS
    from ldm.synthetic import make_dataset
    from ldm.validation_loss import encode_held_out

    vae = AutoencoderKL.from_pretrained(ASSETS / "tiny_vae").eval()
    ds = make_dataset(3, 32, seed=0)
    held = encode_held_out(ds, vae, resolution=32, seed=0)
    pixels = torch.stack([image_transform(32, center_crop=True, random_flip=False)(to_rgb(im)) for im in ds["image"]])
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.parameters
    assert held.moments.shape == (3, 8, 16, 16)
    torch.testing.assert_close(held.moments, expected, rtol=0, atol=1e-5)
    assert held.captions == list(ds["text"])


def test_validation_summary_keeps_the_best_and_the_last_step(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9, "val_loss": 0.5, "val_loss_ema": 0.7},
             {"step": 4, "loss": 0.8, "val_loss": 0.4, "val_loss_ema": 0.6},
             {"step": 6, "loss": 0.7, "val_loss": 0.4, "val_loss_ema": 0.65}]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert validation_summary(log) == {"best_val_loss": 0.4, "best_val_step": 4, "final_val_loss": 0.4,
                                       "best_val_loss_ema": 0.6, "best_val_step_ema": 4, "final_val_loss_ema": 0.65}
    assert validation_summary(tmp_path / "missing.jsonl") == {}
    log.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert validation_summary(log) == {}


# ------------------------------------------------------------------------------- a training run
@pytest.mark.slow
def test_a_run_logs_the_held_out_loss_and_resumes_to_the_same_numbers(tmp_path):
    """48 built-in images, a quarter held out: val_loss and val_loss_ema at steps 2 and 4 (every
    --validation_steps; the end is step 4), the best step in run_info.json and the model card; a
    run resumed from step 2 logs the same numbers to the bit."""
    from test_reliability import BASE, resume_copy, run, same_state, trace

    args = [*BASE, "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "2",
            "--num_validation_images", "0", "--validation_split", "0.25"]
    reference = tmp_path / "reference"
    run(["--output_dir", str(reference), *args])
    steps = trace(reference)
    assert [r["step"] for r in steps if "val_loss" in r] == [2, 4]
    assert all("val_loss_ema" in r for r in steps if "val_loss" in r)
    info = json.loads((reference / "run_info.json").read_text())
    assert info["num_examples"] == 36 and info["validation_examples"] == 12
    best = min((r["val_loss"], r["step"]) for r in steps if "val_loss" in r)
    assert (info["best_val_loss"], info["best_val_step"]) == best
    assert info["final_val_loss_ema"] == steps[-1]["val_loss_ema"]
    assert f"| validation loss | {info['final_val_loss_ema']:.4g}" in (reference / "README.md").read_text()
    # the held-out images are never trained on: 36 training indices, every step's from them
    assert max(i for r in steps for i in r["indices"]) < 36

    resumed = tmp_path / "resumed"
    resume_copy(reference, resumed, 2)
    run(["--output_dir", str(resumed), *args, "--resume_from_checkpoint", "latest"])
    assert same_state(reference, resumed) == []  # train_log.jsonl, val_loss included
