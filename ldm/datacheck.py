"""Find a data set's bad files before training, not hours into it.

A user folder is read in one of two layouts (`folder_rows`):
  * HF imagefolder: images plus `metadata.jsonl` or `metadata.csv` files (any folder level, one
    extension for all) whose `file_name` column is a path relative to the metadata file's folder.
    Captions come from `caption_column` ("text"; when no row has one but exactly one of
    caption / captions / prompt exists, that column, logged). A jsonl caption cell may be a list
    of strings: several captions, one picked at random per use (`ldm.data.pick_caption`). Images
    that no metadata file lists are ignored, as `datasets` does, and counted in the report.
  * sidecar captions (no metadata file anywhere): every image, recursively, with `name.txt` or
    `name.caption` beside it (`.txt` wins when both exist). Each non-empty line of it is one
    caption: a file of several lines gives several captions, not one long caption.
Names starting with "." are ignored (.git, .cache, macOS `._photo.jpg` resource forks).
An image may have a loss mask (`ldm.masks`): the metadata's `mask_file_name` (relative to the
metadata file's folder), else `name.mask.png` (any image extension) beside `name.png`. Files named
`*.mask.<ext>` are masks, never training images.
A hub data set, or any `datasets.Dataset`, goes through the same checks (`dataset_rows`).
`ldm.data.checked_folder` / `checked_dataset` turn the kept rows into a `datasets.Dataset`.

Every image is read and fully decoded once (`check_image`) with Pillow's limits set explicitly
for the pass (`pil_limits`). A bad item is reported by path with one of `REASONS`;
`on_bad_data="skip"` drops it and goes on, `"fail"` raises one ValueError listing them
(`apply_policy`). Kept rows get `image_hash` (sha256 of the file's bytes) and `width` / `height`
after EXIF orientation, for the latent cache and aspect-ratio buckets.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from PIL import Image, ImageFile

from ldm.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default limit (a 9459 x 9459 image)
# Every mode Pillow 13 has (`PIL.Image.MODES`); `ldm.data.to_rgb` turns each into 8-bit RGB
# (tests/test_datacheck.py checks one image per mode, and that Pillow has no other).
SUPPORTED_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                             "LAB", "HSV", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_EXTENSIONS = (".txt", ".caption")  # in order of preference
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
# Only these decoders are tried: a file named .png that is really EPS would otherwise start
# Ghostscript. (JPEG covers camera MPO files: Pillow opens those through its JPEG plugin.)
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_CAPTION_COLUMN = "text"
CAPTION_FALLBACKS = ("caption", "captions", "prompt")
BAD_DATA_POLICIES = ("skip", "fail")
REASONS = ("unreadable", "truncated", "unsupported mode", "too many pixels", "missing file",
           "path outside the folder", "duplicate", "bad metadata", "missing caption", "empty caption",
           "bad caption", "bad mask")
MASK_COLUMN = "mask_file_name"
MASK_SUFFIX = ".mask"  # name.mask.png beside name.png
LIST_FIRST = 20  # problems named in a log line or an error; the JSON report has all of them
PROGRESS_SECONDS = 10.0


@dataclass(frozen=True)
class Row:
    """One candidate example: where its image is and its caption cell."""

    label: str  # how the report names it: a path, `metadata.jsonl:7`, or `name[i] (path)`
    path: Path | None = None  # the image file to read, or
    data: bytes | None = None  # the encoded image held in memory (a `datasets` cell)
    caption: Any = None
    problem: str | None = None  # "reason: detail" when bad before the image is read
    mask: Path | None = None  # its loss mask (`ldm.masks`), if it has one


@dataclass(frozen=True)
class ImageInfo:
    sha256: str  # of the encoded bytes, as stored
    width: int  # after EXIF orientation (what `ldm.data.to_rgb` returns)
    height: int


class Kept(NamedTuple):
    index: int  # position in the checked rows
    row: Row
    info: ImageInfo
    mask: ImageInfo | None = None  # of its loss mask, if it has one


@dataclass(frozen=True)
class FolderScan:
    rows: list[Row]
    unlisted: list[str]  # images no metadata file lists (ignored)


@dataclass(frozen=True)
class Report:
    source: str
    total: int
    kept: int
    problems: list[tuple[str, str]]  # (label, "reason: detail"), in row order
    max_length: int | None = None
    long_captions: list[tuple[str, int]] = field(default_factory=list)  # (label, tokens), kept rows only
    same_content: list[tuple[str, str]] = field(default_factory=list)  # (label, label of the first copy)
    unlisted: list[str] = field(default_factory=list)
    masks: int = 0  # kept rows with a loss mask

    def counts(self) -> Counter:
        return Counter(reason_of(problem) for _, problem in self.problems)

    def table(self) -> str:
        lines = [("kept", self.kept)]
        lines += [(f"skipped: {reason}", n) for reason, n in sorted(self.counts().items())]
        lines.append(("total", self.total))
        if self.max_length:
            lines.append((f"captions over {self.max_length} tokens (kept, truncated)", len(self.long_captions)))
        if self.same_content:
            lines.append(("same image as an earlier row (kept)", len(self.same_content)))
        if self.unlisted:
            lines.append(("images in no metadata file (ignored)", len(self.unlisted)))
        if self.masks:
            lines.append(("kept images with a loss mask", self.masks))
        return "\n".join(f"  {name:<44}{n:>8}" for name, n in lines)

    def problem_list(self, limit: int | None = LIST_FIRST) -> str:
        shown = self.problems if limit is None else self.problems[:limit]
        text = "\n".join(f"  {label}: {problem}" for label, problem in shown)
        if len(shown) < len(self.problems):
            text += f"\n  ... and {len(self.problems) - len(shown)} more"
        return text

    def to_json(self) -> dict:
        return {"source": self.source, "total": self.total, "kept": self.kept, "skipped": dict(self.counts()),
                "problems": [{"item": label, "reason": reason_of(p), "detail": p} for label, p in self.problems],
                "max_length": self.max_length,
                "long_captions": [{"item": label, "tokens": n} for label, n in self.long_captions],
                "same_content": [{"item": label, "same_as": first} for label, first in self.same_content],
                "unlisted": self.unlisted, "masks": self.masks}


def reason_of(problem: str) -> str:
    return problem.split(":", 1)[0]


# ------------------------------------------------------------------------------- reading a folder
def folder_rows(root: str | Path, caption_column: str = DEFAULT_CAPTION_COLUMN, captions: bool = True) -> FolderScan:
    """Candidate rows of a folder: from its metadata files if it has any, else sidecar captions.
    Raises UsageError for a broken layout (not a folder, mixed metadata formats, no file_name
    column). captions=False (a VAE's data): images need no caption, and none is read."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}")
    files = _walk(root)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(p)]
    metas = [p for p in files if p.name in METADATA_NAMES]
    if not metas:
        return FolderScan(_sidecar_rows(root.resolve(), images, set(files), captions), unlisted=[])
    if len({p.suffix for p in metas}) > 1:
        raise UsageError(f"{root}: both metadata.jsonl and metadata.csv files; use one format "
                         f"({', '.join(map(str, metas))})")
    rows: list[Row] = []
    listed: set[Path] = set()  # resolved files, over every metadata file: a second listing is a duplicate
    for meta in metas:
        rows += _metadata_rows(meta, caption_column if captions else None, listed)
    named = {os.path.normpath(row.label) for row in rows}  # as written, so a rejected symlink counts as listed
    masks = {row.mask for row in rows if row.mask is not None}  # resolved; a mask_file_name is no unlisted image
    return FolderScan(rows, unlisted=[str(p) for p in images
                                      if os.path.normpath(p) not in named and (not masks or p.resolve() not in masks)])


