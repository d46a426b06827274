"""Small image helpers: grids (with their prompts and a title), tensor -> PIL."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 192  # px of the prompt column on the left of a labelled grid
PAD = 4
ELLIPSIS = "..."


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


def labelled_grid(images: list[Image.Image], rows: int, cols: int, row_labels: list[str] | None = None,
                  title: str | None = None, label_width: int = LABEL_WIDTH) -> Image.Image:
    """`image_grid` with each row's label (its prompt) in a column on the left and a title band on
    top, in PIL's default font: a label is wrapped at word boundaries to the column and cut with
    "..." where the row has no room for more lines. The image cells are `image_grid`'s, unchanged.

    Size: (label_width + cols * w, title band + rows * h); no column without row_labels, no band
    without a title."""
    if not images:
        raise ValueError("no images to tile")
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit {rows} rows x {cols} columns")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    w, h = images[0].size
    left = label_width if row_labels is not None else 0
    width = left + cols * w
    title_lines = (_wrap(title, font, width - 2 * PAD, max_lines=3) or [""]) if title is not None else []
    top = len(title_lines) * line_h + 2 * PAD if title is not None else 0
    canvas = Image.new("RGB", (width, top + rows * h), (255, 255, 255))
    cells = image_grid(images, cols)
    canvas.paste(cells, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((PAD, PAD + i * line_h), line, fill=(0, 0, 0), font=font)
    max_lines = max(1, (h - 2 * PAD) // line_h)
    for r, label in enumerate(row_labels or []):
        for i, line in enumerate(_wrap(label, font, left - 2 * PAD, max_lines)):
            draw.text((PAD, top + r * h + PAD + i * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """`text` in lines no wider than `width` px (a word longer than a line is cut), at most
    `max_lines`, the last ending in "..." when text was left out."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while len(word) > 1 and font.getlength(word) > width:  # a word wider than a line
            cut = 1
            while cut < len(word) - 1 and font.getlength(word[:cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) <= max_lines:
        return lines
    last = lines[max_lines - 1]
    while last and font.getlength(last + ELLIPSIS) > width:
        last = last[:-1]
    return lines[:max_lines - 1] + [last.rstrip() + ELLIPSIS]


def tensor_to_pil(image) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> PIL RGB."""
    arr = ((image.detach().float().clamp(-1, 1).permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round()
    return Image.fromarray(arr.astype("uint8"))
