"""Captioned image data through HF `datasets`: an image folder, a hub data set, or the built-in one."""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms

from ldm.buckets import assign_bucket, make_buckets, resize_and_crop, to_tensor

logger = logging.getLogger(__name__)


def load_captioned_dataset(*, train_data_dir: str | None, dataset_name: str | None,
                           image_column: str, caption_column: str, builtin_num_images: int,
                           resolution: int, seed: int, cache_dir: str | None = None,
                           builtin_colors: str = "named", on_bad_data: str = "skip",
                           max_image_pixels: int = 89_478_485, tokenizer=None):
    """A `datasets.Dataset` with columns image (PIL) and text (a caption, or a list of them).

    train_data_dir: a folder (HF imagefolder metadata.jsonl / .csv, or sidecar .txt / .caption
        files; see `ldm.datacheck`). dataset_name: a hub data set (needs network). Either is
        checked first (every image opened once; bad rows skipped or, with on_bad_data="fail", an
        error listing them) and gets image_hash / width / height columns. Neither: the built-in
        synthetic shapes set (`builtin_colors`: see `ldm.synthetic.make_examples`).
    tokenizer: when given, captions longer than its model_max_length are counted and warned about.
    """
    from ldm import datacheck

    if train_data_dir:
        rows, source = datacheck.folder_rows(train_data_dir, caption_column), train_data_dir
    elif dataset_name:
        from datasets import load_dataset

        ds = load_dataset(dataset_name, cache_dir=cache_dir, split="train")
        rows, source = _hub_rows(ds, image_column, caption_column, dataset_name), dataset_name
    else:
        from ldm.synthetic import make_dataset

        ds = make_dataset(builtin_num_images, resolution, seed, builtin_colors)
        logger.info("data: %d examples from the built-in shapes", len(ds))
        return ds
    if not rows:
        raise ValueError(f"{source}: no images found (expected metadata.jsonl / metadata.csv or images with "
                         f".txt / .caption files)")
    max_tokens = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    kept, _ = datacheck.check_rows(rows, max_pixels=max_image_pixels, on_bad_data=on_bad_data,
                                   tokenizer=tokenizer, max_tokens=max_tokens)
    if not kept:
        raise ValueError(f"{source}: every one of {len(rows)} items is bad (see the report above)")
    logger.info("data: %d examples from %s", len(kept), source)
    return datacheck.to_dataset(kept)


def _hub_rows(ds, image_column: str, caption_column: str, name: str) -> list:
    from ldm import datacheck

    for column in (image_column, caption_column):
        if column not in ds.column_names:
            raise ValueError(f"{name}: no column {column!r}; columns are {ds.column_names} "
                             f"(set --image_column / --caption_column)")
    return datacheck.dataset_rows(ds, image_column, caption_column, name)


