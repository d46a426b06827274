"""Diverse images for training and evaluating a first stage (the VAE), at any resolution.

A VAE trained only on the built-in shapes reproduces nothing else (a light-gray background comes
back white; photos lose more than a bicubic thumbnail does). `FirstStageImages` mixes, by weight
(`MIX`): the built-in shapes (named and random colours), overlapping shapes of many colours on
flat / gradient / noisy backgrounds, gradients, textures (smooth noise, gratings, checkers,
stripes), text in every font found (PIL's own at several sizes plus system TrueType fonts),
synthetic outdoor-like scenes, and crops at several scales of the real photos scikit-image ships
in its wheel (optional dependency: `pip install ".[vae]"`; without it the photo share is drawn
from the other kinds, with a warning).

Image `i` of seed `s` is a pure function of (s, i, resolution): the same whatever the batch size,
order or process. Some photos are never trained on (`HELD_OUT_PHOTOS`): `heldout_photo_crops`
evaluates on them; `other_palette_shapes` draws the built-in layouts in colours and backgrounds
the built-in palette does not have.
"""

from __future__ import annotations

import functools
import glob
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ldm import synthetic

logger = logging.getLogger(__name__)

# scikit-image's bundled photos whose docstrings (skimage/data/_fetchers.py) say public domain,
# CC0 or "no known copyright restrictions". Left out: moon, page, logo, color, phantom, chessboard
# (no statement) and the Middlebury motorcycle pair (the benchmark's own terms).
TRAIN_PHOTOS = ("astronaut.png", "chelsea.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "brick.png",
                "grass.png", "gravel.png", "text.png", "cell.png", "coins.png", "microaneurysms.png", "horse.png",
                "clock_motion.png")
HELD_OUT_PHOTOS = ("coffee.png", "rocket.jpg", "camera.png")  # CC0, public domain, CC0: never trained on

MIX = {"builtin": 0.12, "shapes": 0.2, "gradient": 0.05, "texture": 0.1, "text": 0.1, "scene": 0.08, "photo": 0.35}

# `other_palette_shapes`: none of these is a built-in colour or background.
OTHER_PALETTE = ((255, 130, 0), (0, 150, 150), (250, 100, 190), (120, 70, 20), (90, 200, 90), (60, 60, 160),
                 (200, 200, 60), (170, 30, 90))
OTHER_BACKGROUNDS = ((200, 200, 200), (250, 250, 235), (225, 210, 180), (40, 50, 80), (160, 180, 150))


