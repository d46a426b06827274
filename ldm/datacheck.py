"""Find a data set's bad files before training, not hours into it.

A user folder is read in one of two layouts:
  * HF imagefolder: images plus `metadata.jsonl` or `metadata.csv` (any folder level) whose
    `file_name` column is relative to the metadata file; the caption column is `--caption_column`
    (a string, or in jsonl a list of strings: several captions, one picked per step);
  * sidecar captions: `photo.png` with `photo.txt` or `photo.caption` beside it; each non-empty
    line is one caption (several lines: several captions).
A hub data set (or any `datasets.Dataset`) goes through the same checks.

Every image is opened and fully decoded once. Problems are reported by path with a reason
(`REASONS`); `on_bad_data="skip"` drops those rows and goes on, `"fail"` raises one error that
lists them. Kept rows get their content hash (SHA-256 of the file bytes) and size after EXIF
orientation, for caches and bucketing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTENSIONS = (".txt", ".caption")
MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "I;16B", "I;16L", "F", "La", "RGBa"}
REASONS = ("unreadable", "truncated", "unsupported mode", "too many pixels", "missing file",
           "path outside the folder", "missing caption", "empty caption", "duplicate")


@dataclass
class Row:
    """One candidate example: where its image comes from and its caption cell."""

    label: str  # how the report names it (a path, or `name[i]`)
    path: Path | None = None
    data: bytes | None = None
    caption: Any = None
    problem: str | None = None  # set when found bad before opening the image


@dataclass
class Report:
    total: int = 0
    kept: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (label, reason: detail)
    long_captions: int = 0
    max_tokens: int | None = None

    def counts(self) -> Counter:
        return Counter(reason.split(":")[0] for _, reason in self.problems)

    def table(self) -> str:
        lines = [f"{'kept':<32}{self.kept:>8}"]
        lines += [f"{'skipped: ' + reason:<32}{n:>8}" for reason, n in sorted(self.counts().items())]
        if self.max_tokens:
            lines.append(f"{f'captions > {self.max_tokens} tokens':<32}{self.long_captions:>8}")
        lines.append(f"{'total':<32}{self.total:>8}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"total": self.total, "kept": self.kept, "skipped": dict(self.counts()),
                "long_captions": self.long_captions, "problems": [{"item": i, "reason": r} for i, r in self.problems]}


# ------------------------------------------------------------------------------- reading a folder
def folder_rows(root: str | Path, caption_column: str = "text") -> list[Row]:
    """Candidate rows of a folder: from its metadata files if it has any, else sidecar captions."""
    root = Path(root)
    metas = sorted(p for p in root.rglob("metadata.*") if p.suffix in (".jsonl", ".csv") and p.is_file())
    if metas:
        return [row for meta in metas for row in _metadata_rows(root, meta, caption_column)]
    return _sidecar_rows(root)


def _metadata_rows(root: Path, meta: Path, caption_column: str) -> list[Row]:
    if meta.suffix == ".jsonl":
        records = []
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{meta}:{n}: not valid JSON ({e})") from e
    else:
        with open(meta, newline="", encoding="utf-8") as fh:
            records = list(csv.DictReader(fh))
    if records and "file_name" not in records[0]:
        raise ValueError(f"{meta}: no file_name column (columns: {sorted(records[0])})")
    column = _caption_key(records, caption_column, meta)
    rows, seen, base = [], set(), meta.parent.resolve()
    for rec in records:
        name = str(rec.get("file_name") or "")
        row = Row(label=f"{meta.parent / name}", caption=rec.get(column))
        target = (meta.parent / name).resolve()
        if not name or os.path.isabs(name) or not _inside(target, root.resolve()) or not _inside(target, base):
            row.problem = f"path outside the folder: {name!r} in {meta.name}"
        elif target in seen:
            row.problem = f"duplicate: listed again in {meta.name}"
        elif not target.is_file():
            row.problem = "missing file: listed in metadata"
        else:
            row.path = target
        seen.add(target)
        rows.append(row)
    return rows


def _caption_key(records: list[dict], wanted: str, source: Path) -> str:
    keys = set(records[0]) if records else {wanted}
    if wanted in keys:
        return wanted
    fallback = [k for k in ("text", "caption", "captions", "prompt") if k in keys]
    if len(fallback) == 1:
        logger.info("%s: no %r column; using %r for captions", source, wanted, fallback[0])
        return fallback[0]
    raise ValueError(f"{source}: no caption column {wanted!r}; columns are {sorted(keys)} (set --caption_column)")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _sidecar_rows(root: Path) -> list[Row]:
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        row = Row(label=str(path), path=path.resolve())
        if not _inside(row.path, root.resolve()):  # a symlink pointing out of the folder
            row.problem, row.path = "path outside the folder: symlink", None
        sidecars = [path.with_suffix(ext) for ext in CAPTION_EXTENSIONS if path.with_suffix(ext).is_file()]
        if sidecars:
            lines = [ln.strip() for ln in sidecars[0].read_text(encoding="utf-8", errors="replace").splitlines()]
            lines = [ln for ln in lines if ln]
            row.caption = lines[0] if len(lines) == 1 else lines
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------- checking
def caption_problem(cell: Any) -> str | None:
    if cell is None:
        return "missing caption"
    texts = [cell] if isinstance(cell, str) else cell if isinstance(cell, (list, tuple)) else None
    if texts is None or not all(isinstance(t, str) for t in texts):
        return f"missing caption: not a string or a list of strings ({type(cell).__name__})"
    if not texts or not any(t.strip() for t in texts):
        return "empty caption"
    return None


def check_image(source: Path | bytes, max_pixels: int) -> tuple[str | None, dict]:
    """(problem or None, {"sha256", "width", "height"}): opens and fully decodes the image once."""
    raw = source.read_bytes() if isinstance(source, Path) else source
    info = {"sha256": hashlib.sha256(raw).hexdigest()}
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
            if w * h > max_pixels:  # checked before decoding: a bomb never gets decompressed
                return f"too many pixels: {w}x{h} > {max_pixels}", info
            if img.mode not in MODES:
                return f"unsupported mode: {img.mode}", info
            img.load()
            w, h = ImageOps.exif_transpose(img).size if _oriented(img) else (w, h)
    except Image.DecompressionBombError as e:
        return f"too many pixels: {e}", info
    except Image.UnidentifiedImageError:
        return "unreadable: not an image file", info
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() or "broken" in str(e).lower() else "unreadable"
        return f"{reason}: {e}", info
    except (ValueError, SyntaxError) as e:
        return f"unreadable: {e}", info
    info.update(width=w, height=h)
    return None, info


def _oriented(img: Image.Image) -> bool:
    return img.getexif().get(0x0112, 1) not in (1, None)


def check_rows(rows: list[Row], *, max_pixels: int = 89_478_485, on_bad_data: str = "skip",
               tokenizer=None, max_tokens: int | None = None) -> tuple[list[tuple[Row, dict]], Report]:
    """Open every image once; return the good rows with their image info, and the report."""
    if on_bad_data not in ("skip", "fail"):
        raise ValueError(f"on_bad_data must be skip or fail, got {on_bad_data!r}")
    report, kept = Report(total=len(rows), max_tokens=max_tokens), []
    for n, row in enumerate(rows, 1):
        problem, info = row.problem or caption_problem(row.caption), {}
        if problem is None:
            problem, info = check_image(row.path if row.path is not None else row.data, max_pixels)
        if problem:
            report.problems.append((row.label, problem))
        else:
            kept.append((row, info))
        if n % 5000 == 0:
            logger.info("checked %d / %d images", n, len(rows))
    report.kept = len(kept)
    if tokenizer is not None and max_tokens:
        report.long_captions = sum(_too_long(r.caption, tokenizer, max_tokens) for r, _ in kept)
        if report.long_captions:
            logger.warning("%d captions are longer than %d tokens and will be truncated", report.long_captions,
                           max_tokens)
    if report.problems:
        first = "\n  ".join(f"{label}: {reason}" for label, reason in report.problems[:20])
        more = f"\n  ... and {len(report.problems) - 20} more" if len(report.problems) > 20 else ""
        if on_bad_data == "fail":
            raise ValueError(f"{len(report.problems)} bad items (--on_bad_data fail):\n  {first}{more}")
        logger.warning("skipping %d bad items:\n  %s%s", len(report.problems), first, more)
    logger.info("data check:\n%s", report.table())
    return kept, report


def _too_long(cell: Any, tokenizer, max_tokens: int) -> bool:
    texts = [cell] if isinstance(cell, str) else list(cell)
    return any(len(tokenizer(t, truncation=False, verbose=False)["input_ids"]) > max_tokens for t in texts)


# ------------------------------------------------------------------------------- data sets
def dataset_rows(ds, image_column: str, caption_column: str, name: str) -> list[Row]:
    """Rows of a `datasets.Dataset` (hub or local), images not decoded yet."""
    from datasets import Image as ImageFeature

    raw = ds.cast_column(image_column, ImageFeature(decode=False))
    rows = []
    for i, rec in enumerate(raw):
        cell = rec[image_column] or {}
        path = Path(cell["path"]) if not cell.get("bytes") and cell.get("path") else None
        rows.append(Row(label=f"{name}[{i}]" + (f" ({cell.get('path')})" if cell.get("path") else ""),
                        path=path, data=cell.get("bytes"), caption=rec[caption_column],
                        problem=None if (path or cell.get("bytes")) else "missing file: no image data"))
    return rows


def to_dataset(kept: list[tuple[Row, dict]]):
    """A `datasets.Dataset` of the kept rows: image (decoded lazily), text, image_hash, width, height.
    Caption cells are all strings, or all lists when any row has several."""
    from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value

    captions = [r.caption for r, _ in kept]
    several = any(not isinstance(c, str) for c in captions)
    if several:
        captions = [[c] if isinstance(c, str) else list(c) for c in captions]
    features = Features({"image": ImageFeature(), "text": Sequence(Value("string")) if several else Value("string"),
                         "image_hash": Value("string"), "width": Value("int32"), "height": Value("int32")})
    images = [{"path": str(r.path), "bytes": None} if r.path is not None else {"path": None, "bytes": r.data}
              for r, _ in kept]
    return Dataset.from_dict({"image": images, "text": captions, "image_hash": [i["sha256"] for _, i in kept],
                              "width": [i["width"] for _, i in kept], "height": [i["height"] for _, i in kept]},
                             features=features)
