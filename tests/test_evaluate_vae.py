"""training/evaluate_vae.py end to end on a tiny VAE, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.models import build_vae
from ldm.presets import ASSETS, VAEConfig
from ldm.synthetic import make_examples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    build_vae(VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4), 32).save_pretrained(path)
    return path


def test_evaluate_a_tiny_vae_on_the_built_in_shapes(tiny_vae_dir, tmp_path):
    from training.evaluate_vae import main

    report = main(["--vae", str(tiny_vae_dir), "--num_images", "8", "--out", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == report
    assert report["num_images"] == 8 and report["latent"] == [4, 16] and report["data"] == "builtin"
    vae, bicubic = report["vae_metrics"], report["bicubic_metrics"]
    assert vae["psnr"] < 20 < bicubic["psnr"]  # an untrained VAE loses to a 16x16 thumbnail
    assert 0 < vae["ssim"] < bicubic["ssim"] <= 1 and vae["l1"] > bicubic["l1"] > 0
    assert Image.open(tmp_path / "eval" / "reconstructions.png").size == (8 * 32, 3 * 32)  # rows: x, VAE, bicubic


def test_the_report_goes_under_outputs_not_into_the_vae_folder(tiny_vae_dir, tmp_path, monkeypatch):
    from training.evaluate_vae import main

    before = sorted(p.name for p in tiny_vae_dir.iterdir())
    monkeypatch.chdir(tmp_path)
    main(["--vae", str(tiny_vae_dir), "--num_images", "2"])
    assert (tmp_path / "outputs" / "eval_vae" / f"{tiny_vae_dir.name}_builtin" / "metrics.json").is_file()
    assert sorted(p.name for p in tiny_vae_dir.iterdir()) == before


def test_the_shipped_vae_beats_bicubic_on_the_built_in_shapes(tmp_path):
    from training.evaluate_vae import main

    report = main(["--vae", str(ASSETS / "tiny_vae"), "--num_images", "32", "--out", str(tmp_path)])
    assert report["vae_metrics"]["psnr"] > report["bicubic_metrics"]["psnr"] + 3
    assert report["vae_metrics"]["psnr"] > 33


@pytest.mark.parametrize("data", ["other-palette", "photos-heldout", "diverse"])
def test_every_generated_data_kind(tiny_vae_dir, tmp_path, data):
    if data == "photos-heldout":
        pytest.importorskip("skimage")
    from training.evaluate_vae import main

    report = main(["--vae", str(tiny_vae_dir), "--data", data, "--num_images", "4", "--out", str(tmp_path)])
    assert report["data"] == data and report["num_images"] == 4 and report["bicubic_metrics"]["psnr"] > 15


def test_evaluate_on_a_folder_of_images_without_captions(tiny_vae_dir, tmp_path):
    from training.evaluate_vae import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(make_examples(3, 48, seed=0)[0]):  # resized and centre-cropped to 32
        im.save(folder / f"{i}.png")
    report = main(["--vae", str(tiny_vae_dir), "--train_data_dir", str(folder), "--out", str(tmp_path / "e")])
    assert report["num_images"] == 3 and report["data"] == str(folder)


@pytest.mark.parametrize("args, message", [
    (["--vae", "/nonexistent/vae"], "--vae /nonexistent/vae: no such folder"),
    (["--vae", "ASSETS", "--data", "builtin", "--train_data_dir", "x"], "--train_data_dir and --data: give one of them"),
    (["--vae", "ASSETS", "--num_images", "0"], "--num_images must be >= 1, got 0"),
    (["--vae", "ASSETS", "--train_data_dir", "/nonexistent/imgs"], "/nonexistent/imgs"),
])
def test_mistakes_are_one_line(args, message, tmp_path):
    args = [str(ASSETS / "tiny_vae") if a == "ASSETS" else a for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "evaluate_vae.py"), *args, "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
