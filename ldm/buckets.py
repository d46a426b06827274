"""Aspect-ratio bucketing (NovelAI 2022; as in kohya sd-scripts and SimpleTuner), deterministic.

Instead of square crops, every image is resized to the bucket (width, height) of about
resolution**2 pixels whose aspect ratio is closest to its own, and batches are drawn from one
bucket at a time. The batch order of an epoch is a pure function of (seed, epoch): a resumed run
skips the batches it already did and sees the same ones after.

    buckets = make_buckets(512, 64)                          # [(384, 640), ..., (640, 384)]
    bucket_of = [assign_bucket(w, h, buckets, 64) for w, h in sizes]
    sampler = BucketBatchSampler(bucket_of, 8, seed=0, num_replicas=W, rank=r)
    pixels = to_tensor(resize_and_crop(img, bucket_of[i])[0])  # (3, h, w) in [-1, 1]

Wiring into `accelerate` (the sampler is already sharded, so it must not be sharded again):
see `BucketBatchSampler` and tests/test_buckets.py.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from typing import NamedTuple

import torch
from PIL import Image
from torchvision.transforms import functional as TF

Size = tuple[int, int]  # (width, height), PIL's order


# ---------------------------------------------------------------- the bucket list


def make_buckets(resolution: int, divisor: int = 64, *, min_side: int | None = None,
                 max_side: int | None = None, max_aspect: float = 2.0) -> list[Size]:
    """(width, height) pairs with sides multiples of `divisor` in [min_side, max_side] (defaults:
    divisor, unbounded), area <= resolution**2, aspect ratio within [1/max_aspect, max_aspect].

    For each width w the height is the largest multiple of `divisor` with w * h <= resolution**2
    (NovelAI's construction), and every bucket's transpose is in the list too. So each bucket
    is as large as the divisor allows: one of its sides cannot grow by d = divisor without
    passing the area A, (w + d) * h > A or w * (h + d) > A. Sorted, no duplicates, symmetric,
    the square (resolution, resolution) included.
    """
    min_side = divisor if min_side is None else min_side
    max_side = resolution * resolution // divisor if max_side is None else max_side
    if divisor < 1 or resolution % divisor:
        raise ValueError(f"resolution {resolution} is not a multiple of divisor {divisor}")
    if not min_side <= resolution <= max_side:
        raise ValueError(f"resolution {resolution} outside [min_side {min_side}, max_side {max_side}]: "
                         "the square bucket would be missing")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    area, buckets = resolution * resolution, set()
    first = -(-min_side // divisor) * divisor  # min_side rounded up to the divisor
    for width in range(first, max_side + 1, divisor):
        height = area // width // divisor * divisor
        if min_side <= height <= max_side and max(width, height) <= max_aspect * min(width, height):
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: Sequence[Size], divisor: int | None = None,
                  no_upscale: bool = False) -> Size:
    """The bucket whose log aspect ratio is closest to the image's (ties: the larger area, then
    the first in `buckets`). For an image inside the list's aspect range the error in log aspect
    is at most half the largest gap between neighbouring buckets' log aspects (`aspect_gap`).

    no_upscale: when the image does not cover that bucket (width < bw or height < bh, so it
    would be enlarged), it gets a bucket of its own instead (`own_bucket`): its size, cropped to
    the list's aspect range and scaled down to the list's largest area if needed, each side
    rounded down to `divisor` (default: the gcd of the buckets' sides). So it is only ever
    shrunk or cropped (by less than `divisor` per side, from rounding), never enlarged, except a
    side shorter than `divisor`, which becomes `divisor`. Large images keep the shared buckets,
    so only small images make extra (often small) buckets.
    """
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if not no_upscale or (width >= best[0] and height >= best[1]):
        return best
    if divisor is None:
        divisor = math.gcd(*(side for b in buckets for side in b))
    ratios = [b[0] / b[1] for b in buckets]
    return own_bucket(width, height, divisor=divisor, max_area=max(w * h for w, h in buckets),
                      aspect_range=(min(ratios), max(ratios)))


def own_bucket(width: int, height: int, *, divisor: int, max_area: int,
               aspect_range: tuple[float, float]) -> Size:
    """An image's own bucket (no upscaling): crop the longer side until width / height is in
    `aspect_range`, scale down (never up) to at most `max_area` pixels, round each side down to
    `divisor` (at least `divisor`). kohya's `bucket_no_upscale` rule, plus the aspect clamp."""
    lo, hi = aspect_range
    w, h = float(width), float(height)
    w, h = min(w, h * hi), min(h, w / lo)  # crop to the aspect range
    scale = min(1.0, math.sqrt(max_area / (w * h)))
    return (max(divisor, int(w * scale) // divisor * divisor),
            max(divisor, int(h * scale) // divisor * divisor))


def aspect_gap(buckets: Sequence[Size]) -> float:
    """The largest difference of log aspect ratio between neighbouring buckets; half of it bounds
    `assign_bucket`'s log-aspect error for images inside the buckets' aspect range."""
    logs = sorted({math.log(w / h) for w, h in buckets})
    return max((b - a for a, b in zip(logs, logs[1:])), default=0.0)


# ---------------------------------------------------------------- resize and crop


class Crop(NamedTuple):
    """Scale the image to `resize` (width, height), which covers the bucket, then cut `box`
    (left, top, right, bottom; PIL's order), which is the bucket's size."""

    resize: Size
    box: tuple[int, int, int, int]


def crop_plan(width: int, height: int, bucket: Size, rng: random.Random | None = None) -> Crop:
    """Where a (width, height) image goes in `bucket`: scaled by max(bw / width, bh / height),
    the smallest size that covers the bucket with the aspect kept (one side equals the bucket's),
    then cropped: centred (rng None; odd remainders leave the extra pixel right / bottom) or at a
    uniform position drawn from `rng` (top first, then left)."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    w, h = max(bw, round(width * scale)), max(bh, round(height * scale))
    top = rng.randint(0, h - bh) if rng is not None else (h - bh) // 2
    left = rng.randint(0, w - bw) if rng is not None else (w - bw) // 2
    return Crop((w, h), (left, top, left + bw, top + bh))


def resize_and_crop(img: Image.Image, bucket: Size, rng: random.Random | None = None
                    ) -> tuple[Image.Image, tuple[int, int]]:
    """`img` scaled and cropped to the bucket (`crop_plan`, bicubic). Returns the crop and its
    (top, left) in the scaled image."""
    plan = crop_plan(img.width, img.height, bucket, rng)
    return img.resize(plan.resize, Image.Resampling.BICUBIC).crop(plan.box), (plan.box[1], plan.box[0])


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return TF.to_tensor(img) * 2 - 1


# ---------------------------------------------------------------- batches


def _groups(bucket_of: Sequence[Hashable]) -> list[list[int]]:
    """Indices of each bucket (ascending), buckets in sorted order."""
    groups: dict = defaultdict(list)
    for i, bucket in enumerate(bucket_of):
        groups[bucket].append(i)
    return [groups[b] for b in sorted(groups)]


def epoch_batches(bucket_of: Sequence[Hashable], batch_size: int, *, seed: int, epoch: int,
                  num_replicas: int = 1, drop_last: bool = False, shuffle: bool = True) -> list[list[int]]:
    """Every process's batches of one epoch, in order; process r takes r, r + W, r + 2W, ...

    Each bucket's indices (shuffled with `shuffle`) are cut into batches of `batch_size`; the
    last batch of a bucket may be smaller, or is dropped with `drop_last`. All batches are then
    shuffled together. The count is made a multiple of W = num_replicas, so that every process
    runs the same number of steps (DDP hangs otherwise):
      drop_last=False: the first (-count % W) batches are repeated at the end (cyclically when
        there are fewer than W), so every image is seen at least once, and exactly once when
        the count is already a multiple of W;
      drop_last=True: the last (count % W) batches are dropped, so no image is seen twice.
    A pure function of its arguments (one `random.Random(f"{seed}/{epoch}")`).
    """
    rng = random.Random(f"{seed}/{epoch}")
    batches = []
    for indices in _groups(bucket_of):
        if shuffle:
            rng.shuffle(indices)
        cut = [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)]
        batches += [b for b in cut if len(b) == batch_size or not drop_last]
    if shuffle:
        rng.shuffle(batches)
    if drop_last:
        return batches[: len(batches) - len(batches) % num_replicas]
    return batches + [batches[i % len(batches)] for i in range(-len(batches) % num_replicas)]


def batches_per_replica(bucket_of: Sequence[Hashable], batch_size: int, *, num_replicas: int = 1,
                        drop_last: bool = False) -> int:
    """len(epoch_batches(...)) // num_replicas, without building them (the same for every epoch)."""
    sizes = [len(g) for g in _groups(bucket_of)]
    count = sum(n // batch_size if drop_last else -(-n // batch_size) for n in sizes)
    return count // num_replicas if drop_last else -(-count // num_replicas)


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices from one bucket each, already sharded for process `rank` of
    `num_replicas` (see `epoch_batches` for the order, the evening-out of the count and
    `drop_last`). `bucket_of[i]` is image i's bucket (any sortable key, e.g. (width, height)).

    Iteration order and `len` are pure functions of (bucket_of, batch_size, seed, epoch,
    num_replicas, rank, drop_last, shuffle); every rank has the same `len`. `set_epoch(e)`
    selects the epoch (a DataLoader prepared by accelerate calls it too).

    Resume: `accelerator.skip_first_batches(loader, k)` (it wraps this sampler and skips k index
    lists, loading no images), or `start_batch = k`, which skips the first k batches of the next
    iteration only. `len` always counts the whole epoch.

    With accelerate, give it to the DataLoader as `batch_sampler=` and wrap the loader with
    `accelerate.data_loader.prepare_data_loader(loader, accelerator.device, num_processes=1,
    process_index=0, put_on_device=True)`, not `accelerator.prepare`: with several processes
    that one wraps any batch_sampler in a `BatchSamplerShard` (whatever dispatch_batches /
    split_batches say) and would shard it a second time.
    """

    def __init__(self, bucket_of: Sequence[Hashable], batch_size: int, *, seed: int, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = False, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.bucket_of = tuple(bucket_of)
        self.batch_size, self.seed, self.num_replicas, self.rank = batch_size, seed, num_replicas, rank
        self.drop_last, self.shuffle = drop_last, shuffle
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches of `epoch`, in order (this process's: [rank::num_replicas])."""
        return epoch_batches(self.bucket_of, self.batch_size, seed=self.seed, epoch=epoch,
                             num_replicas=self.num_replicas, drop_last=self.drop_last, shuffle=self.shuffle)

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.global_batches(self.epoch)[self.rank :: self.num_replicas]
        start, self.start_batch = self.start_batch, 0  # a skip applies to one epoch only
        yield from mine[start:]

    def __len__(self) -> int:
        return batches_per_replica(self.bucket_of, self.batch_size, num_replicas=self.num_replicas,
                                   drop_last=self.drop_last)
