"""The built-in data set: captioned synthetic shapes, generated deterministically from a seed.

Each image holds one coloured shape at a named position on a plain background; its caption
names colour, shape and position ("a red circle on the left"). A fixed set of held-out
(colour, shape, position) compositions never appears in training.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
# position -> centre as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
BACKGROUND = (245, 245, 245)
TEMPLATES = ("a {c} {s} {p}", "{c} {s} {p}", "a picture of a {c} {s} {p}")
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
           "bottom": "at the bottom", "center": "in the center"}


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    position: str
    size: float  # radius as a fraction of the image side

    def caption(self, template: str = TEMPLATES[0]) -> str:
        return template.format(c=self.color, s=self.shape, p=PHRASES[self.position])


def all_compositions() -> list[tuple[str, str, str]]:
    return list(itertools.product(COLORS, SHAPES, POSITIONS))


def held_out_compositions(seed: int = 1234, fraction: float = 0.1) -> list[tuple[str, str, str]]:
    """A fixed subset never used for training (each colour, shape, position still seen elsewhere)."""
    combos = all_compositions()
    rng = random.Random(seed)
    rng.shuffle(combos)
    return sorted(combos[: max(1, int(len(combos) * fraction))])


def render(scene: Scene, resolution: int, supersample: int = 4) -> Image.Image:
    """Draw at `supersample` x resolution, then downsample (anti-aliased edges)."""
    side = resolution * supersample
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cx, cy = (f * side for f in POSITIONS[scene.position])
    r = scene.size * side
    color = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def sample_scenes(n: int, seed: int, held_out: bool = False) -> list[Scene]:
    """n scenes drawn from the training compositions (or only the held-out ones)."""
    excluded = set(held_out_compositions())
    pool = sorted(excluded) if held_out else [c for c in all_compositions() if c not in excluded]
    rng = random.Random(seed)
    return [Scene(*rng.choice(pool), size=rng.uniform(0.16, 0.22)) for _ in range(n)]


def make_examples(n: int, resolution: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    rng = random.Random(seed + 1)
    scenes = sample_scenes(n, seed)
    images = [render(s, resolution) for s in scenes]
    captions = [s.caption(rng.choice(TEMPLATES)) for s in scenes]
    return images, captions


def make_dataset(n: int, resolution: int, seed: int):
    """A `datasets.Dataset` with columns image (PIL) and text."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    images, captions = make_examples(n, resolution, seed)
    features = Features({"image": ImageFeature(), "text": Value("string")})
    return Dataset.from_dict({"image": images, "text": captions}, features=features)


def export_folder(out_dir: str | Path, n: int, resolution: int, seed: int) -> Path:
    """Write an image folder with metadata.jsonl (the HF imagefolder layout)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, captions = make_examples(n, resolution, seed)
    with open(out / "metadata.jsonl", "w") as meta:
        for i, (img, cap) in enumerate(zip(images, captions)):
            name = f"{i:05d}.png"
            img.save(out / name)
            meta.write(json.dumps({"file_name": name, "text": cap}) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Export the built-in shapes data set as an image folder.")
    parser.add_argument("out_dir")
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = export_folder(args.out_dir, args.num_images, args.resolution, args.seed)
    print(f"wrote {args.num_images} images and metadata.jsonl to {path}")


if __name__ == "__main__":
    main()
