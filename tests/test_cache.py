"""On-disk latent / text-embedding caches (ldm/cache.py): hits, invalidation, corruption, processes."""

from __future__ import annotations

import copy
import logging
import multiprocessing

import pytest
import torch
from PIL import Image, ImageOps

from ldm.buckets import resize_and_crop, to_tensor
from ldm.cache import LatentCache, Preprocess, batch_slices, content_hash, latent_items, weights_hash
from ldm.text_cache import TextEmbeddingCache, unique_captions
from ldm.data import CachedLatents, collate_latents, image_transform, training_dataloader
from ldm.presets import model_preset
from ldm.synthetic import make_examples
from ldm.text import build_clip_tokenizer, encode_tokens, tokenize

R = 32  # the tiny preset's resolution


@pytest.fixture(scope="module")
def vae():
    from ldm.models import load_vae

    return load_vae(model_preset("tiny").pretrained_vae).eval()  # the shipped, trained tiny VAE


@pytest.fixture(scope="module")
def images():
    imgs, captions = make_examples(12, 48, seed=3)  # 48 px: resizing to 32 is part of the work
    return imgs, captions


class Counter:
    """An encode_fn that counts the images it is given."""

    def __init__(self, fn):
        self.fn, self.calls, self.images = fn, 0, 0

    def __call__(self, x):
        self.calls += 1
        self.images += len(x)
        return self.fn(x)


def square_items(imgs):
    return [(content_hash(img), Preprocess((R, R))) for img in imgs]


def fill(cache, items, imgs, batch_size=4):
    counter = Counter(cache.encode)
    stats = cache.ensure(items, lambda idx: [imgs[i] for i in idx], encode_fn=counter, batch_size=batch_size)
    return stats, counter


def make_dataset_from(imgs, captions):
    from datasets import Dataset, Features, Image as ImageFeature, Value

    return Dataset.from_dict({"image": imgs, "text": captions},
                             features=Features({"image": ImageFeature(), "text": Value("string")}))


def test_miss_then_hit_and_moments_equal_a_fresh_encode(vae, images, tmp_path):
    imgs, captions = images
    items = square_items(imgs)
    stats, counter = fill(LatentCache(tmp_path, vae), items, imgs)
    assert (stats.misses, stats.hits, stats.encoded, counter.images) == (12, 0, 12, 12)
    stats, counter = fill(LatentCache(tmp_path, vae), items, imgs)  # a second run: a new cache object
    assert (stats.misses, stats.hits, counter.calls) == (0, 12, 0)
    assert len(list((tmp_path / "latents").rglob("*.safetensors"))) == 12
    assert not list((tmp_path / "latents").rglob("*.tmp"))

    # Exactly the VAE's posterior parameters of the training transform (same batches of 4), and
    # exactly what the cache without a disk gives.
    square = image_transform(R, center_crop=True, random_flip=False)
    with torch.no_grad():
        reference = torch.cat([vae.encode(torch.stack([square(im) for im in imgs[k : k + 4]])).latent_dist.parameters
                               for k in range(0, 12, 4)])
    cache = LatentCache(tmp_path, vae)
    ds = cache.dataset(items, captions)
    assert isinstance(ds, CachedLatents) and ds.moments.shape == (12, 8, 16, 16)  # (N, 2C, R/2, R/2)
    assert torch.equal(ds.moments, reference)
    memory = LatentCache(None, vae)
    stats, counter = fill(memory, items, imgs)
    assert (stats.misses, counter.images) == (12, 12)
    assert torch.equal(memory.dataset(items, captions).moments, reference)
    lazy = cache.dataset(items, captions, in_memory=False)
    batch = collate_latents([lazy[i] for i in range(3)])
    assert torch.equal(batch["moments"], reference[:3])
    assert batch["text"] == captions[:3] and batch["index"] == [0, 1, 2]


def test_preprocess_is_the_training_transform():
    img = make_examples(1, 40, seed=0)[0][0].resize((40, 56))
    assert torch.equal(Preprocess((R, R))(img), image_transform(R, center_crop=True, random_flip=False)(img))
    assert torch.equal(Preprocess((32, 16), resize="cover")(img), to_tensor(resize_and_crop(img, (32, 16))[0]))
    assert torch.equal(Preprocess((R, R), flip=True)(img), Preprocess((R, R))(img).flip(-1))
    box = (4, 8, 36, 40)
    assert torch.equal(Preprocess((R, R), crop_box=box)(img), Preprocess((R, R))(img.crop(box)))
    with pytest.raises(ValueError):
        Preprocess((32, 16))  # short_side resizing gives squares only


