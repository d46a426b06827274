"""The built-in data set: deterministic, held-out compositions never trained on, exportable."""

from __future__ import annotations

import json

import numpy as np

from ldm.synthetic import (BACKGROUND_WEIGHTS, BACKGROUNDS, COLORS, POSITIONS, SHAPES, all_compositions,
                           export_folder, held_out_compositions, make_examples, sample_scenes)


def test_same_seed_same_data_other_seed_other_data():
    a_img, a_cap = make_examples(40, 32, seed=3)
    b_img, b_cap = make_examples(40, 32, seed=3)
    c_img, c_cap = make_examples(40, 32, seed=4)
    assert a_cap == b_cap and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a_img, b_img))
    assert a_cap != c_cap


def test_held_out_compositions_never_appear_in_training():
    held = set(held_out_compositions())
    assert len(held) == 10
    scenes = sample_scenes(3000, seed=0)
    seen = {(o.color, o.shape, o.position) for s in scenes for o in s.objects}
    assert not seen & held
    # every colour, shape and position is still trained on, in other combinations
    assert {c for c, _, _ in seen} == set(COLORS)
    assert {s for _, s, _ in seen} == set(SHAPES)
    assert {p for _, _, p in seen} == set(POSITIONS)
    two = [s for s in scenes if len(s.objects) == 2]
    assert 0.15 < len(two) / len(scenes) < 0.35


def test_every_position_shows_every_shape_equally_often_despite_the_holes():
    """Three of the five squares at the bottom are held out: uniform over the allowed triples
    would draw bottom squares 20% of the time and bottom circles 50%."""
    from collections import Counter

    objects = [o for s in sample_scenes(6000, seed=0) for o in s.objects]
    for position in POSITIONS:
        shapes = Counter(o.shape for o in objects if o.position == position)
        total = sum(shapes.values())
        assert all(abs(shapes[s] / total - 1 / 3) < 0.04 for s in SHAPES), (position, shapes)
    # and still every allowed composition is drawn
    seen = {(o.color, o.shape, o.position) for o in objects}
    assert seen == set(all_compositions()) - set(held_out_compositions())


def test_backgrounds_are_drawn_with_their_weights():
    from collections import Counter

    assert set(BACKGROUND_WEIGHTS) == set(BACKGROUNDS) and abs(sum(BACKGROUND_WEIGHTS.values()) - 1) < 1e-9
    scenes = sample_scenes(6000, seed=1)
    counts = Counter(s.background for s in scenes)
    for name, weight in BACKGROUND_WEIGHTS.items():
        assert abs(counts[name] / 6000 - weight) < 0.03, counts
    assert counts.most_common(1)[0][0] == max(BACKGROUND_WEIGHTS, key=BACKGROUND_WEIGHTS.get)
    # a caption that names no background gets the same mix (the templates are drawn independently)
    unnamed = Counter(s.background for s in scenes if "background" not in s.caption())
    assert all(abs(unnamed[k] / sum(unnamed.values()) - w) < 0.03 for k, w in BACKGROUND_WEIGHTS.items())


def test_captions_name_every_object():
    for scene in sample_scenes(300, seed=1):
        caption = scene.caption()
        for o in scene.objects:
            assert o.color in caption and o.shape in caption, caption
        if len(scene.objects) == 2:
            assert " and " in caption


def test_export_is_an_imagefolder_that_datasets_reads(tmp_path):
    from datasets import load_dataset

    folder = export_folder(tmp_path / "shapes", n=12, resolution=32, seed=0)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all((folder / line["file_name"]).exists() for line in lines)
    ds = load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert len(ds) == 12 and ds[0]["image"].size == (32, 32)
    assert sorted(ds["text"]) == sorted(line["text"] for line in lines)
