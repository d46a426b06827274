"""training/train_vae.py: the loss, a short run, and the shipped tiny VAE."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from ldm.presets import ASSETS
from ldm.synthetic import make_examples

ROOT = Path(__file__).resolve().parents[1]


def train_vae(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "training" / "train_vae.py"), "--cpu_threads", "1", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_short_vae_run_saves_a_diffusers_vae_with_its_scaling_factor(tmp_path):
    out = tmp_path / "vae"
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "train_vae.py"), "--output_dir", str(out),
                           "--max_train_steps", "3", "--builtin_num_images", "64", "--train_batch_size", "16",
                           "--cpu_threads", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "device: cpu (1 threads)" in proc.stderr  # --cpu_threads reaches torch
    info = json.loads((out / "vae_info.json").read_text())
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.scaling_factor == pytest.approx(1.0 / info["latent_std"])
    assert (out / "diffusion_pytorch_model.safetensors").exists() and (out / "reconstructions.png").exists()


def test_shipped_tiny_vae_reconstructs_and_gives_unit_variance_latents():
    """The VAE in ldm/assets reconstructs built-in images closely; scaled latents have std ~1."""
    vae = AutoencoderKL.from_pretrained(ASSETS / "tiny_vae")
    assert (ASSETS / "tiny_vae" / "diffusion_pytorch_model.safetensors").stat().st_size < 4_000_000
    images, _ = make_examples(64, 32, seed=123)  # a seed it was not trained on
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    x = x.float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    assert z.shape == (64, 4, 16, 16)
    assert 0.8 < (z * vae.config.scaling_factor).std().item() < 1.25
    assert (recon - x).abs().mean().item() < 0.03  # mean L1 on [-1, 1] pixels


def test_latent_contrast_finds_the_low_contrast_pair_of_the_shipped_vae(tmp_path):
    """benchmarks/latent_contrast.py: one colour on its own background gives 0 (nothing to draw), and
    on the shipped VAE yellow on white is the pair whose square and circle differ least (~3x less
    with the VAE trained on the shapes alone, ~1.5x with the diverse mix, ~1.4x with its --kl_weight 1e-3
    fine-tune, the one shipped)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.latent_contrast import main, shape_contrast

    vae = AutoencoderKL.from_pretrained(ASSETS / "tiny_vae").eval()
    assert shape_contrast(vae, (245, 245, 245), (245, 245, 245), 32, 0.145) == (0.0, 0.0)

    out = tmp_path / "contrast.json"
    table = main(["--out", str(out)])
    assert json.loads(out.read_text()) == table
    white = {name: v["latent"] for name, v in table["white"].items()}
    assert min(white, key=white.get) == "yellow"
    others = [v for name, v in white.items() if name != "yellow"]
    assert white["yellow"] * 1.3 < min(others)
    assert table["gray"]["yellow"]["latent"] > 1.2 * white["yellow"]  # the same yellow on gray is fine


