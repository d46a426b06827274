"""Masked loss: train on part of each image only.

A mask is a grayscale image of its image's size (`0001.mask.png` beside `0001.png`, or the
metadata's `mask_file_name`; `ldm.datacheck` finds and checks them): white = train, black = ignore,
grey = a weight in between. It goes through its image's resize, crop and flip (the same draws),
is brought to latent resolution by an area average (each latent cell gets the mean of the f x f
pixels it encodes) and weights the per-element loss. The weighted loss is normalised by the
mask's sum (`masked_mean`): each sample's loss is the mean over its trained region, so a small
mask does not shrink the loss (kohya sd-scripts instead averages over every pixel, which scales a
sample's loss by its mask's area). A row without a mask in a data set with masks trains everywhere.

With cached latents the masks are cached too (`MaskCache`), at latent resolution, beside them:
keyed by the mask's content, the preprocessing and the VAE's factor. A latent entry does not
depend on a mask, so latents cached before masks were added stay valid; the masks get entries of
their own, and a changed mask file gets a new key.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from ldm.cache import FORMAT, EntryStore, MemoryStore, Preprocess, digest
from ldm.data import to_rgb


def load_mask(source: str | Path | Image.Image) -> Image.Image:
    """A mask file (or image) as 8-bit grayscale, upright (EXIF), converted as images are
    (`ldm.data.to_rgb`: transparency on white, 16-bit scaled) then to luminance."""
    img = Image.open(source) if isinstance(source, (str, Path)) else source
    return to_rgb(img).convert("L")


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """8-bit grayscale PIL -> (1, H, W) float in [0, 1]."""
    return TF.to_tensor(mask.convert("L"))


def to_latent_size(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, h, w) by area averaging (for H = f h: the mean of each f x f block);
    unchanged when already (h, w)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="area")


def masked_mean(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, C, h, w) per-element loss -> (B,): sum(loss * m) / (C * sum(m)) per sample, the mask
    (B, 1, h, w) broadcast over channels; a sample whose mask is all zero gives 0. No mask: the
    plain mean."""
    if mask is None:
        return loss.mean(dim=(1, 2, 3))
    weighted = (loss * mask).sum(dim=(1, 2, 3))
    area = mask.sum(dim=(1, 2, 3)) * loss.shape[1]
    return weighted / area.clamp_min(torch.finfo(area.dtype).tiny)


def latent_mask(batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor | None:
    """The batch's masks (pixel or latent resolution) at the latents' size, device and dtype:
    (B, 1, h, w); None when the data has no masks."""
    if "mask" not in batch:
        return None
    return to_latent_size(batch["mask"].to(latents.device, latents.dtype), latents.shape[-2:])


def preprocess_mask(mask: Image.Image, spec: Preprocess) -> torch.Tensor:
    """A mask through its image's preprocessing (`ldm.cache.Preprocess`: the same resize, crop and
    flip): (1, H, W) in [0, 1]."""
    pixels = spec(mask.convert("RGB"))  # (3, H, W) in [-1, 1], the channels equal
    return ((pixels[:1] + 1) / 2).clamp(0, 1)  # bicubic resizing may overshoot


@functools.lru_cache(maxsize=1)
def _mask_code() -> str:
    return digest([inspect.getsource(f) for f in (load_mask, mask_tensor, to_latent_size, preprocess_mask)])[:16]


class MaskCache:
    """Masks at latent resolution, (1, H/f, W/f) float32 in [0, 1], on disk under
    <cache_dir>/masks (None: in memory), as `ldm.cache.LatentCache` keeps the moments."""

    dtype = torch.float32

    def __init__(self, cache_dir: str | Path | None, factor: int):
        self.factor = factor
        self.store = EntryStore(Path(cache_dir) / "masks", "mask") if cache_dir is not None else MemoryStore("mask")

    def key(self, mask_hash: str, spec: Preprocess) -> str:
        return digest({"format": FORMAT, "kind": "latent_mask", "mask": mask_hash, "factor": self.factor,
                       "preprocess": spec.key_fields(), "code": _mask_code()})

    def shape(self, spec: Preprocess) -> tuple[int, int, int]:
        width, height = spec.size
        return 1, height // self.factor, width // self.factor

    def compute(self, mask: Image.Image, spec: Preprocess) -> torch.Tensor:
        full = preprocess_mask(mask, spec)[None]  # (1, 1, H, W)
        return to_latent_size(full, self.shape(spec)[1:])[0]

    def ensure(self, items: Sequence[tuple[str, Preprocess]], load_masks: Callable[[list[int]], list[Image.Image]],
               **procs: Any):
        """Compute the missing entries of `items` ((mask hash, preprocessing) per masked row);
        `load_masks` gives the mask images of a list of item indices. `procs`: rank, world_size,
        wait_for_everyone, should_stop, as `EntryStore.fill` takes them."""
        first: dict[str, int] = {}
        for i, (mask_hash, spec) in enumerate(items):
            first.setdefault(self.key(mask_hash, spec), i)

        def compute(keys: list[str]) -> torch.Tensor:
            index = [first[k] for k in keys]
            return torch.stack([self.compute(m, items[i][1]) for i, m in zip(index, load_masks(index), strict=True)])

        def info(key: str) -> dict[str, Any]:
            mask_hash, spec = items[first[key]]
            return {"mask": mask_hash, "factor": self.factor, "preprocess": spec.key_fields()}

        return self.store.fill(first, compute, shape_of=lambda k: self.shape(items[first[k]][1]), dtype=self.dtype,
                               group_of=lambda k: items[first[k]][1].size, info_of=info, batch_size=256, **procs)

    def read(self, mask_hash: str, spec: Preprocess) -> torch.Tensor:
        return self.store.read(self.key(mask_hash, spec), self.shape(spec), self.dtype)


class LatentMasks(torch.utils.data.Dataset):
    """The items of `base` (cached latents) with "mask": (1, h, w) at latent resolution; a row
    without a mask (None) trains everywhere (ones)."""

    def __init__(self, base, masks: Sequence[torch.Tensor | None], shapes: Sequence[tuple[int, int, int]]):
        self.base, self.masks, self.shapes = base, list(masks), list(shapes)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        mask = self.masks[i]
        return {**self.base[i], "mask": torch.ones(self.shapes[i]) if mask is None else mask}


def with_cached_masks(view, dataset, items: Sequence[tuple[str, Preprocess]], cache_dir: str | None, factor: int,
                      **procs: Any) -> LatentMasks:
    """`view` (the cached-latents training view of `dataset`, items (image hash, preprocessing)
    per row) with each row's mask (`dataset`'s "mask" path and "mask_hash" columns) cached at
    latent resolution beside the latents."""
    cache = MaskCache(cache_dir, factor)
    paths, hashes = dataset["mask"], dataset["mask_hash"]
    rows = [i for i, path in enumerate(paths) if path is not None]
    masked = [(hashes[i], items[i][1]) for i in rows]
    cache.ensure(masked, lambda idx: [load_mask(paths[rows[j]]) for j in idx], **procs)
    masks: list[torch.Tensor | None] = [None] * len(paths)
    for i, (mask_hash, spec) in zip(rows, masked):
        masks[i] = cache.read(mask_hash, spec)
    return LatentMasks(view, masks, [cache.shape(spec) for _, spec in items])