def test_invalidation_recomputes_only_what_changed(vae, images, tmp_path):
    imgs, _ = images
    imgs = list(imgs)
    items = square_items(imgs)
    fill(LatentCache(tmp_path, vae), items, imgs)
    cache = LatentCache(tmp_path, vae)

    # (a) one image's pixels change: one miss
    edited = imgs[2].copy()
    edited.putpixel((0, 0), (1, 2, 3))
    imgs2 = imgs[:2] + [edited] + imgs[3:]
    stats, counter = fill(cache, square_items(imgs2), imgs2)
    assert (stats.misses, counter.images) == (1, 1)

    # (c) preprocessing of some items: crop box, size (a bucket), flip -> only those recomputed
    # The flipped one must not be mirror-symmetric (a lone centred circle flips onto itself).
    f = next(i for i in range(2, len(imgs)) if ImageOps.mirror(imgs[i]).tobytes() != imgs[i].tobytes())
    changed = list(items)
    changed[0] = (items[0][0], Preprocess((R, R), crop_box=(0, 0, 40, 40)))
    changed[1] = (items[1][0], Preprocess((32, 16), resize="cover"))
    changed[f] = (items[f][0], Preprocess((R, R), flip=True))
    stats, counter = fill(cache, changed, imgs)
    assert (stats.misses, stats.hits, counter.images) == (3, 9, 3)
    assert cache.read(*changed[1]).shape == (8, 8, 16)  # (2C, H/2, W/2) of a 32 x 16 input
    flipped = cache.read(*changed[f])
    assert not torch.equal(flipped, cache.read(*items[f]))

    # (b) one VAE parameter nudged: every entry is new, and the identity differs
    nudged = copy.deepcopy(vae)
    with torch.no_grad():
        nudged.encoder.conv_in.bias[0] += 1e-3
    assert weights_hash(nudged) != weights_hash(vae) == weights_hash(copy.deepcopy(vae))
    stats, counter = fill(LatentCache(tmp_path, nudged), items, imgs)
    assert (stats.misses, counter.images) == (12, 12)
    stats, counter = fill(LatentCache(tmp_path, vae), items, imgs)  # the old entries are still there
    assert (stats.hits, counter.calls) == (12, 0)


def test_batch_slices_put_a_short_last_batch_into_the_one_before():
    bounds = lambda *args: [(s.start, s.stop) for s in batch_slices(*args)]  # noqa: E731
    assert bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]  # min_last 1: plain batches
    assert bounds(10, 4, 4) == [(0, 4), (4, 10)]
    assert bounds(12, 4, 4) == [(0, 4), (4, 8), (8, 12)]
    assert bounds(500, 16, 16)[-2:] == [(464, 480), (480, 500)] and len(bounds(500, 16, 16)) == 31
    assert bounds(3, 16, 16) == [(0, 3)] and bounds(0, 16, 16) == []
    with pytest.raises(ValueError, match="batch_size"):
        batch_slices(10, 0)


def test_latent_cache_batches_and_their_moments(vae, images):
    """A short last batch joins the one before; the moments are the encoder's, whatever the batches."""
    imgs, _ = images  # 12
    sizes = []

    def encode(x):
        sizes.append(len(x))
        return cache.encode(x)

    cache, items = LatentCache(None, vae), square_items(imgs)
    cache.ensure(items, lambda idx: [imgs[i] for i in idx], encode_fn=encode, batch_size=5, min_last_batch=5)
    assert sizes == [5, 7]
    fresh = LatentCache(None, vae)
    fill(fresh, items, imgs, batch_size=12)
    for item in items:  # the same values (the last bits may depend on the batch's size: its kernels)
        torch.testing.assert_close(cache.read(*item), fresh.read(*item), rtol=0, atol=1e-5)


def test_content_hash():
    img = make_examples(1, 16, seed=0)[0][0]
    assert content_hash(img) == content_hash(img.copy()) == content_hash(img.convert("RGBA"))
    other = img.copy()
    other.putpixel((3, 3), (0, 0, 1))
    assert content_hash(other) != content_hash(img)
    assert content_hash(other.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) != content_hash(other)
    rotated = other.copy()
    rotated.getexif()[0x0112] = 6  # EXIF "rotate 90": to_rgb turns it upright
    assert content_hash(rotated) == content_hash(other.transpose(Image.Transpose.ROTATE_270)) != content_hash(other)


