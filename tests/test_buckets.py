"""Aspect-ratio buckets: the bucket list, assignment error, crops, the batch sampler's guarantees
and the accelerate recipe it is used with."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.buckets import (BucketBatchSampler, aspect_gap, assign_bucket, batches_per_replica, crop_plan, epoch_batches,
                         make_buckets, resize_and_crop, to_tensor)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the bucket list


def test_known_bucket_lists():
    assert make_buckets(512, 64) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert make_buckets(64, 16) == [(48, 80), (64, 64), (80, 48)]
    # SDXL's published training buckets up to aspect 1.75 are all in the list at 1024 / 64
    sdxl = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)]
    assert set(sdxl) <= set(make_buckets(1024, 64))
    assert make_buckets(512, 64, min_side=448, max_side=576) == [(448, 576), (512, 512), (576, 448)]
    assert aspect_gap(make_buckets(512, 64)) == pytest.approx(math.log(640 / 384) - math.log(576 / 448))


@pytest.mark.parametrize("resolution, divisor, kwargs", [
    (512, 64, {}), (1024, 64, {}), (64, 16, {}), (768, 32, {"max_aspect": 3.0}),
    (1024, 64, {"min_side": 512, "max_side": 1536, "max_aspect": 4.0}), (256, 8, {"max_aspect": 1.5}),
])
def test_bucket_list_properties(resolution, divisor, kwargs):
    buckets = make_buckets(resolution, divisor, **kwargs)
    area, m = resolution * resolution, kwargs.get("max_aspect", 2.0)
    lo, hi = kwargs.get("min_side", divisor), kwargs.get("max_side", area)
    assert (resolution, resolution) in buckets and buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % divisor == 0 and h % divisor == 0 and lo <= min(w, h) and max(w, h) <= hi
        assert w * h <= area and max(w, h) <= m * min(w, h)
        assert (w + divisor) * h > area or w * (h + divisor) > area  # as large as the divisor allows
        assert (h, w) in buckets
    # h = d * floor(A / (w d)) > A / w - d, and w <= sqrt(A m): no bucket is far below the area
    assert min(w * h for w, h in buckets) > area - divisor * math.sqrt(area * m)


def test_bucket_list_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple"):
        make_buckets(500, 64)
    with pytest.raises(ValueError, match="square"):
        make_buckets(512, 64, max_side=448)
    with pytest.raises(ValueError, match="max_aspect"):
        make_buckets(512, 64, max_aspect=0.5)


# ---------------------------------------------------------------- assignment


@pytest.mark.parametrize("resolution, divisor", [(512, 64), (1024, 64), (64, 16), (768, 32)])
def test_assignment_aspect_error_is_bounded_by_half_the_bucket_spacing(resolution, divisor):
    """Neighbouring buckets differ in log aspect by at most `gap`, so an image inside the list's
    aspect range is assigned with a log-aspect error of at most gap / 2, i.e. a relative aspect
    error of at most exp(gap / 2) - 1 (13.9% at 512 / 64, 6.9% at 1024 / 64, 4.5% at 768 / 32)."""
    buckets = make_buckets(resolution, divisor)
    logs = sorted(math.log(w / h) for w, h in buckets)
    gap = aspect_gap(buckets)
    rng = random.Random(0)
    for _ in range(3000):
        w, h = rng.randint(32, 4000), rng.randint(32, 4000)
        bw, bh = assign_bucket(w, h, buckets, divisor)
        assert (bw, bh) in buckets
        if logs[0] <= math.log(w / h) <= logs[-1]:
            assert abs(math.log(bw / bh) - math.log(w / h)) <= gap / 2 + 1e-12
            assert abs((bw / bh) / (w / h) - 1) <= math.exp(gap / 2) - 1 + 1e-12
        else:  # wider or taller than any bucket: the most extreme one on that side
            assert math.log(bw / bh) == (logs[0] if w < h else logs[-1])


def test_exact_aspects_get_their_bucket_and_ties_the_larger_one():
    buckets = make_buckets(1024, 64)
    for w, h in buckets:
        assert assign_bucket(3 * w, 3 * h, buckets, 64) == (w, h)
    tie = [(64, 128), (128, 256)]  # equal aspect: the larger area wins
    assert assign_bucket(100, 200, tie) == (128, 256)


def test_no_upscale_known_answers():
    buckets = make_buckets(512, 64)  # aspect range [0.6, 5/3]
    assert assign_bucket(300, 200, buckets, 64, no_upscale=True) == (256, 192)
    assert assign_bucket(300, 200, buckets, 64) == (640, 384)  # log 1.5 is nearer log 5/3 than log 9/7
    assert assign_bucket(600, 400, buckets, 64, no_upscale=True) == (576, 384)  # 640x384 would enlarge it (600 < 640)
    assert assign_bucket(2000, 2000, buckets, 64, no_upscale=True) == (512, 512)
    assert assign_bucket(1000, 300, buckets, 64, no_upscale=True) == (448, 256)  # cropped to aspect 5/3 first
    assert assign_bucket(660, 390, buckets, 64, no_upscale=True) == (640, 384)  # covers its bucket: shared
    assert assign_bucket(20, 30, buckets, 64, no_upscale=True) == (64, 64)  # one divisor at least
    assert assign_bucket(300, 200, buckets, no_upscale=True) == (256, 192)  # divisor from the buckets' gcd


@pytest.mark.parametrize("resolution, divisor", [(512, 64), (64, 16)])
def test_no_upscale_never_enlarges_and_stays_within_the_area(resolution, divisor):
    buckets = make_buckets(resolution, divisor)
    ratios = [w / h for w, h in buckets]
    rng = random.Random(1)
    own = 0
    for _ in range(3000):
        w, h = rng.randint(divisor, 3 * resolution), rng.randint(divisor, 3 * resolution)
        bw, bh = assign_bucket(w, h, buckets, divisor, no_upscale=True)
        plan = crop_plan(w, h, (bw, bh))
        assert plan.resize[0] <= w and plan.resize[1] <= h  # scaled down or kept, never up
        assert bw % divisor == 0 and bh % divisor == 0 and bw * bh <= resolution * resolution
        if (bw, bh) != assign_bucket(w, h, buckets, divisor):
            own += 1
            # its own aspect, clamped to the list's range, up to rounding each side down by < divisor
            clamped = min(max(w / h, min(ratios)), max(ratios))
            sw, sh = (w, w / clamped) if clamped * h >= w else (h * clamped, h)
            scale = min(1.0, math.sqrt(resolution * resolution / (sw * sh)))
            slack = max(math.log(sw * scale / bw), math.log(sh * scale / bh))
            assert abs(math.log(bw / bh) - math.log(clamped)) <= slack + 1e-9
            # a side x is rounded to max(d, floor(x / d) d) > max(d, x - d): by less than a factor 2
            assert slack < max(math.log(x / max(divisor, x - divisor)) for x in (sw * scale, sh * scale)) + 1e-9
    assert own > 100  # the rule was exercised


# ---------------------------------------------------------------- resize and crop


def test_crop_plan_known_answers_and_bounds():
    assert crop_plan(400, 100, (128, 64)) == ((256, 64), (64, 0, 192, 64))  # centred
    assert crop_plan(300, 200, (192, 128)) == ((192, 128), (0, 0, 192, 128))  # same aspect: no crop
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(10, 2000), rng.randint(10, 2000)
        bucket = (rng.choice([48, 64, 128, 320]), rng.choice([48, 64, 128, 320]))
        for r in (None, random.Random(rng.random())):
            (rw, rh), (left, top, right, bottom) = crop_plan(w, h, bucket, r)
            assert (right - left, bottom - top) == bucket
            assert 0 <= left and right <= rw and 0 <= top and bottom <= rh
            assert rw == bucket[0] or rh == bucket[1]  # the smallest covering size
            assert abs(rw / rh - w / h) <= (w / h) * (1 / min(rw, rh) + 1 / min(w, h)) + 1e-9  # aspect kept


def test_random_crop_is_reproducible_and_uniform():
    plans = [crop_plan(400, 100, (128, 64), random.Random(s)).box for s in range(400)]
    assert plans[:10] == [crop_plan(400, 100, (128, 64), random.Random(s)).box for s in range(10)]
    lefts = Counter(left for left, *_ in plans)
    assert min(lefts) == 0 and max(lefts) == 128 and len(lefts) > 100  # every offset possible


def gradient_image(w: int, h: int) -> Image.Image:
    x = torch.linspace(0, 255, w).round().to(torch.uint8)
    y = torch.linspace(0, 255, h).round().to(torch.uint8)
    rgb = torch.stack([x.expand(h, w), y[:, None].expand(h, w), torch.full((h, w), 7, dtype=torch.uint8)], -1)
    return Image.fromarray(rgb.numpy(), "RGB")


def test_resize_and_crop_sizes_values_and_coordinates():
    img = gradient_image(300, 200)
    out, top_left = resize_and_crop(img, (192, 128))  # same aspect: scaled, nothing cut
    assert out.size == (192, 128) and top_left == (0, 0)
    white = to_tensor(resize_and_crop(Image.new("RGB", (90, 50), (255, 255, 255)), (64, 48))[0])
    black = to_tensor(resize_and_crop(Image.new("RGB", (90, 50), (0, 0, 0)), (64, 48))[0])
    assert white.shape == (3, 48, 64) and torch.all(white == 1) and torch.all(black == -1)
    rng = random.Random(0)
    for _ in range(50):
        w, h = rng.randint(40, 400), rng.randint(40, 400)
        bucket = (rng.choice([32, 48, 64]), rng.choice([32, 48, 64]))
        seed = rng.random()
        crop, (top, left) = resize_and_crop(gradient_image(w, h), bucket, random.Random(seed))
        plan = crop_plan(w, h, bucket, random.Random(seed))
        assert crop.size == bucket and (left, top) == plan.box[:2]
        # the crop is the box of the scaled image
        scaled = gradient_image(w, h).resize(plan.resize, Image.Resampling.BICUBIC)
        assert crop.tobytes() == scaled.crop(plan.box).tobytes()


# ---------------------------------------------------------------- the batch sampler


def uneven(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Bucket sizes far apart (weights 8:4:2:1), so buckets end in partial batches."""
    rng = random.Random(seed)
    return rng.choices([(64, 64), (96, 48), (48, 96), (80, 48)], weights=[8, 4, 2, 1], k=n)


