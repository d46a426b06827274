"""Captioned image data through HF `datasets`: an image folder, a hub data set, or the built-in one."""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

import torch
from PIL import Image
from torchvision import transforms

logger = logging.getLogger(__name__)


def load_captioned_dataset(*, train_data_dir: str | None, dataset_name: str | None,
                           image_column: str, caption_column: str, builtin_num_images: int,
                           resolution: int, seed: int, cache_dir: str | None = None,
                           builtin_colors: str = "named"):
    """A `datasets.Dataset` with columns `image_column` and `caption_column`.

    train_data_dir: a folder in the HF imagefolder layout (images + metadata.jsonl / .csv with a
        `file_name` column). dataset_name: a hub data set (needs network). Neither: the built-in
        synthetic shapes set (`builtin_colors`: see `ldm.synthetic.make_examples`).
    """
    from datasets import load_dataset

    if train_data_dir:
        ds = load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train")
        source = train_data_dir
    elif dataset_name:
        ds = load_dataset(dataset_name, cache_dir=cache_dir, split="train")
        source = dataset_name
    else:
        from ldm.synthetic import make_dataset

        ds = make_dataset(builtin_num_images, resolution, seed, builtin_colors)
        source, image_column, caption_column = "built-in shapes", "image", "text"
    for column in (image_column, caption_column):
        if column not in ds.column_names:
            raise ValueError(f"{source}: no column {column!r}; columns are {ds.column_names} "
                             f"(set --image_column / --caption_column)")
    if image_column != "image" or caption_column != "text":
        ds = ds.select_columns([image_column, caption_column])
        ds = ds.rename_columns({image_column: "image", caption_column: "text"})
    logger.info("data: %d examples from %s", len(ds), source)
    return ds


def image_transform(resolution: int, center_crop: bool, random_flip: bool) -> transforms.Compose:
    """PIL -> (3, R, R) float in [-1, 1]: resize the short side, crop, optional flip."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
        transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def pick_caption(value: Any, rng: random.Random | torch.Generator) -> str:
    """A caption cell may hold one string or several (one is picked at random per use)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        if isinstance(rng, torch.Generator):
            return value[int(torch.randint(len(value), (1,), generator=rng))]
        return rng.choice(list(value))
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
    """RGB, with transparency composited on white (not on black, which RGBA->RGB would give)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
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
                   should_stop: Callable[[], None] | None = None) -> CachedLatents:
    """Encode every image once (center crop, no flip: the only transform a cache can hold).
    `should_stop` is called before each batch and may raise to abandon the work."""
    tf = image_transform(resolution, center_crop=True, random_flip=False)
    moments, captions = [], []
    for start in range(0, len(dataset), batch_size):
        if should_stop is not None:
            should_stop()
        rows = dataset[start : start + batch_size]
        pixels = torch.stack([tf(to_rgb(img)) for img in rows["image"]]).to(vae.device, vae.dtype)
        moments.append(vae.encode(pixels).latent_dist.parameters.float().cpu())  # (B, 2C, h, w)
        captions += rows["text"]
    return CachedLatents(torch.cat(moments), captions)


def collate_latents(examples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"moments": torch.stack([e["moments"] for e in examples]), "text": [e["text"] for e in examples],
            "index": torch.tensor([e["index"] for e in examples])}
