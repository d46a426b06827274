"""Aspect-ratio buckets: the bucket list, assignment error, and the batch sampler's guarantees."""

from __future__ import annotations

import math
import random

import pytest
from PIL import Image

from ldm.buckets import BucketBatchSampler, assign_bucket, make_buckets, resize_and_crop


def test_buckets_have_bounded_area_divisible_sides_and_the_square():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 512 * 512 and max(w, h) / min(w, h) <= 2.0
        assert (w + 64) * h > 512 * 512 or (w * (h + 64) > 512 * 512)  # as large as the divisor allows
        assert (h, w) in buckets
    assert (384, 640) in buckets and (640, 384) in buckets


def test_assignment_aspect_error_is_bounded():
    """Neighbouring buckets differ in log aspect by at most `gap`, so any image within the
    aspect range is assigned with a log-aspect error of at most gap / 2."""
    buckets = make_buckets(512, 64)
    logs = sorted(math.log(w / h) for w, h in buckets)
    gap = max(b - a for a, b in zip(logs, logs[1:]))
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(300, 3000), rng.randint(300, 3000)
        bw, bh = assign_bucket(w, h, buckets, 64)
        if logs[0] <= math.log(w / h) <= logs[-1]:
            assert abs(math.log(bw / bh) - math.log(w / h)) <= gap / 2 + 1e-9
        else:  # wider or taller than any bucket: the most extreme one on that side
            assert math.log(bw / bh) in (logs[0], logs[-1])


def test_no_upscale_keeps_small_images_small():
    buckets = make_buckets(512, 64)
    assert assign_bucket(300, 200, buckets, 64, no_upscale=True) == (256, 192)
    assert assign_bucket(300, 200, buckets, 64) in buckets
    assert assign_bucket(2000, 2000, buckets, 64, no_upscale=True) == (512, 512)


def test_resize_and_crop_gives_the_bucket_size():
    img = Image.new("RGB", (300, 200))
    out, (top, left) = resize_and_crop(img, (192, 128))
    assert out.size == (192, 128) and top >= 0 and left >= 0
    a = resize_and_crop(Image.new("RGB", (400, 100)), (128, 64), random.Random(3))
    b = resize_and_crop(Image.new("RGB", (400, 100)), (128, 64), random.Random(3))
    assert a[1] == b[1] and a[0].size == (128, 64)


def sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [rng.choice([(64, 64), (96, 48), (48, 96), (80, 48)]) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_batch_is_one_bucket_and_ranks_get_equal_counts(world, drop_last):
    bucket_of = sizes(103)
    samplers = [BucketBatchSampler(bucket_of, 4, seed=7, num_replicas=world, rank=r, drop_last=drop_last)
                for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    for batches in per_rank:
        assert all(len({bucket_of[i] for i in b}) == 1 for b in batches)
    seen = [i for batches in per_rank for b in batches for i in b]
    if not drop_last:
        assert set(seen) == set(range(103))  # everything seen; repeats only to even out the ranks
    assert len(samplers[0].global_batches(0)) % world == 0


def test_each_image_exactly_once_when_batches_divide_evenly():
    bucket_of = [(64, 64)] * 16 + [(96, 48)] * 8  # 6 batches of 4: divisible by 1, 2 and 3
    for world in (1, 2, 3):
        seen = [i for r in range(world)
                for b in BucketBatchSampler(bucket_of, 4, seed=1, num_replicas=world, rank=r) for i in b]
        assert sorted(seen) == list(range(24))


def test_order_is_a_function_of_seed_and_epoch_and_resume_skips_exactly():
    bucket_of = sizes(60)
    s = BucketBatchSampler(bucket_of, 4, seed=3)
    e0, e0_again = list(s), list(BucketBatchSampler(bucket_of, 4, seed=3))
    s.set_epoch(1)
    e1 = list(s)
    assert e0 == e0_again and e0 != e1
    resumed = BucketBatchSampler(bucket_of, 4, seed=3)
    resumed.set_epoch(1)
    resumed.start_batch = 5
    assert list(resumed) == e1[5:]
    assert list(resumed) == e1  # the skip applies once
