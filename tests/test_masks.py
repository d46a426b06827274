"""Masked loss (ldm/masks.py): the weighting, masks in the data check, the augmentations and the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data import AugmentedImages, checked_folder, training_dataloader
from ldm.datacheck import check_rows, folder_rows
from ldm.masks import MaskCache, latent_mask, masked_mean, to_latent_size

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- the weighting
def test_masked_mean_against_hand_computed_values():
    loss = torch.arange(8.0).reshape(1, 2, 2, 2)  # channel 0: [[0, 1], [2, 3]], channel 1: [[4, 5], [6, 7]]
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    # (0*1 + 2*0.5 + 4*1 + 6*0.5) / (2 channels * (1 + 0.5)) = 8 / 3
    assert torch.allclose(masked_mean(loss, mask), torch.tensor([8 / 3]))
    assert torch.equal(masked_mean(loss, None), torch.tensor([3.5]))


def test_masked_mean_all_ones_is_the_plain_mean_and_all_zeros_is_zero():
    loss = torch.rand(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 1, 5, 5)
    mask[2] = 0
    out = masked_mean(loss, mask)
    assert torch.allclose(out[:2], loss[:2].mean(dim=(1, 2, 3)))
    assert out[2] == 0


def test_mask_is_area_averaged_to_latent_size():
    mask = torch.tensor([[[[1.0, 1.0, 0.0, 0.0],
                           [1.0, 0.0, 0.0, 0.0],
                           [1.0, 1.0, 1.0, 1.0],
                           [1.0, 1.0, 0.0, 1.0]]]])
    assert torch.equal(to_latent_size(mask, (2, 2)), torch.tensor([[[[0.75, 0.0], [1.0, 0.75]]]]))
    assert to_latent_size(mask, (4, 4)) is mask
    latents = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    assert latent_mask({"mask": mask}, latents).dtype == torch.float64
    assert latent_mask({}, latents) is None


# ------------------------------------------------------------------------------- folders and the check
def halves(size=(32, 32), left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    img = Image.new("RGB", size, right)
    img.paste(Image.new("RGB", (size[0] // 2, size[1]), left), (0, 0))
    return img


def left_mask(size=(32, 32)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(Image.new("L", (size[0] // 2, size[1]), 255), (0, 0))
    return mask


def masked_folder(root: Path, n: int = 4, layout: str = "sidecar") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        halves().save(root / f"{i:04d}.png")
        if layout == "sidecar":
            (root / f"{i:04d}.txt").write_text(f"image {i}")
            if i % 2 == 0:
                left_mask().save(root / f"{i:04d}.mask.png")
        else:
            row = {"file_name": f"{i:04d}.png", "text": f"image {i}"}
            if i % 2 == 0:
                (root / "masks").mkdir(exist_ok=True)
                left_mask().save(root / "masks" / f"m{i}.png")
                row["mask_file_name"] = f"masks/m{i}.png"
            rows.append(row)
    if rows:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("layout", ["sidecar", "metadata"])
def test_masks_are_found_and_never_training_images(tmp_path, layout):
    root = masked_folder(tmp_path / "d", layout=layout)
    scan = folder_rows(root)
    assert len(scan.rows) == 4 and not scan.unlisted  # masks: no rows, not "unlisted" images either
    masks = [r.mask.name if r.mask else None for r in scan.rows]
    assert masks == (["0000.mask.png", None, "0002.mask.png", None] if layout == "sidecar"
                     else ["m0.png", None, "m2.png", None])
    kept, report = check_rows(scan.rows, source=str(root))
    assert report.masks == 2 and not report.problems
    ds = checked_folder(root)
    assert [m is not None for m in ds["mask"]] == [True, False, True, False]
    assert ds["mask_hash"][1] is None and len(ds["mask_hash"][0]) == 64


def test_a_folder_without_masks_gets_no_mask_column(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    halves().save(root / "a.png")
    (root / "a.txt").write_text("a")
    assert "mask" not in checked_folder(root).column_names


def test_unreadable_and_wrongly_sized_masks_are_reported_by_file(tmp_path):
    root = masked_folder(tmp_path / "d")
    (root / "0000.mask.png").write_bytes(b"not a png")
    left_mask((16, 16)).save(root / "0002.mask.png")
    kept, report = check_rows(folder_rows(root).rows, source=str(root))
    problems = dict(report.problems)
    assert len(kept) == 2 and report.counts()["bad mask"] == 2
    assert problems[str(root / "0000.png")].startswith(f"bad mask: {(root / '0000.mask.png').resolve()}: unreadable")
    assert problems[str(root / "0002.png")] == (f"bad mask: {(root / '0002.mask.png').resolve()} is 16x16, "
                                                "its image 32x32")
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "check_data.py"), "--train_data_dir", str(root),
                           "--max_length", "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "0002.mask.png is 16x16, its image 32x32" in proc.stdout
    assert "skipped: bad mask" in proc.stdout


def test_a_missing_mask_file_name_is_reported(tmp_path):
    root = masked_folder(tmp_path / "d", layout="metadata")
    (root / "masks" / "m2.png").unlink()
    _, report = check_rows(folder_rows(root).rows, source=str(root))
    assert [p for _, p in report.problems] == [f"bad mask: {root.resolve() / 'masks/m2.png'} not found"]


# ------------------------------------------------------------------------------- augmentation and cache
def test_the_mask_follows_its_images_crop_and_flip(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    halves((48, 32)).save(root / "a.png")  # red left half: resized to 24 x 16, then a random 16 x 16 crop
    left_mask((48, 32)).save(root / "a.mask.png")
    (root / "a.txt").write_text("a")
    aug = AugmentedImages(checked_folder(root), resolution=16, center_crop=False, random_flip=True, seed=0)
    seen = set()
    for epoch in range(12):
        aug.set_epoch(epoch)
        item = aug[0]
        red = (item["pixel_values"][0] > 0) & (item["pixel_values"][2] < 0)  # (16, 16): the red (masked) part
        assert torch.equal(item["mask"][0] > 0.5, red), epoch
        seen.add((bool(red[:, 0].all()), int(red.sum())))  # red on the left (not flipped), its width (the crop)
    assert {left for left, _ in seen} == {True, False}  # flipped in some epochs, not in others
    assert len({width for _, width in seen}) > 1  # and cropped at different places


def test_a_row_without_a_mask_trains_everywhere(tmp_path):
    aug = AugmentedImages(checked_folder(masked_folder(tmp_path / "d")), resolution=16, center_crop=True,
                          random_flip=False, seed=0)
    assert torch.equal(aug[1]["mask"], torch.ones(1, 16, 16))
    assert aug[0]["mask"][0, :, :7].min() == 1 and aug[0]["mask"][0, :, 9:].max() == 0  # the edge: resized


def test_cached_masks_at_latent_resolution_and_a_cache_made_without_masks(tmp_path):
    from ldm.models import load_vae
    from ldm.presets import model_preset

    vae = load_vae(model_preset("tiny").pretrained_vae).eval()
    root = masked_folder(tmp_path / "d")
    kw = dict(resolution=32, batch_size=4, seed=0, vae=vae, cache_latents=True, cache_dir=str(tmp_path / "cache"))
    plain = checked_folder(root).remove_columns(["mask", "mask_hash"])  # as before the masks were added
    loader, _ = training_dataloader(plain, **kw)
    assert "mask" not in next(iter(loader))
    assert not (tmp_path / "cache" / "masks").exists()

    loader, _ = training_dataloader(checked_folder(root), **kw)  # the same latents, now with masks
    batch = next(iter(loader))
    assert batch["mask"].shape == (4, 1, 16, 16)  # the tiny VAE: f = 2
    expected = torch.zeros(16, 16)
    expected[:, :8] = 1
    for row, index in enumerate(batch["index"]):
        assert torch.allclose(batch["mask"][row, 0], expected if index % 2 == 0 else torch.ones(16, 16), atol=1e-6)
    assert len(list((tmp_path / "cache" / "masks").rglob("*.safetensors"))) == 1  # two masks, one content

    mirrored = left_mask().transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # another mask: another key
    mirrored.save(root / "0002.mask.png")
    loader, _ = training_dataloader(checked_folder(root), **kw)
    batch = next(iter(loader))
    row = batch["index"].index(2)
    assert torch.allclose(batch["mask"][row, 0], 1 - expected, atol=1e-6)
    assert len(list((tmp_path / "cache" / "masks").rglob("*.safetensors"))) == 2


def test_mask_cache_keys_depend_on_the_mask_and_the_preprocessing():
    from ldm.cache import Preprocess

    cache = MaskCache(None, factor=2)
    a = cache.key("h1", Preprocess((32, 32)))
    assert a != cache.key("h2", Preprocess((32, 32))) != cache.key("h1", Preprocess((32, 32), flip=True))
    assert MaskCache(None, factor=4).key("h1", Preprocess((32, 32))) != a
    assert cache.shape(Preprocess((32, 16), resize="cover")) == (1, 8, 16)