def image_transform(resolution: int, center_crop: bool, random_flip: bool) -> transforms.Compose:
    """PIL -> (3, R, R) float in [-1, 1]: resize the short side, crop, optional flip."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
        transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def pick_caption(value: Any, generator: torch.Generator) -> str:
    """A caption cell may hold one string or several (one is picked with the sample's generator)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[int(torch.randint(len(value), (1,), generator=generator))]
    raise ValueError(f"caption must be a string or a list of strings, got {value!r}")


def make_batch_transform(resolution: int, center_crop: bool, random_flip: bool):
    """For `Dataset.with_transform`: {'image': [...], 'text': [...]} -> pixel_values + caption cells
    (a cell with several captions is resolved per step by the training loop, `pick_caption`).
    Random crops and flips draw from torch's global RNG (of the data-loader worker)."""
    tf = image_transform(resolution, center_crop, random_flip)

    def apply(batch: dict[str, list]) -> dict[str, list]:
        pixels = [tf(to_rgb(img)) for img in batch["image"]]
        return {"pixel_values": pixels, "text": list(batch["text"])}

    return apply


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, upright: EXIF orientation applied; transparency (RGBA, LA, palette with a
    transparent colour) composited on white, not on black as a plain convert would; CMYK
    converted; 16-bit and 32-bit grayscale scaled to 8 bits (a plain convert would clip them)."""
    if img.getexif().get(0x0112, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and values.max() <= 1.0 else 65535.0 if values.max() > 255 else 255.0
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).float(),  # (B, 3, R, R)
        "text": [e["text"] for e in examples],
    }
    if "index" in examples[0]:
        batch["index"] = torch.tensor([e["index"] for e in examples])
    return batch


class CachedLatents(torch.utils.data.Dataset):
    """Posterior parameters of a frozen VAE, computed once: (N, 2C, h, w) mean and log-variance
    (diffusers' `DiagonalGaussianDistribution` layout) with the raw caption cells and the sample's
    index. A fresh z ~ q(z|x) is still drawn every step (and a caption picked from a list), by the
    training loop with the sample's own generator (`ldm.draws`)."""

    def __init__(self, moments: torch.Tensor, captions: list):
        self.moments = moments
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"moments": self.moments[i], "text": self.captions[i], "index": i}


class Indexed(torch.utils.data.Dataset):
    """Rows of `dataset` with their index added (the key of the sample's random draws)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "index": i}


@torch.no_grad()
def encode_dataset(vae, dataset, resolution: int, batch_size: int = 128,
                   should_stop: Callable[[], None] | None = None,
                   buckets: list[tuple[int, int]] | None = None) -> CachedLatents:
    """Encode every image once (center crop, no flip: the only transform a cache can hold), at
    `resolution` or, with `buckets` (one (width, height) per image), at its bucket's size.
    `should_stop` is called before each batch and may raise to abandon the work."""
    square = image_transform(resolution, center_crop=True, random_flip=False)

    def prepare(img: Image.Image, bucket: tuple[int, int]) -> torch.Tensor:
        if bucket is None:
            return square(to_rgb(img))
        return to_tensor(resize_and_crop(to_rgb(img), bucket)[0])

    if buckets is None:
        buckets = [None] * len(dataset)
    groups: dict[tuple[int, int] | None, list[int]] = {}
    for i, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(i)
    moments: list[torch.Tensor | None] = [None] * len(dataset)
    for bucket, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            if should_stop is not None:
                should_stop()
            chunk = indices[start : start + batch_size]
            images = dataset[chunk]["image"]
            pixels = torch.stack([prepare(img, bucket) for img in images])
            encoded = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters.float().cpu()
            for i, m in zip(chunk, encoded):  # (2C, h, w) each
                moments[i] = m
    captions = list(dataset["text"])
    stacked = torch.stack(moments) if len(groups) == 1 else moments
    return CachedLatents(stacked, captions)


def bucket_sizes(dataset, resolution: int, divisor: int, no_upscale: bool = False) -> list[tuple[int, int]]:
    """Each image's aspect-ratio bucket (`ldm.buckets`), from the width / height the data check recorded."""
    buckets = make_buckets(resolution, divisor)
    if "width" in dataset.column_names:
        sizes = zip(dataset["width"], dataset["height"])
    else:
        sizes = (to_rgb(img).size for img in dataset["image"])
    return [assign_bucket(w, h, buckets, divisor, no_upscale) for w, h in sizes]


class BucketedImages(torch.utils.data.Dataset):
    """Images resized and cropped to their bucket on the fly (random crop / flip allowed; they draw
    from Python's `random` of the data-loader worker)."""

    def __init__(self, dataset, buckets: list[tuple[int, int]], center_crop: bool, random_flip: bool):
        self.dataset, self.buckets = dataset, buckets
        self.center_crop, self.random_flip = center_crop, random_flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.dataset[i]
        img, _ = resize_and_crop(to_rgb(row["image"]), self.buckets[i], None if self.center_crop else random)
        if self.random_flip and random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"pixel_values": to_tensor(img), "text": row["text"], "index": i}


def collate_latents(examples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"moments": torch.stack([e["moments"] for e in examples]), "text": [e["text"] for e in examples],
            "index": torch.tensor([e["index"] for e in examples])}