def check_layout(root: str | Path, caption_column: str = DEFAULT_CAPTION_COLUMN,
                 captions: bool = True) -> FolderScan:
    """`folder_rows`, refusing (UsageError) a folder no training could use: missing, no images, or
    no row with both an image file and a caption. Reads the metadata and caption files but no
    image, so training can call it at startup."""
    scan = folder_rows(root, caption_column, captions)
    if not scan.rows:
        raise UsageError(no_images_message(root))
    bad = [(r.label, r.problem or (caption_problem(r.caption) if captions else None)) for r in scan.rows]
    bad = [(label, problem) for label, problem in bad if problem]
    if len(bad) == len(scan.rows):
        raise UsageError(f"{root}: none of its {len(bad)} images is usable (e.g. {bad[0][0]}: {bad[0][1]})")
    return scan


def no_images_message(root: str | Path) -> str:
    return (f"{root}: no images found (expected {' / '.join(sorted(IMAGE_EXTENSIONS))} files with "
            f"metadata.jsonl / metadata.csv, or with .txt / .caption files beside them)")


def _walk(root: Path) -> list[Path]:
    """Files under root in a fixed order, without hidden names; symlinked folders are not entered."""
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(folder) / n for n in sorted(names) if not n.startswith(".")]
    return files


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _metadata_rows(meta: Path, caption_column: str | None, listed: set[Path]) -> list[Row]:
    """caption_column None: no captions read."""
    records = _read_metadata(meta)
    column = None if caption_column is None else caption_column_of(
        _keys(rec for _, rec in records if isinstance(rec, dict)), caption_column, meta)
    base = meta.parent.resolve()
    rows = []
    for where, rec in records:
        if isinstance(rec, str):  # a line that could not be read
            rows.append(Row(label=where, problem=rec))
            continue
        name = rec.get("file_name")
        if not isinstance(name, str) or not name:
            rows.append(Row(label=where, caption=rec.get(column), problem="bad metadata: no file_name"))
            continue
        target, problem = listed_file(name, base, listed)
        if problem is not None:
            problem += f" ({where})"
        mask, mask_problem = (None, None) if caption_column is None else metadata_mask(rec, base, target)
        rows.append(Row(label=str(meta.parent / name), path=target, caption=rec.get(column),
                        problem=problem or mask_problem, mask=mask))
    return rows


