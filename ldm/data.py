"""Captioned image data through HF `datasets`: an image folder, a hub data set, or the built-in one."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import functional as TF

from ldm import datacheck
from ldm.buckets import BucketBatchSampler, assign_bucket, make_buckets, resize_and_crop, to_tensor
from ldm.datacheck import DEFAULT_MAX_IMAGE_PIXELS
from ldm.errors import UsageError

logger = logging.getLogger(__name__)

# Images per VAE call when caching latents. On a CPU bigger batches are slower (their activations
# outgrow the caches; one thread, 64 images of 64 px, the sd_half VAE: 3.3 s in one batch, 2.1 s in
# 16s), and under 16 images the convolutions may take other kernels, with other bits: a short last
# batch joins the one before it (on this CPU, batches of 16-31 give the bits batches of 128 gave).
ENCODE_BATCH_SIZE = 16

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_DEEP_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def load_captioned_dataset(*, train_data_dir: str | None, dataset_name: str | None,
                           image_column: str, caption_column: str, builtin_num_images: int,
                           resolution: int, seed: int, cache_dir: str | None = None,
                           builtin_colors: str = "named", on_bad_data: str = "skip",
                           max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, tokenizer=None,
                           max_length: int | None = None):
    """A `datasets.Dataset` with columns image (PIL, decoded on access) and text (a caption, or a
    list of them: `pick_caption`).

    train_data_dir: a folder (HF imagefolder metadata.jsonl / .csv, or sidecar .txt / .caption
        files; see `ldm.datacheck`). dataset_name: a hub data set (`datasets.load_dataset`, needs
        network). Either is checked first (every image opened once; bad rows skipped or, with
        on_bad_data="fail", one ValueError listing them) and gets image_hash / width / height
        columns. Neither: the built-in synthetic shapes set, unchecked and unchanged
        (`builtin_colors`: see `ldm.synthetic.make_examples`).
    max_image_pixels: larger images are bad (decompression bombs).
    tokenizer, max_length: with a tokenizer, captions over max_length tokens (default: its
        model_max_length) are counted and warned about once.
    """
    check = dict(on_bad_data=on_bad_data, max_image_pixels=max_image_pixels, tokenizer=tokenizer,
                 max_length=max_length)
    # Images the check let through are decoded again for training: Pillow's own bomb limit
    # (about 89 M pixels, an error at twice that) must not refuse what --max_image_pixels allows.
    if max_image_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = max_image_pixels
    if train_data_dir:
        return checked_folder(train_data_dir, caption_column=caption_column, **check)
    if dataset_name:
        from datasets import load_dataset

        try:
            ds = load_dataset(dataset_name, cache_dir=cache_dir, split="train")
        except (ConnectionError, FileNotFoundError) as e:  # datasets' "Couldn't reach" / "doesn't exist"
            raise UsageError(f"--dataset_name {dataset_name}: {str(e).splitlines()[0]}") from None
        return checked_dataset(ds, image_column=image_column, caption_column=caption_column, name=dataset_name,
                               **check)
    from ldm.synthetic import make_dataset

    ds = make_dataset(builtin_num_images, resolution, seed, builtin_colors)
    logger.info("data: %d examples from the built-in shapes", len(ds))
    return ds


def checked_folder(root: str | Path, *, caption_column: str = datacheck.DEFAULT_CAPTION_COLUMN,
                   on_bad_data: str = "skip", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, tokenizer=None,
                   max_length: int | None = None, caption: str | None = None):
    """The good rows of a user folder (`ldm.datacheck.folder_rows`) as a `datasets.Dataset`: image
    (a path, decoded on access), text, image_hash, width, height (and mask, mask_hash when some
    image has a loss mask). caption: every image gets this one (prior preservation's class
    images); no caption file, metadata caption or mask is read."""
    from datasets import Dataset, Features, Image as ImageFeature

    datacheck.validate_settings(on_bad_data, max_image_pixels)
    scan = datacheck.folder_rows(root, caption_column, captions=caption is None)
    if caption is not None:
        scan = replace(scan, rows=[replace(row, caption=caption) for row in scan.rows])
    if not scan.rows:
        raise UsageError(datacheck.no_images_message(root))
    kept, report = datacheck.check_rows(scan.rows, source=str(root), max_image_pixels=max_image_pixels,
                                        tokenizer=tokenizer, max_length=max_length)
    _log_and_enforce(replace(report, unlisted=scan.unlisted), kept, on_bad_data)
    images = Dataset.from_dict({"image": [{"path": str(k.row.path), "bytes": None} for k in kept]},
                               features=Features({"image": ImageFeature()}))
    return _with_check_columns(images, kept)


def checked_dataset(ds, *, image_column: str = "image", caption_column: str = datacheck.DEFAULT_CAPTION_COLUMN,
                    name: str = "dataset", on_bad_data: str = "skip",
                    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, tokenizer=None, max_length: int | None = None):
    """The same for a `datasets.Dataset` (what `load_dataset` returns for a hub name). The kept
    images stay where `ds` keeps them: its memory-mapped cache files are not copied into memory."""
    from datasets import Image as ImageFeature

    datacheck.validate_settings(on_bad_data, max_image_pixels)
    rows = datacheck.dataset_rows(ds, image_column, caption_column, name)
    if not rows:
        raise UsageError(f"{name}: the data set is empty")
    kept, report = datacheck.check_rows(rows, source=name, max_image_pixels=max_image_pixels, tokenizer=tokenizer,
                                        max_length=max_length)
    _log_and_enforce(report, kept, on_bad_data)
    images = ds.select_columns([image_column])
    if len(kept) < len(ds):  # a cache-backed data set writes the kept rows to a new cache file
        images = images.select([k.index for k in kept]).flatten_indices()
    if image_column != "image":
        images = images.rename_column(image_column, "image")
    return _with_check_columns(images.cast_column("image", ImageFeature()), kept)


def _log_and_enforce(report: datacheck.Report, kept: list[datacheck.Kept], on_bad_data: str) -> None:
    datacheck.log_report(report)
    datacheck.apply_policy(report, on_bad_data)
    if not kept:
        raise UsageError(f"{report.source}: every one of {report.total} items is bad (see the report above)")
    logger.info("data: %d examples from %s", len(kept), report.source)


def _with_check_columns(images, kept: list[datacheck.Kept]):
    """`images` (an image column, one row per kept item) plus text, image_hash, width, height.
    Caption cells are all strings, or all lists when any row has several (one Arrow type)."""
    from datasets import Dataset, Features, List, Value, concatenate_datasets

    captions = [k.row.caption for k in kept]
    several = any(not isinstance(c, str) for c in captions)
    if several:
        captions = [[c] if isinstance(c, str) else list(c) for c in captions]
    values = {"text": captions, "image_hash": [k.info.sha256 for k in kept],
              "width": [k.info.width for k in kept], "height": [k.info.height for k in kept]}
    features = {"text": List(Value("string")) if several else Value("string"),
                "image_hash": Value("string"), "width": Value("int32"), "height": Value("int32")}
    if any(k.mask is not None for k in kept):  # loss masks (ldm.masks): a path and a content hash, or None
        values |= {"mask": [None if k.mask is None else str(k.row.mask) for k in kept],
                   "mask_hash": [None if k.mask is None else k.mask.sha256 for k in kept]}
        features |= {"mask": Value("string"), "mask_hash": Value("string")}
    columns = Dataset.from_dict(values, features=Features(features))
    return concatenate_datasets([images, columns], axis=1)


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
    Random crops and flips here would draw from torch's global RNG: training uses
    `AugmentedImages`, whose draws are keyed per sample; this is for fixed transforms."""
    tf = image_transform(resolution, center_crop, random_flip)

    def apply(batch: dict[str, list]) -> dict[str, list]:
        pixels = [tf(to_rgb(img)) for img in batch["image"]]
        return {"pixel_values": pixels, "text": list(batch["text"])}

    return apply


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image (`SUPPORTED_MODES`) as the upright 8-bit RGB image training starts from.

    - EXIF orientation applied (cameras store the pixels sideways plus a tag);
    - transparency (RGBA, LA, PA, premultiplied RGBa / La, or a palette, L or RGB image with a
      transparent colour) composited on white: a plain convert drops alpha and shows whatever
      colour the transparent pixels hold, often black;
    - 16-bit and 32-bit integer grayscale (I;16*, I) mapped from 0..65535 to 0..255 (a plain
      convert clips at 255: most of a 16-bit image turns white); float grayscale (F) from 0..1
      when every value is in it, else from 0..255 (Pillow's convention), see `_gray_to_8bit`;
    - CMYK, YCbCr, LAB, HSV, L and 1 converted by Pillow.
    """
    if img.getexif().get(0x0112, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
    if img.mode in _DEEP_GRAY_MODES:
        return _gray_to_8bit(img).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        if img.mode == "La":  # premultiplied: Pillow converts it to LA only
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """I;16* / I / F -> L. Integers are 16-bit samples (how Pillow opens 16-bit PNG and TIFF; 32-bit
    values beyond 0..65535 clip). Floats have no fixed range: 0..1 if they all fit, else 0..255;
    NaN is black."""
    values = np.asarray(img, dtype=np.float64)  # (H, W)
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0)
        top = 1.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else 255.0
    else:
        top = 65535.0
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8))


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).float(),  # (B, 3, R, R)
        "text": [e["text"] for e in examples],
    }
    if "index" in examples[0]:
        batch["index"] = [e["index"] for e in examples]  # host ints: the keys of the draws (`ldm.draws`)
    if "mask" in examples[0]:  # loss masks, (B, 1, R, R) in [0, 1] (ldm.masks)
        batch["mask"] = torch.stack([e["mask"] for e in examples])
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


def bucket_sizes(dataset, resolution: int, divisor: int, no_upscale: bool = False) -> list[tuple[int, int]]:
    """Each image's aspect-ratio bucket (`ldm.buckets`), from the width / height the data check recorded."""
    buckets = make_buckets(resolution, divisor)
    if "width" in dataset.column_names:
        sizes = zip(dataset["width"], dataset["height"])
    else:
        sizes = (to_rgb(img).size for img in dataset["image"])
    return [assign_bucket(w, h, buckets, divisor, no_upscale) for w, h in sizes]


class AugmentedImages(torch.utils.data.Dataset):
    """Images transformed on the fly: resized and cropped to a square of `resolution` (short side
    first, bilinear, as `image_transform`) or, with `buckets`, to each image's aspect bucket
    (`resize_and_crop`); optionally a random crop and a left-right flip.

    The random crop and flip of image i in epoch e draw from their own stream, keyed by
    (seed, e, i), never from a global RNG: a resumed run, any number of data-loader workers or
    processes see the same pixels. The loader's `set_epoch` does not reach a dataset behind a
    seeded sampler, so the training loop calls `set_epoch` here too (`set_loader_epoch`).
    A row's loss mask ("mask" column, `ldm.masks`) is placed with the same draws: items then hold
    "mask", (1, H, W) in [0, 1] (ones for a row without one)."""

    def __init__(self, dataset, *, resolution: int, center_crop: bool, random_flip: bool, seed: int,
                 buckets: list[tuple[int, int]] | None = None):
        self.dataset, self.resolution, self.buckets = dataset, resolution, buckets
        self.center_crop, self.random_flip, self.seed, self.epoch = center_crop, random_flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.dataset[i]
        key = f"{self.seed}/augment/{self.epoch}/{i}"  # str seeds are hashed with SHA-512: stable
        item = {"pixel_values": to_tensor(self._place(to_rgb(row["image"]), i, random.Random(key))),
                "text": row["text"], "index": i}
        if "mask" in row:  # a loss mask (ldm.masks) of the image's size: the same draws, so the same crop and flip
            from ldm.masks import load_mask, mask_tensor  # ldm.masks builds on this module

            mask = row["mask"]
            item["mask"] = (mask_tensor(self._place(load_mask(mask), i, random.Random(key))) if mask is not None
                            else torch.ones(1, *item["pixel_values"].shape[1:]))
        return item

    def _place(self, img: Image.Image, i: int, rng: random.Random) -> Image.Image:
        """Image i resized, cropped and flipped (draws from `rng`)."""
        if self.buckets is not None:
            img, _ = resize_and_crop(img, self.buckets[i], None if self.center_crop else rng)
        else:
            r = self.resolution
            img = TF.resize(img, r, interpolation=transforms.InterpolationMode.BILINEAR)
            if self.center_crop:
                img = TF.center_crop(img, [r, r])
            else:
                img = TF.crop(img, rng.randint(0, img.height - r), rng.randint(0, img.width - r), r, r)
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


def set_loader_epoch(dataloader, epoch: int) -> None:
    """`dataloader.set_epoch(epoch)` (its shuffle), and the epoch of its dataset's random crops and flips."""
    dataloader.set_epoch(epoch)
    if hasattr(dataloader.dataset, "set_epoch"):
        dataloader.dataset.set_epoch(epoch)


def collate_latents(examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"moments": torch.stack([e["moments"] for e in examples]), "text": [e["text"] for e in examples],
             "index": [e["index"] for e in examples]}  # host ints, as `collate`
    if "mask" in examples[0]:  # (B, 1, h, w) at latent resolution (ldm.masks)
        batch["mask"] = torch.stack([e["mask"] for e in examples])
    return batch


def training_dataloader(dataset, *, resolution: int, batch_size: int, seed: int, vae=None,
                        bucket_divisor: int | None = None, bucket_no_upscale: bool = False,
                        cache_latents: bool = False, cache_dir: str | None = None, cache_in_memory: bool = True,
                        center_crop: bool = True, random_flip: bool = False, num_workers: int = 0,
                        rank: int = 0, world_size: int = 1, wait_for_everyone: Callable[[], None] | None = None,
                        should_stop: Callable[[], None] | None = None, num_instance: int | None = None,
                        pin_memory: bool = False) -> tuple[torch.utils.data.DataLoader, BucketBatchSampler | None]:
    """The training batches of a captioned `datasets.Dataset`: (loader, bucket sampler or None).

    Batches hold "text" (caption cells), "index" (the rows, host ints: the keys of their random draws) and either
    "pixel_values" (B, 3, H, W) in [-1, 1] or, with latents cached, "moments" (B, 2C, h, w).
    - bucket_divisor: aspect-ratio buckets (`ldm.buckets`) with sides multiples of it, batches of
      one bucket from a `BucketBatchSampler` already sharded for process `rank` of `world_size`
      (wrap the loader with accelerate's `prepare_data_loader`, not `accelerator.prepare`). None:
      square images and a shuffle seeded with `seed`, for `accelerator.prepare` to shard.
    - cache_latents: the frozen `vae` encodes every image once (`ldm.cache.LatentCache`: on disk
      under `cache_dir`, shared between runs and processes, or in memory without one). Only when
      the transform is fixed (center_crop and no random_flip); otherwise images are transformed
      on the fly. `should_stop` is called before each batch of encoding and may raise.
    - loss masks (a "mask" column, `ldm.masks`): batches also hold "mask", (B, 1, H, W) with the
      pixels or, cached, (B, 1, h, w) at latent resolution.
    - num_instance: prior preservation (`ldm.prior`): the first num_instance rows are the
      instances, the rest class images; each batch holds batch_size of each (instances first)
      and "prior", a list of bools. Square images only.
    - pin_memory: batches in pinned memory, so that their copy to a GPU does not make the host wait.
    """
    from ldm.cache import LatentCache, latent_items  # ldm.cache builds on this module

    buckets = None  # each image's (width, height)
    if bucket_divisor is not None:
        buckets = bucket_sizes(dataset, resolution, bucket_divisor, bucket_no_upscale)
        logger.info("aspect buckets (width x height: images): %s", dict(Counter(f"{w}x{h}" for w, h in buckets)))
    if cache_latents and center_crop and not random_flip:
        cache = LatentCache(cache_dir, vae)
        # On disk an image is known by its content; in memory (one run, one data set) by its row.
        rows = None if cache_dir else [str(i) for i in range(len(dataset))]
        items = latent_items(dataset, resolution, buckets, hashes=rows)
        stats = cache.ensure(items, lambda idx: dataset[idx]["image"], batch_size=ENCODE_BATCH_SIZE,
                             min_last_batch=ENCODE_BATCH_SIZE, rank=rank, world_size=world_size,
                             wait_for_everyone=wait_for_everyone, should_stop=should_stop)
        logger.info("latent cache: %s", stats)
        view = cache.dataset(items, list(dataset["text"]), in_memory=cache_in_memory or not cache_dir)
        if "mask" in dataset.column_names:  # cached beside the latents, at their resolution
            from ldm.masks import with_cached_masks

            view = with_cached_masks(view, dataset, items, cache_dir, cache.factor, rank=rank, world_size=world_size,
                                     wait_for_everyone=wait_for_everyone, should_stop=should_stop)
        dataset = view
        collate_fn = collate_latents
    else:
        dataset = AugmentedImages(dataset, resolution=resolution, center_crop=center_crop, random_flip=random_flip,
                                  seed=seed, buckets=buckets)
        collate_fn = collate
    if num_instance is not None:
        from ldm.prior import PairCollate, PriorPairs

        if buckets:
            raise UsageError("prior preservation (--class_data_dir) trains square images: drop --aspect_buckets")
        dataset, collate_fn = PriorPairs(dataset, num_instance), PairCollate(collate_fn)
    if buckets:
        sampler = BucketBatchSampler(buckets, batch_size, seed=seed, num_replicas=world_size, rank=rank)
        return torch.utils.data.DataLoader(dataset, collate_fn=collate_fn, num_workers=num_workers,
                                           batch_sampler=sampler, pin_memory=pin_memory), sampler
    return torch.utils.data.DataLoader(dataset, collate_fn=collate_fn, num_workers=num_workers, batch_size=batch_size,
                                       shuffle=True, generator=torch.Generator().manual_seed(seed),
                                       pin_memory=pin_memory), None