def _uncaptioned_folder(root: Path, n: int) -> Path:
    """n images and no caption anywhere (a VAE needs none), plus one file that is not an image."""
    root.mkdir()
    for i, image in enumerate(make_examples(n, 32, seed=0)[0]):
        image.save(root / f"img_{i}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def test_image_folder_needs_no_captions_and_skips_bad_images(tmp_path):
    from training.train_vae import image_folder

    ds = image_folder(str(_uncaptioned_folder(tmp_path / "data", 3)))
    assert len(ds) == 3 and ds["text"] == ["", "", ""]
    assert ds[0]["image"].size == (32, 32)
    # metadata without a caption column is fine too: only file_name is read
    meta = tmp_path / "meta"
    meta.mkdir()
    make_examples(1, 32, seed=1)[0][0].save(meta / "a.png")
    (meta / "metadata.jsonl").write_text('{"file_name": "a.png", "label": 3}\n')
    assert len(image_folder(str(meta))) == 1


@pytest.mark.slow
def test_vae_trains_on_an_uncaptioned_folder_smaller_than_the_batch(tmp_path):
    data = _uncaptioned_folder(tmp_path / "data", 5)
    out = tmp_path / "vae"
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "train_vae.py"), "--output_dir", str(out),
                           "--train_data_dir", str(data), "--max_train_steps", "2", "--train_batch_size", "16",
                           "--cpu_threads", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "only 5 images: batch size 5 instead of 16" in proc.stderr
    info = json.loads((out / "vae_info.json").read_text())
    assert info["steps"] == 2 and np.isfinite(info["latent_std"]) and info["latent_std"] > 0


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_resume_gives_bit_identical_weights(tmp_path):
    """4 steps straight vs. 2 steps, checkpoint (mid-epoch), resume, 2 more: the same weights,
    with the discriminator, the EMA and random flips all in play."""
    common = ["--max_train_steps", "4", "--builtin_num_images", "32", "--train_batch_size", "8",
              "--checkpointing_steps", "2", "--checkpoints_total_limit", "5", "--disc_weight", "0.5",
              "--disc_channels", "8", "--use_ema", "--l2_weight", "1", "--lr_warmup_steps", "1"]
    straight = train_vae("--output_dir", str(tmp_path / "a"), *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert ", g " in straight.stderr and ", w " in straight.stderr  # the hinge game and adaptive weight ran
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-2", tmp_path / "b" / "checkpoints" / "checkpoint-2")
    resumed = train_vae("--output_dir", str(tmp_path / "b"), *common, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = _weights_of_checkpoint(tmp_path / "a" / "checkpoints" / "checkpoint-2")
    assert any(not torch.equal(before["vae." + k], a[k]) for k in a)  # it did train after the checkpoint


def _weights_of_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_fine_tune_decoder_only_from_a_single_file_vae_on_the_diverse_mix(tmp_path):
    """A single-file (original SD layout) VAE fine-tuned decoder-only: the encoder is untouched,
    the decoder moves; --latent_shift stores the latents' mean as shift_factor."""
    from safetensors.torch import save_file

    from ldm.export import vae_to_original

    shipped = AutoencoderKL.from_pretrained(ASSETS / "tiny_vae")
    original, left = vae_to_original(shipped.state_dict(), shipped.config)
    assert not left
    single = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(single))
    out = tmp_path / "ft"
    proc = train_vae("--output_dir", str(out), "--pretrained_vae_name_or_path", str(single), "--single_file_config",
                     str(ASSETS / "tiny_vae"), "--train_decoder_only", "--data", "diverse", "--diverse_num_images",
                     "64", "--max_train_steps", "2", "--train_batch_size", "8", "--latent_shift",
                     "--learning_rate", "1e-3", "--lr_warmup_steps", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned, before = _weights(out), shipped.state_dict()
    assert all(torch.equal(tuned[k], before[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(tuned[k], before[k]) for k in before if k.startswith("decoder."))
    info = json.loads((out / "vae_info.json").read_text())
    cfg = AutoencoderKL.load_config(out)
    assert cfg["shift_factor"] == pytest.approx(info["shift_factor"]) and info["shift_factor"] is not None
    assert cfg["scaling_factor"] == pytest.approx(1 / info["latent_std"])
    assert "no --lpips_weights: training without the perceptual loss" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--data", "photos"], "--data must be builtin or diverse, got 'photos'"),
    (["--diverse_mix", "builtin=0.3"], "--diverse_mix changes --data diverse"),
    (["--data", "diverse", "--diverse_mix", "squares=1"], "--diverse_mix 'squares=1': expected kind=weight"),
    (["--lpips_weights", "/nonexistent/lpips.pth"], "--lpips_weights /nonexistent/lpips.pth: no such file"),
    (["--resume_from_checkpoint", "checkpoint-9"], "is not a complete checkpoint folder"),
    (["--disc_start", "-1"], "--disc_start must be >= 0, got -1"),
    (["--scale_equivariance_weight", "-0.5"], "--scale_equivariance_weight must be >= 0, got -0.5"),
])
def test_mistakes_are_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "train_vae.py"), "--output_dir",
                           str(tmp_path / "out"), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_lpips_from_a_local_file_and_a_wrong_file(tmp_path):
    lpips = pytest.importorskip("lpips")
    from safetensors.torch import save_model

    weights = tmp_path / "lpips.safetensors"  # random backbone: nothing downloaded
    save_model(lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False), str(weights))
    proc = train_vae("--output_dir", str(tmp_path / "vae"), "--lpips_weights", str(weights), "--max_train_steps", "1",
                     "--builtin_num_images", "4", "--train_batch_size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"perceptual loss: LPIPS (VGG) from {weights}" in proc.stderr and "no --lpips_weights" not in proc.stderr
    wrong = tmp_path / "wrong.safetensors"
    save_model(torch.nn.Linear(2, 2), str(wrong))
    proc = train_vae("--output_dir", str(tmp_path / "vae2"), "--lpips_weights", str(wrong), "--max_train_steps", "1")
    assert proc.returncode == 2 and f"--lpips_weights {wrong}: not an LPIPS(net='vgg') state dict" in proc.stderr


def test_the_downsampled_decode_is_the_decoder_on_the_pooled_latent():
    """--scale_equivariance_weight's input: the same forward also decodes avg_pool2d(z, 2), the z
    that the full-size reconstruction decodes (one generator draw for both)."""
    sys.path.insert(0, str(ROOT))
    from training.train_vae import ReconstructionWithKL

    vae = AutoencoderKL.from_pretrained(ASSETS / "tiny_vae").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        recon, mean, logvar, small = ReconstructionWithKL(vae)(x, torch.Generator().manual_seed(0), downsampled=True)
        z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0))
        torch.testing.assert_close(recon, vae.decode(z).sample)
        torch.testing.assert_close(small, vae.decode(torch.nn.functional.avg_pool2d(z, 2)).sample)
    assert small.shape == (2, 3, 16, 16)
    assert ReconstructionWithKL(vae)(x)[3] is None