def run_epoch(bucket_of, batch_size, world, epoch=0, **kw) -> list[list[list[int]]]:
    samplers = [BucketBatchSampler(bucket_of, batch_size, seed=7, num_replicas=world, rank=r, **kw)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n, batch_size", [(103, 4), (24, 4), (5, 4), (1, 3), (0, 2)])
def test_sampler_guarantees(world, drop_last, n, batch_size):
    bucket_of = uneven(n)
    per_rank = run_epoch(bucket_of, batch_size, world, drop_last=drop_last)
    length = len(BucketBatchSampler(bucket_of, batch_size, seed=7, num_replicas=world, drop_last=drop_last))
    assert [len(b) for b in per_rank] == [length] * world  # every rank the same number of steps
    groups = Counter(bucket_of)
    full = sum(g // batch_size for g in groups.values())
    count = full if drop_last else sum(-(-g // batch_size) for g in groups.values())
    assert length == (count // world if drop_last else -(-count // world))
    for batches in per_rank:
        for b in batches:
            assert len({bucket_of[i] for i in b}) == 1 and 1 <= len(b) <= batch_size  # one bucket each
            assert len(b) == batch_size or not drop_last
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    if drop_last:  # at most once; only the partial batches and the last count % W batches are missing
        assert max(seen.values(), default=1) == 1
        assert sum(seen.values()) == (full - full % world) * batch_size
    else:  # every image at least once; repeats only in the (-count % W) padding batches
        assert set(seen) == set(range(n))
        repeats = sum(seen.values()) - n
        padding = epoch_batches(bucket_of, batch_size, seed=7, epoch=0, num_replicas=world)[count:]
        assert len(padding) == -count % world and repeats == sum(len(b) for b in padding)
        if count % world == 0:
            assert all(v == 1 for v in seen.values())  # exactly once


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_image_exactly_once_when_the_batch_count_divides(world):
    bucket_of = [(64, 64)] * 16 + [(96, 48)] * 7 + [(48, 96)] * 3  # 4 + 2 + 1 = 7 batches of <= 4
    bucket_of += [(80, 48)] * (1 if world == 2 else 6)  # + 1 or 2 batches: 8 or 9 in all
    per_rank = run_epoch(bucket_of, 4, world, epoch=3)
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(len(bucket_of)))


def test_ranks_take_interleaved_batches_of_one_global_list():
    bucket_of = uneven(50)
    whole = epoch_batches(bucket_of, 4, seed=7, epoch=2, num_replicas=3)
    per_rank = run_epoch(bucket_of, 4, 3, epoch=2)
    assert [per_rank[j % 3][j // 3] for j in range(len(whole))] == whole


def test_order_is_a_pure_function_of_seed_and_epoch():
    bucket_of = uneven(60)
    s = BucketBatchSampler(bucket_of, 4, seed=3)
    e0, e0_again = list(s), list(BucketBatchSampler(list(bucket_of), 4, seed=3))
    s.set_epoch(1)
    e1, e1_again = list(s), list(s)
    assert e0 == e0_again and e1 == e1_again and e0 != e1
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(60))  # the same images, regrouped
    assert sorted(map(sorted, e0)) != sorted(map(sorted, e1))
    assert list(BucketBatchSampler(bucket_of, 4, seed=4)) != e0
    assert len(s) == len(e0) == len(e1)  # the length does not depend on the epoch
    # shuffle=False: buckets in sorted order, indices ascending, the same every epoch
    plain = BucketBatchSampler(bucket_of, 4, seed=3, shuffle=False)
    first = list(plain)
    plain.set_epoch(5)
    assert list(plain) == first and sum(first, []) == sorted(range(60), key=lambda i: (bucket_of[i], i))


def test_known_order_is_stable():
    """Pinned: a change here changes the order of runs already under way (resume would differ)."""
    bucket_of = [(64, 64), (48, 80), (80, 48), (64, 64), (64, 64), (48, 80), (80, 48), (64, 64), (48, 80), (64, 64)]
    s = BucketBatchSampler(bucket_of, 3, seed=0)
    assert list(s) == [[6, 2], [9, 7], [1, 8, 5], [0, 4, 3]]
    s.set_epoch(1)
    assert list(s) == [[4, 0, 3], [7, 9], [2, 6], [1, 5, 8]]
    assert [list(BucketBatchSampler(bucket_of, 3, seed=0, num_replicas=2, rank=r)) for r in range(2)] == [
        [[6, 2], [1, 8, 5]], [[9, 7], [0, 4, 3]]]


@pytest.mark.parametrize("world", [1, 2])
def test_resume_skipping_k_batches_gives_the_tail_of_the_epoch(world):
    bucket_of = uneven(37)
    for rank in range(world):
        reference = BucketBatchSampler(bucket_of, 4, seed=9, num_replicas=world, rank=rank)
        reference.set_epoch(2)
        whole = list(reference)
        for k in range(len(whole) + 2):
            resumed = BucketBatchSampler(bucket_of, 4, seed=9, num_replicas=world, rank=rank)
            resumed.set_epoch(2)
            resumed.start_batch = k
            assert len(resumed) == len(whole)  # len counts the whole epoch
            assert list(resumed) == whole[k:]
            assert list(resumed) == whole  # the skip applies once
            assert batches_per_replica(bucket_of, 4, num_replicas=world) == len(whole)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler([(64, 64)], 2, seed=0, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler([(64, 64)], 0, seed=0)


# ---------------------------------------------------------------- with accelerate


@pytest.fixture()
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def loader(sampler: BucketBatchSampler) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(list(range(len(sampler.bucket_of))), batch_sampler=sampler)


def test_accelerate_prepare_keeps_the_order_and_skips_exactly(fresh_accelerate):
    """One process: `Accelerator().prepare` leaves the batch sampler as it is (no sharding),
    forwards set_epoch, and `skip_first_batches` yields the tail of the same epoch."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    bucket_of = uneven(29)
    sampler = BucketBatchSampler(bucket_of, 4, seed=5)
    dl = accelerator.prepare(loader(sampler))
    assert len(dl) == len(sampler)
    for epoch in (0, 1, 2):
        dl.set_epoch(epoch)
        expected = sampler.global_batches(epoch)
        assert [b.tolist() for b in dl] == expected
        for k in (1, 3, len(expected) - 1):
            dl.set_epoch(epoch)
            assert [b.tolist() for b in accelerator.skip_first_batches(dl, k)] == expected[k:]
    dl.set_epoch(1)
    sampler.start_batch = 2  # the other way to skip
    assert [b.tolist() for b in dl] == sampler.global_batches(1)[2:]


def test_prepared_loader_ends_gradient_accumulation_at_the_epoch_end(fresh_accelerate):
    """Why the loader must be wrapped by accelerate: only then does `accumulate` sync at the end of
    an epoch whose batch count is not a multiple of the accumulation steps (train_ldm's
    steps_per_epoch = ceil(len / accumulation) and its resume arithmetic assume it)."""
    from accelerate import Accelerator
    from accelerate.data_loader import prepare_data_loader

    accelerator = Accelerator(gradient_accumulation_steps=2)
    sampler = BucketBatchSampler([(64, 64)] * 10, 2, seed=0)  # 5 batches

    def syncs(batches) -> list[bool]:
        flags = []
        for _ in batches:
            with accelerator.accumulate():
                flags.append(accelerator.sync_gradients)
        return flags

    wrapped = prepare_data_loader(loader(sampler), accelerator.device, num_processes=1, process_index=0,
                                  put_on_device=True)
    assert syncs(wrapped) == [False, True, False, True, True]
    assert syncs(wrapped) == [False, True, False, True, True]  # the next epoch starts afresh
    assert syncs(loader(sampler)) == [False, True, False, True, False]  # a bare loader carries one over


def test_sharded_sampler_must_not_be_sharded_again(fresh_accelerate):
    """The recipe for W processes: each rank's pre-sharded sampler wrapped with num_processes=1
    yields exactly its share; what `accelerator.prepare` does with W > 1 (a BatchSamplerShard
    around it, even with dispatch_batches=False, split_batches=False) loses batches."""
    from accelerate import PartialState
    from accelerate.data_loader import prepare_data_loader

    PartialState()
    bucket_of = uneven(41)
    world = 2
    whole = epoch_batches(bucket_of, 4, seed=1, epoch=0, num_replicas=world)
    recipe, resharded = [], []
    for rank in range(world):
        sampler = BucketBatchSampler(bucket_of, 4, seed=1, num_replicas=world, rank=rank)
        dl = prepare_data_loader(loader(sampler), None, num_processes=1, process_index=0)
        recipe.append([b.tolist() for b in dl])
        twice = prepare_data_loader(loader(sampler), None, num_processes=world, process_index=rank,
                                    dispatch_batches=False, split_batches=False)
        resharded.append([b.tolist() for b in twice])
    assert recipe == [whole[r::world] for r in range(world)]
    assert len({i for batches in resharded for b in batches for i in b}) < len(bucket_of)  # images lost


LAUNCHED = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from ldm.buckets import BucketBatchSampler

accelerator = Accelerator(gradient_accumulation_steps=2)
bucket_of = {bucket_of!r}
sampler = BucketBatchSampler(bucket_of, 3, seed=4, num_replicas=accelerator.num_processes,
                             rank=accelerator.process_index)
dl = torch.utils.data.DataLoader(list(range(len(bucket_of))), batch_sampler=sampler)
dl = prepare_data_loader(dl, accelerator.device, num_processes=1, process_index=0, put_on_device=True)
out = {{"len": len(dl)}}
dl.set_epoch(1)
out["epoch"] = [b.tolist() for b in dl]
dl.set_epoch(1)
out["skip"] = [b.tolist() for b in accelerator.skip_first_batches(dl, 2)]
syncs = []
for b in dl:
    with accelerator.accumulate():
        syncs.append(accelerator.sync_gradients)
out["syncs"] = syncs
out["all"] = accelerator.gather(torch.tensor([len(out["epoch"])])).tolist()
with open(sys.argv[1] + f"/rank{{accelerator.process_index}}.json", "w") as fh:
    json.dump(out, fh)
# Leave together, and take the gloo group down before the interpreter exits (a rank exiting with
# the group alive can abort: "terminate called without an active exception").
accelerator.wait_for_everyone()
accelerator.end_training()
"""


@pytest.mark.slow
def test_recipe_with_two_processes(tmp_path):
    """Two CPU processes (gloo) under `accelerate launch`: each rank gets its share of the global
    list, every image once, equal lengths, exact skip, an accumulation sync at the epoch end."""
    bucket_of = uneven(31, seed=2)
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED.format(root=str(ROOT), bucket_of=bucket_of))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_config.yaml"), "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(port), str(script), str(tmp_path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    whole = epoch_batches(bucket_of, 3, seed=4, epoch=1, num_replicas=2)
    assert [r["epoch"] for r in ranks] == [whole[0::2], whole[1::2]]
    assert all(r["skip"] == r["epoch"][2:] and r["len"] == len(whole) // 2 for r in ranks)
    assert ranks[0]["all"] == [len(whole) // 2] * 2
    n = len(whole) // 2
    assert all(r["syncs"] == [(j % 2 == 1) or j == n - 1 for j in range(n)] for r in ranks)
    count = sum(-(-c // 3) for c in Counter(bucket_of).values())
    seen = Counter(i for b in whole for i in b)
    assert set(seen) == set(range(31)) and (count % 2 == 1 or max(seen.values()) == 1)