def is_mask_file(path: Path) -> bool:
    """`name.mask.png` and the like: a loss mask, not an image to train on."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and Path(path.stem).suffix.lower() == MASK_SUFFIX


def sidecar_mask(image: Path, exists) -> Path | None:
    """`name.mask.<ext>` beside `name.<ext>` (the image's own extension first, then the others in
    sorted order), or None; `exists(path)` says whether a file is there."""
    exts = [image.suffix.lower(), *sorted(IMAGE_EXTENSIONS - {image.suffix.lower()})]
    return next((p for ext in exts if exists(p := image.with_name(image.stem + MASK_SUFFIX + ext))), None)


def metadata_mask(rec: dict, base: Path, image: Path | None) -> tuple[Path | None, str | None]:
    """(mask file, problem) of a metadata row: its `mask_file_name`, inside `base` like the image,
    else a sidecar mask beside the image."""
    name = rec.get(MASK_COLUMN)
    if name in (None, ""):
        return (sidecar_mask(image, Path.is_file) if image is not None else None), None
    if not isinstance(name, str) or os.path.isabs(name):
        return None, f"bad mask: {MASK_COLUMN} {name!r} is not a relative path"
    target = (base / name).resolve()
    if not _inside(target, base):
        return None, f"bad mask: {name} is outside the folder"
    if not target.is_file():
        return None, f"bad mask: {base / name} not found"
    return target, None


def listed_file(name: str, base: Path, listed: set[Path]) -> tuple[Path | None, str | None]:
    """(resolved file, None), or (None, problem) for a metadata `file_name` relative to the resolved
    folder `base`; adds the file to `listed`. Like `datasets`, a path must stay inside `base`:
    no absolute paths, no `..` above it, no symlink pointing out of it."""
    if os.path.isabs(name):
        return None, "path outside the folder: absolute path"
    target = (base / name).resolve()
    if not _inside(target, base):
        symlink = not os.path.normpath(name).startswith("..")
        return None, f"path outside the folder: {'a symlink to ' + str(target) if symlink else name}"
    if target in listed:
        return None, "duplicate: listed before"
    listed.add(target)
    if not target.is_file():
        return None, f"missing file: {'a folder' if target.is_dir() else 'not found'}"
    return target, None


def _read_metadata(meta: Path) -> list[tuple[str, dict | str]]:
    """(where, record) per row; the record is a problem string for a row that cannot be read.
    utf-8-sig: spreadsheet programs write a byte-order mark that would rename the first column."""
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{meta}: not UTF-8 text ({e})") from e
    if meta.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is not None and "file_name" not in reader.fieldnames:
            raise UsageError(f"{meta}: no file_name column (columns: {reader.fieldnames})")
        return [(f"{meta}:{reader.line_num}", rec) for rec in reader]
    records: list[tuple[str, dict | str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            records.append((f"{meta}:{n}", f"bad metadata: not JSON ({e})"))
            continue
        records.append((f"{meta}:{n}", rec if isinstance(rec, dict) else "bad metadata: not a JSON object"))
    if records and not any(isinstance(rec, dict) and "file_name" in rec for _, rec in records):
        raise UsageError(f"{meta}: no row has a file_name")
    return records


def _keys(records: Iterable[dict]) -> set[str]:
    return {key for rec in records for key in rec}


def caption_column_of(columns: Iterable[str], wanted: str, source: Any) -> str:
    """The caption column: `wanted`, or when that is the default and absent, the one common
    caption name present (never a guess between two)."""
    columns = set(columns)
    if wanted in columns or not columns:
        return wanted
    found = [name for name in CAPTION_FALLBACKS if name in columns] if wanted == DEFAULT_CAPTION_COLUMN else []
    if len(found) == 1:
        logger.info("%s: no %r column; using %r for captions", source, wanted, found[0])
        return found[0]
    raise UsageError(f"{source}: no caption column {wanted!r}; columns are {sorted(columns)} (set --caption_column)")


def _sidecar_rows(root: Path, images: list[Path], files: set[Path], captions: bool = True) -> list[Row]:
    """Rows for images with caption files beside them (captions=False: every image); `root` is resolved."""
    rows = []
    for path in images:
        sidecar = next((path.with_suffix(ext) for ext in CAPTION_EXTENSIONS if path.with_suffix(ext) in files), None)
        real = path.resolve()
        if not _inside(real, root):
            rows.append(Row(label=str(path), problem=f"path outside the folder: a symlink to {real}"))
        elif not captions:  # a VAE's data: no captions, no masks
            rows.append(Row(label=str(path), path=real))
        elif sidecar is None:
            rows.append(Row(label=str(path), path=real, problem="missing caption: no .txt or .caption file"))
        elif not _inside(sidecar.resolve(), root):
            rows.append(Row(label=str(path), problem=f"path outside the folder: {sidecar.name} is a symlink out"))
        else:
            caption, problem = read_sidecar(sidecar)
            mask = sidecar_mask(path, files.__contains__)
            if mask is not None and not _inside(mask.resolve(), root):
                problem = problem or f"bad mask: {mask.name} is a symlink out of the folder"
            rows.append(Row(label=str(path), path=real, caption=caption, problem=problem,
                            mask=None if mask is None else mask.resolve()))
    return rows


def read_sidecar(path: Path) -> tuple[str | list[str] | None, str | None]:
    """(caption cell, problem): one caption per non-empty line, stripped; "" when there is none."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError:
        return None, f"bad caption: {path.name} is not UTF-8 text"
    lines = [line for line in lines if line]
    return (lines[0] if len(lines) == 1 else lines or ""), None


