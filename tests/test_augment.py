"""Random crops and flips drawn per sample, keyed by (seed, epoch, index): no global RNG."""

from __future__ import annotations

import random

import numpy as np
import torch
from datasets import Dataset
from PIL import Image

from ldm.data import AugmentedImages, image_transform, training_dataloader


def images(n: int = 6, size: tuple[int, int] = (40, 24)) -> Dataset:
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
    return Dataset.from_dict({"image": pics, "text": [f"image {i}" for i in range(n)]})


def pixels(ds, epoch: int, order) -> list[torch.Tensor]:
    ds.set_epoch(epoch)
    return [ds[i]["pixel_values"] for i in order]


def test_crops_and_flips_depend_on_seed_epoch_and_index_only():
    data = images()
    a = AugmentedImages(data, resolution=16, center_crop=False, random_flip=True, seed=3)
    b = AugmentedImages(data, resolution=16, center_crop=False, random_flip=True, seed=3)
    first = pixels(a, 0, range(6))
    random.seed(123)
    torch.manual_seed(123)  # a global RNG in any state changes nothing
    backwards = pixels(b, 0, reversed(range(6)))[::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, backwards))
    assert all(x.shape == (3, 16, 16) for x in first)
    later = pixels(a, 1, range(6))
    assert not all(torch.equal(x, y) for x, y in zip(first, later))  # another epoch, other draws
    other_seed = pixels(AugmentedImages(data, resolution=16, center_crop=False, random_flip=True, seed=4), 0, range(6))
    assert not all(torch.equal(x, y) for x, y in zip(first, other_seed))


def test_crops_move_and_flips_mirror():
    data = images(n=1)
    ds = AugmentedImages(data, resolution=16, center_crop=False, random_flip=False, seed=0)
    crops = {tuple(pixels(ds, e, [0])[0].flatten()[:8].tolist()) for e in range(12)}
    assert len(crops) > 1  # the crop moves along the long side (40x24 -> 26x16)
    flip = AugmentedImages(data, resolution=16, center_crop=True, random_flip=True, seed=0)
    centre = AugmentedImages(data, resolution=16, center_crop=True, random_flip=False, seed=0)[0]["pixel_values"]
    seen = [pixels(flip, e, [0])[0] for e in range(12)]
    assert any(torch.equal(x, centre) for x in seen)
    assert any(torch.equal(x, centre.flip(-1)) for x in seen)
    # the fixed transform is the cache's: centre crop, no flip
    torch.testing.assert_close(centre, image_transform(16, center_crop=True, random_flip=False)(data[0]["image"]))


def test_worker_count_does_not_change_the_pixels():
    data = images(n=8)
    batches = []
    for workers in (0, 2):
        loader, _ = training_dataloader(data, resolution=16, batch_size=4, seed=1, center_crop=False,
                                        random_flip=True, num_workers=workers)
        loader.dataset.set_epoch(2)
        batches.append([b["pixel_values"] for b in loader])
    assert all(torch.equal(x, y) for x, y in zip(*batches))