def test_corrupt_entry_is_recomputed_with_a_warning(vae, images, tmp_path, caplog):
    imgs, _ = images
    items = square_items(imgs)
    fill(LatentCache(tmp_path, vae), items, imgs)
    cache = LatentCache(tmp_path, vae)
    good = cache.read(*items[4])
    path = cache.store.path(cache.key(*items[4]))
    path.write_bytes(path.read_bytes()[:-100])  # truncated (a copy cut short)
    empty = cache.store.path(cache.key(*items[7]))
    empty.write_bytes(b"")  # a crash before the data reached the disk
    other = cache.store.path(cache.key(*items[9]))
    other.write_bytes(cache.store.path(cache.key(*items[8])).read_bytes())  # another entry's file
    with pytest.raises(RuntimeError, match="unreadable"):
        cache.dataset(items, [""] * 12, in_memory=False)[4]
    with caplog.at_level(logging.WARNING, logger="ldm.cache"):
        stats, counter = fill(cache, items, imgs)
    assert (stats.invalid, stats.misses, counter.images) == (3, 3, 3)
    assert sum("computing it again" in r.message for r in caplog.records) == 3
    assert any("holds key" in r.message for r in caplog.records)
    assert torch.equal(cache.read(*items[4]), good)


def test_an_interrupted_build_resumes(vae, images, tmp_path):
    imgs, _ = images
    items = square_items(imgs)
    batches = []

    def stop_after_two():
        if len(batches) == 2:
            raise KeyboardInterrupt
        batches.append(1)

    with pytest.raises(KeyboardInterrupt):
        LatentCache(tmp_path, vae).ensure(items, lambda idx: [imgs[i] for i in idx], batch_size=4,
                                          should_stop=stop_after_two)
    stats, counter = fill(LatentCache(tmp_path, vae), items, imgs)
    assert (stats.hits, stats.misses, counter.images) == (8, 4, 4)


def _fill_in_process(shared_dir, split_dir, rank, barrier, queue):
    """One process of test_processes_fill_one_cache (spawned: a fresh interpreter)."""
    torch.set_num_threads(1)
    from ldm.models import load_vae

    vae = load_vae(model_preset("tiny").pretrained_vae).eval()
    imgs, _ = make_examples(12, 48, seed=3)
    items, load = square_items(imgs), lambda idx: [imgs[i] for i in idx]
    LatentCache(shared_dir, vae).ensure(items, load, batch_size=2)  # as an independent run: every key
    stats = LatentCache(split_dir, vae).ensure(items, load, batch_size=2, rank=rank, world_size=2,
                                               wait_for_everyone=barrier.wait)
    queue.put((rank, (stats.checked, stats.encoded)))


