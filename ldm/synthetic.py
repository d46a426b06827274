"""The built-in data set: captioned synthetic shapes, generated deterministically from a seed.

Each image holds one or two coloured shapes (circle, square, triangle) of a named size at named
positions on a plain background; captions name them with some variety of phrasing
("a small red circle on the left", "a blue square at the top and a yellow triangle at the bottom
on a white background"). A fixed set of (colour, shape, position) compositions is held out: it
never appears in training, in one- or two-object images, and is what `ldm.evaluation` scores.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
}
SHAPES = ("circle", "square", "triangle")
# position -> centre as a fraction of the image side (x, y)
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
# size -> half-side (radius) range as a fraction of the image side
SIZES: dict[str, tuple[float, float]] = {"small": (0.13, 0.16), "large": (0.19, 0.22)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
# How often each background is drawn (a caption names it a quarter of the time, so this is also
# the mix a prompt without a background gets). In the shipped VAE's latents a yellow square and a
# yellow circle on white differ least of any colour and background (`benchmarks/latent_contrast.py`),
# so gray first was tried; the results were mixed, so white stays first
# (benchmarks/results/README.md, "The built-in data").
BACKGROUND_WEIGHTS: dict[str, float] = {"white": 0.6, "gray": 0.2, "black": 0.2}
PAIRS = (("left", "right"), ("top", "bottom"))  # positions two objects may take
PHRASES = {"left": ("on the left", "at the left"), "right": ("on the right", "at the right"),
           "top": ("at the top", "on top"), "bottom": ("at the bottom", "below"),
           "center": ("in the center", "in the middle")}
OBJECT_TEMPLATES = ("a {size}{color} {shape} {where}", "{size}{color} {shape} {where}")
SCENE_TEMPLATES = ("{objects}", "{objects}", "a picture of {objects}", "{objects} on a {bg} background")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    position: str
    size: str
    radius: float  # fraction of the image side


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "white"
    template: int = 0
    phrasing: tuple[int, ...] = field(default=(0, 0))

    def caption(self) -> str:
        parts = []
        for i, o in enumerate(self.objects):
            pick = self.phrasing[i % len(self.phrasing)]
            size = f"{o.size} " if pick % 2 else ""
            parts.append(OBJECT_TEMPLATES[pick // 2 % 2].format(
                size=size, color=o.color, shape=o.shape, where=PHRASES[o.position][pick // 4 % 2]))
        objects = " and ".join(parts)
        return SCENE_TEMPLATES[self.template].format(objects=objects, bg=self.background)


def all_compositions() -> list[tuple[str, str, str]]:
    return list(itertools.product(COLORS, SHAPES, POSITIONS))


def held_out_compositions(seed: int = 1234, count: int = 10) -> list[tuple[str, str, str]]:
    """A fixed set of (colour, shape, position) never seen in training. Chosen so that every
    colour, shape and position still appears in training in other combinations."""
    combos = all_compositions()
    rng = random.Random(seed)
    rng.shuffle(combos)
    return sorted(combos[:count])


def render(scene: Scene, resolution: int, supersample: int = 4,
           palette: dict[str, tuple[int, int, int]] | None = None,
           background: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw at `supersample` x resolution, then area-average down (anti-aliased, no ringing)."""
    side = resolution * supersample
    img = Image.new("RGB", (side, side), background or BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = (f * side for f in POSITIONS[o.position])
        r = o.radius * side
        color = (palette or COLORS)[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif o.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def _object(rng: random.Random, color: str, shape: str, position: str) -> Obj:
    size = rng.choice(list(SIZES))
    return Obj(color, shape, position, size, rng.uniform(*SIZES[size]))


def draw_composition(rng: random.Random, allowed: list[tuple[str, str, str]], position: str | None = None,
                     avoid: tuple[str, str] | None = None) -> tuple[str, str, str]:
    """One (colour, shape, position) from `allowed`: the position uniformly (unless given), then the
    shape uniformly among those with an allowed colour there, then the colour among those allowed
    (`avoid`: a (colour, shape) not to draw).

    Drawing uniformly over the allowed triples instead lets the held-out holes tilt the shape mix
    per position: three of the five coloured squares at the bottom are held out, so the bottom
    showed circles 50% and squares 20% of the time, and models trained on that drew held-out
    bottom squares as circles. Drawn this way every position shows every shape equally often."""
    where = position if position is not None else rng.choice(sorted({c[2] for c in allowed}))
    here = [c for c in allowed if c[2] == where and c[:2] != avoid]
    if not here:
        raise ValueError(f"no allowed composition at position {where!r}")
    shape = rng.choice(sorted({c[1] for c in here}))
    return rng.choice([c for c in here if c[1] == shape])


def sample_scenes(n: int, seed: int, two_object_fraction: float = 0.25) -> list[Scene]:
    """n training scenes; none contains a held-out composition (see `draw_composition`)."""
    excluded = set(held_out_compositions())
    allowed = [c for c in all_compositions() if c not in excluded]
    rng = random.Random(seed)
    scenes = []
    for _ in range(n):
        if rng.random() < two_object_fraction:
            p1, p2 = rng.choice(PAIRS)
            c1 = draw_composition(rng, allowed, p1)
            c2 = draw_composition(rng, allowed, p2, avoid=c1[:2])
            objects = (_object(rng, *c1), _object(rng, *c2))
            if rng.random() < 0.5:
                objects = objects[::-1]  # either may be named first
        else:
            objects = (_object(rng, *draw_composition(rng, allowed)),)
        bg = rng.choices(list(BACKGROUND_WEIGHTS), weights=list(BACKGROUND_WEIGHTS.values()))[0]
        template = rng.randrange(len(SCENE_TEMPLATES))
        scenes.append(Scene(objects, bg, template, tuple(rng.randrange(8) for _ in objects)))
    return scenes


def eval_prompt(color: str, shape: str, position: str) -> str:
    """The canonical prompt for one composition, as the evaluation asks for it."""
    return f"a {color} {shape} {PHRASES[position][0]}"


COLOR_MODES = ("named", "random", "mixed")


def make_examples(n: int, resolution: int, seed: int, colors: str = "named") -> tuple[list[Image.Image], list[str]]:
    """n rendered scenes and their captions.

    colors: "named" draws the palette the captions name (the LDM's training data); "random" gives
    every object and background an independent uniform RGB colour (captions then name the wrong
    colours: this is for training a first stage that reproduces any colour); "mixed" alternates.
    """
    if colors not in COLOR_MODES:
        raise ValueError(f"colors must be one of {COLOR_MODES}, got {colors!r}")
    scenes = sample_scenes(n, seed)
    rng = random.Random(seed + 1)
    images = []
    for i, scene in enumerate(scenes):
        if colors == "random" or (colors == "mixed" and i % 2):
            palette = {name: _random_rgb(rng) for name in COLORS}
            images.append(render(scene, resolution, palette=palette, background=_random_rgb(rng)))
        else:
            images.append(render(scene, resolution))
    return images, [s.caption() for s in scenes]


def _random_rgb(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def make_dataset(n: int, resolution: int, seed: int, colors: str = "named"):
    """A `datasets.Dataset` with columns image (PIL) and text."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    images, captions = make_examples(n, resolution, seed, colors)
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

    parser = argparse.ArgumentParser(description="Export the built-in shapes data set as an image folder "
                                                 "with metadata.jsonl.")
    parser.add_argument("out_dir")
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    path = export_folder(args.out_dir, args.num_images, args.resolution, args.seed)
    logger.info("wrote %d images and metadata.jsonl to %s", args.num_images, path)


if __name__ == "__main__":
    main()
