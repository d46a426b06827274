"""An analytic judge: reads colour, shape and position of the object in a generated image.

No learned model: the background is the median border colour, the object is the largest
connected region that differs from it, its colour the nearest palette entry to the region's
median colour, its position the region's centroid, and its shape the ideal shape (circle,
square, triangle) whose mask, fitted to the region's bounding box, overlaps it best (IoU).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Reading:
    color: str | None
    shape: str | None
    position: str | None

    @property
    def found(self) -> bool:
        return self.color is not None


NOTHING = Reading(None, None, None)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected True region of a (H, W) bool mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def ideal_coverage(shape: str, cx: float, cy: float, r: float, height: int, width: int,
                   supersample: int = 8) -> np.ndarray:
    """(H, W) fraction of each pixel covered by an ideal shape with box centre (cx, cy) and
    half-side r, in pixels: circle, square, or triangle with its apex up (as `synthetic` draws)."""
    ys = (np.arange(height * supersample) + 0.5) / supersample
    xs = (np.arange(width * supersample) + 0.5) / supersample
    y, x = np.meshgrid(ys, xs, indexing="ij")
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":
        inside = (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


# For an ideal shape of area A: half-side r, and how far its centroid lies below its box centre.
_FIT = {
    "circle": (lambda a: np.sqrt(a / np.pi), 0.0),
    "square": (lambda a: np.sqrt(a) / 2, 0.0),
    "triangle": (lambda a: np.sqrt(a / 2), 1 / 3),  # base 2r, height 2r; centroid at 2/3 height
}


class Judge:
    def __init__(self, colors: dict[str, tuple[int, int, int]], shapes: tuple[str, ...] = ("circle", "square", "triangle"),
                 center_radius: float = 0.1, threshold: float = 60.0, min_pixels: int = 6):
        self.names = list(colors)
        self.palette = np.array([colors[n] for n in self.names], dtype=np.float32)  # (K, 3)
        self.shapes = shapes
        self.center_radius = center_radius
        self.threshold = threshold
        self.min_pixels = min_pixels

    def read(self, image: Image.Image | np.ndarray) -> Reading:
        arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
        if arr.max() <= 1.0:
            arr = arr * 255.0
        h, w, _ = arr.shape
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # (2H + 2W, 3)
        background = np.median(border, axis=0)
        diff = np.linalg.norm(arr - background, axis=-1)
        region = largest_component(diff > self.threshold)
        if region.sum() < self.min_pixels:
            return NOTHING
        # colour: median of the region's core (pixels far from the background, not edges)
        core = region & (diff >= np.percentile(diff[region], 50))
        rgb = np.median(arr[core], axis=0)
        color = self.names[int(np.argmin(np.linalg.norm(self.palette - rgb, axis=1)))]
        # coverage of each pixel by the object, from its contrast to the background; the region
        # proper is where coverage > 1/2 (robust to blur and to ringing around edges)
        coverage = np.clip(diff / max(float(np.linalg.norm(rgb - background)), 1e-3), 0.0, 1.0)
        region = largest_component(region & (coverage > 0.5))
        if region.sum() < self.min_pixels:
            return NOTHING
        # position: centroid relative to the image centre, in units of the image side
        ys, xs = np.nonzero(region)
        dx, dy = (xs.mean() + 0.5) / w - 0.5, (ys.mean() + 0.5) / h - 0.5
        if max(abs(dx), abs(dy)) < self.center_radius:
            position = "center"
        elif abs(dx) >= abs(dy):
            position = "left" if dx < 0 else "right"
        else:
            position = "top" if dy < 0 else "bottom"
        # shape: the ideal shape with the region's area and centroid that overlaps it best
        # (soft IoU over coverage, so blurred or anti-aliased edges count by how much they cover)
        grown = region.copy()  # the region and its 8 neighbours, to include its soft edge
        grown[1:] |= region[:-1]; grown[:-1] |= region[1:]
        grown[:, 1:] |= grown[:, :-1].copy(); grown[:, :-1] |= grown[:, 1:].copy()
        soft = np.where(grown, coverage, 0.0)
        area = soft.sum()
        gy, gx = np.mgrid[0:h, 0:w] + 0.5
        mx, my = (soft * gx).sum() / area, (soft * gy).sum() / area
        ious = {}
        for name in self.shapes:
            half_side, drop = _FIT[name]
            r = half_side(area)
            ideal = ideal_coverage(name, mx, my - drop * r, r, h, w)
            ious[name] = np.minimum(soft, ideal).sum() / np.maximum(soft, ideal).sum()
        shape = max(ious, key=ious.get)
        return Reading(color, shape, position)


def layout_centroid(image: torch.Tensor) -> tuple[float, float]:
    """(3, H, W) image in [-1, 1] -> centroid (x, y) in [0, 1] of its difference from the corner colour.
    Soft (no threshold): for blurry images such as `benchmarks/word_probe.py`'s x0 predictions."""
    _, h, w = image.shape
    background = image[:, :2, :2].mean((1, 2))
    mass = (image - background[:, None, None]).abs().sum(0)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=mass.dtype), torch.arange(w, dtype=mass.dtype), indexing="ij")
    total = mass.sum().clamp_min(1e-8)
    return float((mass * xs).sum() / total / (w - 1)), float((mass * ys).sum() / total / (h - 1))


def default_judge() -> Judge:
    from ldm.synthetic import COLORS

    return Judge(COLORS)