def test_processes_fill_one_cache(vae, images, tmp_path):
    """Two processes at once: as two independent runs (each writes every key, the same keys at the
    same time), then as the two ranks of one run (each makes its part of the misses, then they meet
    at a barrier). Every entry loads and equals the direct encode."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    shared, split = tmp_path / "shared", tmp_path / "split"
    procs = [ctx.Process(target=_fill_in_process, args=(str(shared), str(split), rank, barrier, queue))
             for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    counts = dict(queue.get(timeout=5) for _ in procs)  # rank -> (checked, encoded)
    assert counts[0] == (counts[0][0], counts[0][0]) and counts[1] == (counts[1][0], counts[1][0])
    assert counts[0][0] + counts[1][0] == 12 and min(counts[0][0], counts[1][0]) > 0  # disjoint, nothing twice
    imgs, _ = images
    with torch.no_grad():
        direct = LatentCache(shared, vae).encode(torch.stack([Preprocess((R, R))(img) for img in imgs]))
    for folder in (shared, split):
        cache = LatentCache(folder, vae)
        for item, reference in zip(square_items(imgs), direct):
            # batch composition changes float rounding only (~1e-5), see ldm/cache.py
            torch.testing.assert_close(cache.read(*item), reference, rtol=0, atol=1e-4)
        assert len(list((folder / "latents").rglob("*.safetensors"))) == 12
        assert not list((folder / "latents").rglob("*.tmp"))


def test_latent_items_use_the_data_checks_hash_or_the_pixels(images):
    imgs, captions = images
    ds = make_dataset_from(imgs, captions)
    assert latent_items(ds, R) == square_items(imgs)
    with_hash = ds.add_column("image_hash", [f"{i:064x}" for i in range(len(ds))])
    items = latent_items(with_hash, R, buckets=[(32, 16)] * len(ds))
    assert items[3] == (f"{3:064x}", Preprocess((32, 16), resize="cover"))


def test_training_dataloader_caches_on_disk_or_in_memory_alike(vae, images, tmp_path):
    """--cache_latents with and without --cache_dir: the same moments, batches and order; a row of
    the in-memory cache is named by its index, so nothing is hashed and duplicates stay rows."""
    imgs, captions = images
    ds = make_dataset_from(imgs + imgs[:1], captions + captions[:1])  # a duplicate image
    common = dict(resolution=R, batch_size=5, seed=3, vae=vae, cache_latents=True)
    disk, _ = training_dataloader(ds, cache_dir=str(tmp_path), **common)
    memory, sampler = training_dataloader(ds, **common)
    assert sampler is None
    a, b = list(disk), list(memory)
    assert [x["index"] for x in a] == [x["index"] for x in b]
    assert sorted(i for x in b for i in x["index"]) == list(range(13))
    for x, y in zip(a, b):
        assert x["text"] == y["text"]
        torch.testing.assert_close(x["moments"], y["moments"], rtol=0, atol=1e-4)  # batch rounding only
    assert len(list((tmp_path / "latents").rglob("*.safetensors"))) == 12  # the duplicate: one entry
    pixels, _ = training_dataloader(ds, **{**common, "cache_latents": False})
    first = next(iter(pixels))
    assert first["pixel_values"].shape == (5, 3, R, R) and first["index"] == a[0]["index"]


# -------------------------------------------------------------------------------- text
@pytest.fixture(scope="module")
def text_encoder():
    from ldm.text import build_text_encoder

    torch.manual_seed(0)
    return build_text_encoder(model_preset("tiny").text).eval()


CELLS = ["a red circle on the left", ["a blue square", "a blue square at the top"], "a red circle on the left"]


def test_text_cache_hits_misses_and_equals_the_encoder(text_encoder, tmp_path):
    tokenizer = build_clip_tokenizer(32)
    assert unique_captions(CELLS) == ["", "a red circle on the left", "a blue square", "a blue square at the top"]
    cache = TextEmbeddingCache(tmp_path, text_encoder, tokenizer)
    counter = Counter(cache.encode)
    stats = cache.ensure(CELLS, encode_fn=counter)
    assert (stats.entries, stats.misses, counter.images) == (4, 4, 4)  # "" included, duplicates once
    again = TextEmbeddingCache(tmp_path, text_encoder, tokenizer, in_memory=False)
    counter = Counter(again.encode)
    stats = again.ensure(CELLS + ["a new caption"], encode_fn=counter)
    assert (stats.hits, stats.misses, counter.images) == (4, 1, 1)

    batch = ["a blue square", "", "a new caption", "a red circle on the left"]
    with torch.no_grad():
        expected = encode_tokens(text_encoder, tokenize(tokenizer, batch))  # (B, L, D)
    for c in (cache, again):
        got = c.lookup(batch)
        assert got.shape == (4, 32, 64) and torch.equal(got, expected)
    with pytest.raises(KeyError, match="ensure"):
        again.lookup(["never seen"])


def test_text_cache_invalidated_by_weights_and_max_length(text_encoder, tmp_path):
    TextEmbeddingCache(tmp_path, text_encoder, build_clip_tokenizer(32)).ensure(CELLS)
    nudged = copy.deepcopy(text_encoder)
    with torch.no_grad():
        nudged.final_layer_norm.bias[0] += 1e-3
    cache = TextEmbeddingCache(tmp_path, nudged, build_clip_tokenizer(32))
    counter = Counter(cache.encode)
    assert cache.ensure(CELLS, encode_fn=counter).misses == 4 and counter.images == 4

    short = TextEmbeddingCache(tmp_path, text_encoder, build_clip_tokenizer(16))
    counter = Counter(short.encode)
    assert short.ensure(CELLS, encode_fn=counter).misses == 4 and counter.images == 4
    assert short.lookup(["a blue square"]).shape == (1, 16, 64)

    same = TextEmbeddingCache(tmp_path, text_encoder, build_clip_tokenizer(32))
    counter = Counter(same.encode)
    assert same.ensure(CELLS, encode_fn=counter).hits == 4 and counter.calls == 0


def test_first_moments_are_the_cached_rows_in_order(vae, images, tmp_path):
    """The first-stage check decodes these instead of encoding its sample again: row i's moments,
    from memory or from disk; None for a loader that transforms images on the fly."""
    from ldm.cache import first_moments

    imgs, captions = images
    ds = make_dataset_from(imgs, captions)
    common = dict(resolution=R, batch_size=5, seed=3, vae=vae, cache_latents=True)
    memory, _ = training_dataloader(ds, **common)
    disk, _ = training_dataloader(ds, cache_dir=str(tmp_path), cache_in_memory=False, **common)
    got = first_moments(memory.dataset, 4)
    tf = image_transform(R, center_crop=True, random_flip=False)
    with torch.no_grad():
        fresh = vae.encode(torch.stack([tf(img.convert("RGB")) for img in imgs[:4]])).latent_dist.parameters
    assert got.shape == fresh.shape
    torch.testing.assert_close(got, fresh, rtol=0, atol=1e-4)  # batch rounding only
    torch.testing.assert_close(first_moments(disk.dataset, 4), got, rtol=0, atol=1e-4)
    assert first_moments(memory.dataset, 13) is None and first_moments(memory.dataset, 0) is None
    pixels, _ = training_dataloader(ds, **{**common, "cache_latents": False})
    assert first_moments(pixels.dataset, 4) is None