# ------------------------------------------------------------------------------- a datasets.Dataset
def dataset_rows(ds, image_column: str, caption_column: str, name: str) -> list[Row]:
    """Rows of a `datasets.Dataset` (hub or local) with the images still encoded: bytes, or a
    path where the cell holds only one. Raises when the columns are not there."""
    from datasets import Image as ImageFeature

    if image_column not in ds.column_names:
        raise UsageError(f"{name}: no image column {image_column!r}; columns are {ds.column_names} "
                         f"(set --image_column)")
    caption_column = caption_column_of(ds.column_names, caption_column, name)
    raw = ds.select_columns([image_column, caption_column]).cast_column(image_column, ImageFeature(decode=False))
    rows = []
    for i, rec in enumerate(raw):
        cell = rec[image_column] or {}
        data, path = cell.get("bytes"), cell.get("path")
        rows.append(Row(label=f"{name}[{i}]" + (f" ({path})" if path else ""),
                        path=Path(path) if path and not data else None, data=data or None,
                        caption=rec[caption_column], problem=None if data or path else "missing file: no image data"))
    return rows


# ------------------------------------------------------------------------------- checking
def caption_problem(cell: Any) -> str | None:
    """Why a caption cell is unusable, or None. A list is fine when one entry has text."""
    if cell is None:
        return "missing caption"
    texts = [cell] if isinstance(cell, str) else cell if isinstance(cell, (list, tuple)) else None
    if texts is None or not all(isinstance(t, str) for t in texts):
        return f"bad caption: not a string or a list of strings ({cell!r:.60})"
    if not any(t.strip() for t in texts):
        return "empty caption"
    return None


def clean_caption(cell: str | Sequence[str]) -> str | list[str]:
    """A good cell with blank entries dropped from lists (picked, one would act as an unasked-for
    caption dropout). A single string is kept exactly as written."""
    return cell if isinstance(cell, str) else [t for t in cell if t.strip()]


