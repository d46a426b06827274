"""The analytic judge reads ground-truth renders correctly, and the scoring arithmetic."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from ldm.judge import NOTHING, Judge, Reading, default_judge
from ldm.synthetic import BACKGROUNDS, SIZES, Obj, Scene, all_compositions, render
from ldm.evaluation import Case, score


def test_judge_reads_every_ground_truth_render():
    judge = default_judge()
    rng = random.Random(0)
    wrong, total = [], 0
    for color, shape, position in all_compositions():
        for size in SIZES:
            for background in BACKGROUNDS:
                obj = Obj(color, shape, position, size, rng.uniform(*SIZES[size]))
                reading = judge.read(render(Scene((obj,), background), 32))
                total += 1
                if (reading.color, reading.shape, reading.position) != (color, shape, position):
                    wrong.append((obj, background, reading))
    assert total == 450
    assert not wrong, wrong[:5]


def test_judge_with_another_palette_and_resolution():
    palette = {"orange": (255, 140, 0), "teal": (0, 128, 128), "pink": (255, 105, 180)}
    judge = Judge(palette)
    for color in palette:
        for shape in ("circle", "square", "triangle"):
            for position in ("left", "top", "center"):
                img = render(Scene((Obj(color, shape, position, "large", 0.2),), "white"), 48, palette=palette)
                assert judge.read(img) == Reading(color, shape, position)


def test_blank_image_reads_as_nothing():
    assert default_judge().read(Image.new("RGB", (32, 32), (245, 245, 245))) == NOTHING
    assert not NOTHING.found
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert default_judge().read(noise).found in (True, False)  # any reading, no crash


def test_score_counts_each_attribute_and_all_three():
    cases = [Case("p", "red", "circle", "left")] * 4
    readings = [Reading("red", "circle", "left"), Reading("red", "square", "left"),
                Reading("blue", "circle", "left"), NOTHING]
    result = score(readings, cases)
    assert result == {"color": 0.5, "shape": 0.5, "position": 0.75, "all": 0.25}


def test_layout_centroid_finds_the_rendered_object():
    import torch

    from ldm.judge import layout_centroid

    for position, (fx, fy) in {"left": (0.27, 0.5), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}.items():
        img = render(Scene((Obj("red", "square", position, "large", 0.2),), "white"), 32)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        cx, cy = layout_centroid(x)
        # pixel centres: the rendered square's centre is at f * 32 - 0.5 of 31 pixel steps
        assert abs(cx - (fx * 32 - 0.5) / 31) < 0.02 and abs(cy - (fy * 32 - 0.5) / 31) < 0.02, position
