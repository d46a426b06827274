"""ldm/first_stage_data.py: the diverse mix is deterministic, any resolution, keeps its held-out photos out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm import first_stage_data as fsd
from ldm.synthetic import BACKGROUNDS, COLORS


@pytest.mark.parametrize("kind", sorted(fsd.MIX))
def test_every_kind_renders_at_any_resolution(kind):
    if kind == "photo":
        pytest.importorskip("skimage")
    for resolution in (24, 32, 48):
        images = [fsd.diverse_image(0, i, resolution, {kind: 1.0}) for i in range(6)]
        assert all(im.size == (resolution, resolution) and im.mode == "RGB" for im in images)
        arrays = [np.asarray(im) for im in images]
        assert len({a.tobytes() for a in arrays}) == len(arrays)  # six different images


def test_image_is_a_pure_function_of_seed_and_index():
    a = [np.asarray(fsd.diverse_image(3, i, 32)) for i in range(20)]
    b = [np.asarray(fsd.diverse_image(3, i, 32)) for i in reversed(range(20))][::-1]
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[0] == np.asarray(fsd.diverse_image(4, 0, 32))).all()


def test_dataset_items_are_pixels_in_minus_one_one():
    ds = fsd.FirstStageImages(10, 32, seed=1)
    item = ds[7]
    assert len(ds) == 10 and item["text"] == "" and item["pixel_values"].shape == (3, 32, 32)
    x = item["pixel_values"]
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, fsd.to_tensor(fsd.diverse_image(1, 7, 32)))


def test_the_mix_is_diverse_in_colour():
    """Over 200 images: many distinct mean colours, flat and busy images both present."""
    arrays = np.stack([np.asarray(fsd.diverse_image(0, i, 32), dtype=np.float32) for i in range(200)])
    means = arrays.mean(axis=(1, 2))  # (200, 3)
    assert len({tuple((m // 32).astype(int)) for m in means}) > 60  # of 512 coarse colour bins
    spread = arrays.std(axis=(1, 2)).mean(axis=1)
    assert (spread < 20).sum() > 10 and (spread > 50).sum() > 10


def test_held_out_photos_are_never_trained_on():
    assert not set(fsd.HELD_OUT_PHOTOS) & set(fsd.TRAIN_PHOTOS)
    pytest.importorskip("skimage")
    held = fsd.heldout_photo_crops(12, 32)
    assert len(held) == 12 and all(im.size == (32, 32) for im in held)
    assert {im.tobytes() for im in held} == {im.tobytes() for im in fsd.heldout_photo_crops(12, 32)}


def test_without_scikit_image_the_mix_has_no_photos(monkeypatch):
    monkeypatch.setattr(fsd, "photo_dir", lambda: None)
    images = [fsd.diverse_image(0, i, 32, {"photo": 1.0, "gradient": 1e-9}) for i in range(3)]
    assert all(im.size == (32, 32) for im in images)  # drawn from the other kinds


def test_other_palette_shapes_use_no_built_in_colour():
    images = fsd.other_palette_shapes(40, 32, seed=0)
    corners = {tuple(np.asarray(im)[0, 0]) for im in images}
    assert corners <= set(fsd.OTHER_BACKGROUNDS) and len(corners) >= 3
    assert not corners & set(BACKGROUNDS.values())
    pixels = {tuple(p) for im in images for p in np.asarray(im).reshape(-1, 3)}
    assert not pixels & set(COLORS.values())


def test_parse_mix_changes_only_the_named_shares():
    mix = fsd.parse_mix("builtin=0.3, photo=0")
    assert mix["builtin"] == 0.3 and mix["photo"] == 0
    assert {k: v for k, v in mix.items() if k not in ("builtin", "photo")} == \
        {k: v for k, v in fsd.MIX.items() if k not in ("builtin", "photo")}
    assert fsd.parse_mix("") == fsd.MIX
    only_text = fsd.parse_mix(",".join(f"{k}={int(k == 'text')}" for k in fsd.MIX))
    image = fsd.diverse_image(0, 5, 32, only_text)
    assert (np.asarray(image) == np.asarray(fsd.diverse_image(0, 5, 32, {"text": 1.0}))).all()


@pytest.mark.parametrize("text, message", [("circles=1", "kind one of"), ("builtin", "kind=weight"),
                                           ("builtin=x", "not a number"), ("builtin=-1", ">= 0"),
                                           (",".join(f"{k}=0" for k in fsd.MIX), "every weight is 0")])
def test_parse_mix_names_the_bad_part(text, message):
    with pytest.raises(ValueError, match=message):
        fsd.parse_mix(text)