@contextmanager
def pil_limits(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to `max_pixels` (over it, `Image.open` raises instead
    of warning) and truncated files refused, for the check only: Pillow's globals are restored
    after, so decoding elsewhere (training) keeps whatever its process configured."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def check_image(data: bytes, max_pixels: int) -> tuple[str | None, ImageInfo | None]:
    """(None, info) for a good encoded image, else (problem, None). The size is checked before
    decoding (a bomb is never decompressed), then every pixel is decoded once (`load`)."""
    if not data:
        return "unreadable: empty file", None
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # see `pil_limits`
        pixels = re.search(r"\((\d+) pixels\)", str(e))  # Pillow names the size, not the sides
        return f"too many pixels: {pixels.group(1) if pixels else 'more'} > {max_pixels}", None
    except Image.UnidentifiedImageError:
        return f"unreadable: not an image ({', '.join(FORMATS)})", None
    except (OSError, ValueError, EOFError) as e:
        return f"unreadable: {type(e).__name__}: {e}", None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            return f"too many pixels: {width}x{height} > {max_pixels}", None
        if img.mode not in SUPPORTED_MODES:
            return f"unsupported mode: {img.mode}", None
        try:
            img.load()
            orientation = img.getexif().get(0x0112, 1)  # read after load: PNG may keep EXIF after the pixels
        except Exception as e:  # noqa: BLE001 - damaged pixel data makes Pillow's decoders raise OSError,
            # SyntaxError, ValueError, EOFError, struct.error, ...: each is this file's problem, not the run's
            kind = "truncated" if "truncated" in str(e).lower() else "unreadable"
            return f"{kind}: {type(e).__name__}: {e}", None
    if orientation in (5, 6, 7, 8):  # EXIF orientations that turn the image by 90 degrees
        width, height = height, width
    return None, ImageInfo(hashlib.sha256(data).hexdigest(), width, height)


def _read(row: Row) -> tuple[bytes | None, str | None]:
    if row.path is None:
        return row.data, None
    try:
        return row.path.read_bytes(), None
    except FileNotFoundError:
        return None, "missing file: not found"
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"


def check_rows(rows: Sequence[Row], *, source: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               tokenizer=None, max_length: int | None = None, captions: bool = True) -> tuple[list[Kept], Report]:
    """Check captions (unless captions=False), then read and decode every image once; the good
    rows and the report. With a tokenizer, captions over `max_length` tokens (default: its
    model_max_length) are counted."""
    kept: list[Kept] = []
    problems: list[tuple[str, str]] = []
    start = last_log = time.monotonic()
    with pil_limits(max_image_pixels):
        for i, row in enumerate(rows):
            problem, info, mask = row.problem or (caption_problem(row.caption) if captions else None), None, None
            if problem is None:
                data, problem = _read(row)
                if problem is None:
                    problem, info = check_image(data, max_image_pixels)
            if problem is None and row.mask is not None:
                problem, mask = check_mask(row.mask, info, max_image_pixels)
            if problem is None:
                kept.append(Kept(i, replace(row, caption=clean_caption(row.caption)) if captions else row, info, mask))
            else:
                problems.append((row.label, problem))
            if time.monotonic() - last_log > PROGRESS_SECONDS:
                last_log = time.monotonic()
                logger.info("data check: %d / %d items (%.0f / s)", i + 1, len(rows), (i + 1) / (last_log - start))
    limit = token_limit(tokenizer, max_length)
    long = long_captions([(k.row.label, k.row.caption) for k in kept], tokenizer, limit) if limit else []
    return kept, Report(source=source, total=len(rows), kept=len(kept), problems=problems, max_length=limit,
                        long_captions=long, same_content=same_content(kept),
                        masks=sum(k.mask is not None for k in kept))


def check_mask(path: Path, image: ImageInfo, max_pixels: int) -> tuple[str | None, ImageInfo | None]:
    """(None, info) for a mask that decodes and has its image's size (both after EXIF
    orientation), else ("bad mask: <file> ...", None)."""
    data, problem = _read(Row(label=str(path), path=path))
    if problem is None:
        problem, info = check_image(data, max_pixels)
    if problem is not None:
        return f"bad mask: {path}: {problem}", None
    if (info.width, info.height) != (image.width, image.height):
        return (f"bad mask: {path} is {info.width}x{info.height}, its image {image.width}x{image.height}"), None
    return None, info


def token_limit(tokenizer, max_length: int | None) -> int | None:
    """The caption length to warn above: `max_length`, else the tokenizer's own; None without a
    tokenizer (nothing to count with) or when it has no limit (transformers' huge placeholder)."""
    if tokenizer is None:
        return None
    limit = max_length if max_length is not None else tokenizer.model_max_length
    return limit if limit and limit < 1_000_000 else None


def model_token_limit(preset: str = "tiny", pretrained: str | None = None) -> int:
    """How many tokens of a caption the model reads (the rest is cut): a local pretrained folder's
    tokenizer `model_max_length` (a single file: sd15's), else the preset's text `max_length`."""
    from ldm.presets import model_preset

    if pretrained:
        config = Path(pretrained) / "tokenizer" / "tokenizer_config.json"
        if config.is_file():
            limit = json.loads(config.read_text()).get("model_max_length")
            if isinstance(limit, int) and 0 < limit < 1_000_000:
                return limit
        if Path(pretrained).is_file():
            return model_preset("sd15").text.max_length
        logger.info("%s: no local tokenizer config; counting tokens against CLIP's 77", pretrained)
        return model_preset("sd15").text.max_length
    return model_preset(preset).text.max_length


def same_content(kept: Sequence[Kept]) -> list[tuple[str, str]]:
    """(label, label of the first row with the same image bytes) for every later copy."""
    first: dict[str, str] = {}
    copies = []
    for k in kept:
        if k.info.sha256 in first:
            copies.append((k.row.label, first[k.info.sha256]))
        else:
            first[k.info.sha256] = k.row.label
    return copies


def long_captions(cells: Sequence[tuple[str, str | list[str]]], tokenizer, max_length: int,
                  chunk: int = 1024) -> list[tuple[str, int]]:
    """(label, token count) of every caption over `max_length` tokens, counted with `tokenizer`
    as the text encoder will see it (with its start and end tokens)."""
    flat = [(label, text) for label, cell in cells for text in ([cell] if isinstance(cell, str) else cell)]
    long = []
    for at in range(0, len(flat), chunk):
        part = flat[at : at + chunk]
        ids = tokenizer([text for _, text in part], truncation=False, verbose=False)["input_ids"]
        long += [(label, len(x)) for (label, _), x in zip(part, ids) if len(x) > max_length]
    return long


# ------------------------------------------------------------------------------- policy and output
def validate_settings(on_bad_data: str, max_image_pixels: int) -> None:
    """Refuse bad settings before the long pass, not after it."""
    if on_bad_data not in BAD_DATA_POLICIES:
        raise UsageError(f"on_bad_data must be one of {BAD_DATA_POLICIES}, got {on_bad_data!r}")
    if max_image_pixels < 1:
        raise UsageError(f"max_image_pixels must be >= 1, got {max_image_pixels}")


def notes(report: Report) -> list[str]:
    """One line per kind of remark that does not drop anything (never one per image)."""
    lines = []
    if report.long_captions:
        label, n = report.long_captions[0]
        lines.append(f"{len(report.long_captions)} captions are longer than {report.max_length} tokens and will "
                     f"be truncated (e.g. {label}: {n} tokens)")
    if report.same_content:
        lines.append("{} images are byte-identical to an earlier one (kept; e.g. {} = {})".format(
            len(report.same_content), *report.same_content[0]))
    if report.unlisted:
        lines.append(f"{len(report.unlisted)} images are in no metadata file and are not used "
                     f"(e.g. {report.unlisted[0]})")
    return lines


def log_report(report: Report) -> None:
    logger.info("data check of %s:\n%s", report.source, report.table())
    for line in notes(report):
        logger.warning(line)


def apply_policy(report: Report, on_bad_data: str) -> None:
    """skip: warn, naming the first bad items; fail: raise one ValueError naming them."""
    if on_bad_data not in BAD_DATA_POLICIES:
        raise ValueError(f"on_bad_data must be one of {BAD_DATA_POLICIES}, got {on_bad_data!r}")
    if not report.problems:
        return
    counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.counts().items()))
    if on_bad_data == "fail":
        raise UsageError(f"{report.source}: {len(report.problems)} bad items of {report.total} ({counts}); "
                         f"on_bad_data='fail':\n{report.problem_list()}")
    logger.warning("skipping %d bad items of %d (%s):\n%s", len(report.problems), report.total, counts,
                   report.problem_list())
