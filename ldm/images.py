"""Small image helpers."""

from __future__ import annotations

from PIL import Image


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Tile equally sized images row by row."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def tensor_to_pil(image) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> PIL RGB."""
    arr = ((image.detach().float().clamp(-1, 1).permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round()
    return Image.fromarray(arr.astype("uint8"))
