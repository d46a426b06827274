"""Aspect-ratio bucketing (NovelAI 2022; as in kohya sd-scripts and SimpleTuner), deterministic.

Instead of square crops, every image is resized to the bucket (width, height) of about
resolution**2 pixels whose aspect ratio is closest to its own, and batches are drawn from one
bucket at a time. The batch order of an epoch is a pure function of (seed, epoch): a resumed run
skips the batches it already did and sees the same ones after.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import torch
from PIL import Image
from torchvision.transforms import functional as TF


def make_buckets(resolution: int, divisor: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of `divisor`, area <= resolution**2 and as large as the
    divisor allows, aspect ratio within [1/max_aspect, max_aspect]; sorted, the square included."""
    if resolution % divisor:
        raise ValueError(f"resolution {resolution} is not a multiple of {divisor}")
    area, buckets = resolution * resolution, set()
    for width in range(divisor, int(resolution * math.sqrt(max_aspect)) + divisor, divisor):
        height = area // width // divisor * divisor
        if height >= divisor and max(width, height) / min(width, height) <= max_aspect:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]], divisor: int,
                  no_upscale: bool = False) -> tuple[int, int]:
    """The bucket whose log aspect ratio is closest to the image's. With `no_upscale`, an image
    with fewer pixels than that bucket keeps its own size, rounded down to the divisor (so it is
    cropped a little, never enlarged)."""
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if no_upscale and width * height < best[0] * best[1]:
        return max(divisor, width // divisor * divisor), max(divisor, height // divisor * divisor)
    return best


def resize_and_crop(img: Image.Image, bucket: tuple[int, int], rng: random.Random | None = None
                    ) -> tuple[Image.Image, tuple[int, int]]:
    """Scale `img` to cover the bucket (aspect kept), then crop it to the bucket: centred, or at a
    position drawn from `rng`. Returns the crop and its (top, left) in the scaled image."""
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    w, h = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    top = rng.randint(0, h - bh) if rng else (h - bh) // 2
    left = rng.randint(0, w - bw) if rng else (w - bw) // 2
    return img.crop((left, top, left + bw, top + bh)), (top, left)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return TF.to_tensor(img) * 2 - 1


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices from one bucket each, sharded over processes.

    Per epoch: each bucket's indices shuffled and cut into batches (the last one of a bucket may
    be smaller; with `drop_last` it is dropped), all batches shuffled together, then rank r of W
    takes batches r, r + W, ... . When the number of batches is not a multiple of W the first few
    batches are repeated at the end, so every rank runs the same number of steps (DDP would hang
    otherwise): without repeats (the count divides W) every image is seen exactly once per epoch.
    `start_batch` skips the first batches of the first epoch iterated (resume).
    """

    def __init__(self, bucket_of: list[tuple[int, int]], batch_size: int, *, seed: int, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = False):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.bucket_of, self.batch_size, self.seed = bucket_of, batch_size, seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches of `epoch`, in order (a pure function of seed and epoch)."""
        rng = random.Random(f"{self.seed}/{epoch}")
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, bucket in enumerate(self.bucket_of):
            groups[bucket].append(i)
        batches = []
        for bucket in sorted(groups):
            idx = groups[bucket]
            rng.shuffle(idx)
            cut = [idx[k : k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
            batches += [b for b in cut if len(b) == self.batch_size or not self.drop_last]
        rng.shuffle(batches)
        short = -len(batches) % self.num_replicas
        return batches + batches[:short]

    def __iter__(self):
        mine = self.global_batches(self.epoch)[self.rank :: self.num_replicas]
        start, self.start_batch = self.start_batch, 0  # a skip applies to one epoch only
        yield from mine[start:]

    def __len__(self) -> int:
        return len(self.global_batches(self.epoch)) // self.num_replicas
