"""training/train_vae.py: the loss, a short run, and the shipped tiny VAE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from ldm.config import ASSETS
from ldm.synthetic import make_examples

ROOT = Path(__file__).resolve().parents[1]


def test_vae_loss_against_the_formula():
    from training.train_vae import vae_loss

    x = torch.zeros(2, 3, 4, 4)
    recon = torch.full_like(x, 0.5)
    kl = torch.tensor([10.0, 30.0])
    total, rec = vae_loss(x, recon, kl, kl_weight=0.1)
    assert rec.item() == pytest.approx(0.5)
    assert total.item() == pytest.approx(0.5 + 0.1 * 40.0 / x.numel())


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
    on the shipped VAE yellow on white is the pair whose square and circle differ least (~3x less)."""
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
    assert white["yellow"] * 2 < min(others)
    assert table["gray"]["yellow"]["latent"] > 2 * white["yellow"]  # the same yellow on gray is fine


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