def _rgb(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


@functools.lru_cache(maxsize=None)
def photo_dir() -> Path | None:
    """skimage/data inside the installed wheel, or None without scikit-image."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    return path if (path / HELD_OUT_PHOTOS[0]).exists() else None


@functools.lru_cache(maxsize=None)
def load_photos(names: tuple[str, ...]) -> tuple[Image.Image, ...]:
    """The named photos as RGB (transparency on white); raises without scikit-image."""
    root = photo_dir()
    if root is None:
        raise ModuleNotFoundError("scikit-image is not installed: pip install scikit-image (or \".[vae]\")")
    out = []
    for name in names:
        img = Image.open(root / name)
        if img.mode in ("RGBA", "LA", "P"):
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
        out.append(img.convert("RGB"))
    return tuple(out)


def photo_crop(photo: Image.Image, resolution: int, rng: random.Random) -> Image.Image:
    """A square crop of side resolution * 2**u (u uniform, up to the photo's short side), area-
    averaged down to `resolution`: a thumbnail of a large region, or the photo's own pixels."""
    top = math.log2(max(min(photo.size) / resolution, 1.0))
    side = min(int(resolution * 2 ** rng.uniform(0, min(top, 4))), *photo.size)
    x, y = rng.randrange(photo.width - side + 1), rng.randrange(photo.height - side + 1)
    return photo.resize((resolution, resolution), Image.Resampling.BOX, box=(x, y, x + side, y + side))


def _augment_photo(img: Image.Image, rng: random.Random) -> Image.Image:
    """Colour variety from few photos: channel order, a tint for gray ones, flips, rotations."""
    arr = np.asarray(img).astype(np.float32)
    if np.ptp(arr - arr.mean(axis=2, keepdims=True)) < 8 and rng.random() < 0.7:  # a gray photo: tint it
        a, b = np.array(_rgb(rng), np.float32), np.array(_rgb(rng), np.float32)
        t = arr[..., :1] / 255
        arr = a * (1 - t) + b * t if rng.random() < 0.5 else arr * (0.4 + 0.6 * b / 255)
    if rng.random() < 0.5:
        arr = arr[..., rng.sample(range(3), 3)]
    arr = (arr - 128) * rng.uniform(0.7, 1.3) + 128 + rng.uniform(-30, 30)
    img = Image.fromarray(arr.clip(0, 255).round().astype(np.uint8))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img.rotate(90 * rng.randrange(4))


def _smooth_noise(side: int, rng: random.Random, channels: int = 3) -> np.ndarray:
    """Value noise in [0, 1]: a random grid of 2..side/2 cells, bicubic up to `side`. (side, side, C)"""
    cells = rng.randint(2, max(2, side // 2))
    nrng = np.random.default_rng(rng.randrange(2**32))
    grid = (nrng.random((cells, cells, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid).resize((side, side), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.float32) / 255
    return arr[..., None] if channels == 1 else arr


def _gradient(side: int, rng: random.Random) -> np.ndarray:
    """A linear or radial blend of 2-3 random colours, (side, side, 3) in [0, 255]."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1)
    if rng.random() < 0.6:
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle) + 0.5
    else:
        cx, cy = rng.random(), rng.random()
        t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) * rng.uniform(0.8, 2)
    t = t.clip(0, 1)[..., None]
    colors = [np.array(_rgb(rng), np.float32) for _ in range(rng.choice((2, 2, 3)))]
    if len(colors) == 2:
        return colors[0] * (1 - t) + colors[1] * t
    return np.where(t < 0.5, colors[0] * (1 - 2 * t) + colors[1] * 2 * t, colors[1] * (2 - 2 * t) + colors[2] * (2 * t - 1))


def _texture(side: int, rng: random.Random) -> np.ndarray:
    """Smooth noise, gratings, checkers or stripes in random colours, (side, side, 3) in [0, 255]."""
    kind = rng.choice(("noise", "noise", "grating", "checker", "stripes"))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    if kind == "noise":
        if rng.random() < 0.5:
            return _smooth_noise(side, rng) * 255
        t = _smooth_noise(side, rng, 1)
    elif kind == "grating":
        angle, period = rng.uniform(0, math.pi), rng.uniform(2.5, side)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)[..., None]
    else:
        cell = rng.randint(2, max(2, side // 3))
        t = ((xx // cell + (yy // cell if kind == "checker" else 0)) % 2)[..., None]
    a, b = np.array(_rgb(rng), np.float32), np.array(_rgb(rng), np.float32)
    return a * (1 - t) + b * t


def _background(side: int, rng: random.Random) -> Image.Image:
    pick = rng.random()
    if pick < 0.45:
        return Image.new("RGB", (side, side), _rgb(rng))
    arr = _gradient(side, rng) if pick < 0.8 else _texture(side, rng)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _shapes(resolution: int, rng: random.Random) -> Image.Image:
    """2-14 overlapping ellipses, rectangles, polygons and lines, some translucent."""
    ss = rng.choice((1, 2, 4, 4))
    side = resolution * ss
    img = _background(side, rng).convert("RGBA")
    for _ in range(rng.randint(2, 14)):
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        fill = (*_rgb(rng), 255 if rng.random() < 0.75 else rng.randrange(60, 230))
        x0, y0 = rng.uniform(-0.2, 1.0) * side, rng.uniform(-0.2, 1.0) * side
        w, h = rng.uniform(0.05, 0.7) * side, rng.uniform(0.05, 0.7) * side
        kind = rng.choice(("ellipse", "rectangle", "polygon", "line"))
        if kind == "ellipse":
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        elif kind == "rectangle":
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        elif kind == "polygon":
            draw.polygon([(x0 + rng.random() * w, y0 + rng.random() * h) for _ in range(rng.randint(3, 6))], fill=fill)
        else:
            draw.line([(x0, y0), (x0 + w, y0 + h)], fill=fill, width=max(1, int(rng.uniform(0.01, 0.12) * side)))
        img = Image.alpha_composite(img, layer)
    return img.convert("RGB").resize((resolution, resolution), Image.Resampling.BOX)


@functools.lru_cache(maxsize=None)
def font_files() -> tuple[str, ...]:
    """The TrueType / OpenType fonts installed on this machine (may be none)."""
    found = {p for pattern in ("/usr/share/fonts/**/*.ttf", "/usr/share/fonts/**/*.otf", "/usr/local/share/fonts/**/*.ttf",
                               "/System/Library/Fonts/**/*.ttf", "C:/Windows/Fonts/*.ttf")
             for p in glob.glob(pattern, recursive=True)}
    return tuple(sorted(found))


def _font(size: int, rng: random.Random) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    files = font_files()
    if files and rng.random() < 0.7:
        try:
            return ImageFont.truetype(rng.choice(files), size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, AttributeError, ImportError):
        return ImageFont.load_default()


TEXT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.,:;!?-+&%#@()"


def _text(resolution: int, rng: random.Random) -> Image.Image:
    """1-4 lines of random characters, any font, size and colours."""
    ss = rng.choice((1, 2, 2, 4))
    side = resolution * ss
    img = _background(side, rng)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        size = max(4, int(rng.uniform(0.15, 0.6) * side))
        word = "".join(rng.choice(TEXT_CHARS) for _ in range(rng.randint(1, 8)))
        xy = (rng.uniform(-0.3, 0.8) * side, rng.uniform(-0.3, 0.8) * side)
        draw.text(xy, word, fill=_rgb(rng), font=_font(size, rng))
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def _scene(resolution: int, rng: random.Random) -> Image.Image:
    """Something like a photo: sky gradient, textured ground below a horizon, a sun, blobs (trees,
    rocks) with shading, slight blur and sensor noise."""
    side = resolution * 4
    sky = _gradient(side, rng)
    ground = _smooth_noise(side, rng) * 80 + np.array(_rgb(rng), np.float32) * 0.7
    horizon = int(rng.uniform(0.3, 0.8) * side)
    arr = np.concatenate([sky[:horizon], ground[horizon:]]).clip(0, 255)
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:
        r, x, y = rng.uniform(0.05, 0.15) * side, rng.random() * side, rng.uniform(0, horizon)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_rgb(rng))
    for _ in range(rng.randint(0, 6)):
        base, r = np.array(_rgb(rng)), rng.uniform(0.04, 0.25) * side
        x, y = rng.random() * side, horizon + rng.uniform(-0.2, 0.3) * side
        for k in range(4):  # shading: nested, lighter towards the top-left
            c = tuple(int(v) for v in (base * (0.7 + 0.15 * k)).clip(0, 255))
            rr = r * (1 - 0.2 * k)
            draw.ellipse([x - rr - 0.1 * r * k, y - rr * 1.3 - 0.1 * r * k, x + rr, y + rr], fill=c)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 3)))
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 6), (resolution, resolution, 3))
    return Image.fromarray((np.asarray(img) + noise).clip(0, 255).round().astype(np.uint8))


def _builtin(resolution: int, rng: random.Random) -> Image.Image:
    colors = "named" if rng.random() < 0.5 else "random"
    return synthetic.make_examples(1, resolution, seed=rng.randrange(2**31), colors=colors)[0][0]


def parse_mix(text: str) -> dict[str, float]:
    """`MIX` with the shares named in "kind=weight,kind=weight" changed (weights are relative)."""
    mix = dict(MIX)
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in MIX:
            raise ValueError(f"--diverse_mix {part!r}: expected kind=weight with kind one of {', '.join(MIX)}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--diverse_mix {part!r}: {value!r} is not a number") from None
        if not weight >= 0:
            raise ValueError(f"--diverse_mix {part!r}: a weight must be >= 0")
        mix[kind] = weight
    if not sum(mix.values()) > 0:
        raise ValueError(f"--diverse_mix {text!r}: every weight is 0")
    return mix


def diverse_image(seed: int, index: int, resolution: int, mix: dict[str, float] | None = None) -> Image.Image:
    """Image `index` of the mix `mix` (default `MIX`; photos need scikit-image), a pure function of
    its arguments."""
    mix = dict(mix or MIX)
    if "photo" in mix and photo_dir() is None:
        mix.pop("photo")
    rng = random.Random(f"first-stage:{seed}:{index}")
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "photo":
        photo = rng.choice(load_photos(TRAIN_PHOTOS))
        return _augment_photo(photo_crop(photo, resolution, rng), rng)
    if kind in ("gradient", "texture"):
        side = resolution * 2
        arr = _gradient(side, rng) if kind == "gradient" else _texture(side, rng)
        img = Image.fromarray(arr.clip(0, 255).round().astype(np.uint8))
        return img.resize((resolution, resolution), Image.Resampling.BOX)
    return {"builtin": _builtin, "shapes": _shapes, "text": _text, "scene": _scene}[kind](resolution, rng)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


class FirstStageImages(torch.utils.data.Dataset):
    """`num_images` images of the diverse mix as {"pixel_values": (3, R, R) in [-1, 1], "text": ""},
    generated on demand (nothing held in memory), deterministic per (seed, index)."""

    def __init__(self, num_images: int, resolution: int, seed: int = 0, mix: dict[str, float] | None = None):
        self.num_images, self.resolution, self.seed, self.mix = num_images, resolution, seed, mix
        if photo_dir() is None:
            logger.warning("scikit-image is not installed: the diverse mix has no real photos "
                           "(pip install scikit-image)")

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        img = diverse_image(self.seed, index, self.resolution, self.mix)
        return {"pixel_values": to_tensor(img), "text": ""}


def heldout_photo_crops(n: int, resolution: int, seed: int = 0) -> list[Image.Image]:
    """n crops at several scales of the photos never trained on (`HELD_OUT_PHOTOS`), unaugmented."""
    photos = load_photos(HELD_OUT_PHOTOS)
    rng = random.Random(f"held-out:{seed}")
    return [photo_crop(photos[i % len(photos)], resolution, rng) for i in range(n)]


def other_palette_shapes(n: int, resolution: int, seed: int = 0) -> list[Image.Image]:
    """The built-in layouts (shapes, sizes, positions) in `OTHER_PALETTE` on `OTHER_BACKGROUNDS`."""
    rng = random.Random(f"other-palette:{seed}")
    images = []
    for scene in synthetic.sample_scenes(n, seed):
        palette = {name: rng.choice(OTHER_PALETTE) for name in synthetic.COLORS}
        images.append(synthetic.render(scene, resolution, palette=palette, background=rng.choice(OTHER_BACKGROUNDS)))
    return images
