"""On-disk caches of what the frozen models compute from the data, shared between runs and processes:
the VAE's posterior moments per image (here) and the text encoder's hidden states per caption
(`ldm.text_cache`).

An entry's key is a hash of everything its value depends on, so an entry never goes stale: change
an image, a weight or a preprocessing setting and the affected entries get new keys and are
computed again; the others stay hits.

    latent key = sha256(image content, VAE weights + config, preprocessing, format)
    text key   = sha256(token ids, text-encoder weights + config, output, dtype, settings, format)

- Moments are stored raw, (2C, h, w) = (mean, logvar) of q(z|x), before `scaling_factor`, so the
  training loop still draws a fresh z every step and the scaling factor is not part of the key.
- Preprocessing (`Preprocess`) is applied by the cache itself, so the key cannot disagree with what
  was encoded; the key also holds a hash of the source of the functions that do it (`to_rgb`,
  `image_transform`, `resize_and_crop`, ...) and Pillow's version, so editing them invalidates.
- Text is keyed by the token ids, the encoder's exact input, not by a fingerprint of the
  tokenizer: any tokenizer change that matters (vocabulary, merges, normaliser, max_length,
  padding) changes the ids; one that does not keeps the hits.
- Not in the keys: batch composition, device, thread count, attention kernel. They change results
  by float rounding only (the tiny VAE: 2e-5 between batch 1 and batch 8), far below the
  posterior's noise. Settings that do change the result beyond the weights (autocast) go in
  `settings`.

Layout: <cache_dir>/latents/ab/abcd....safetensors and <cache_dir>/text/ab/abcd....safetensors,
one small safetensors file per entry (sharded by the key's first two hex digits: 256 folders,
~4k files each at 1e6 entries). One file per entry needs no index, so there is nothing to keep
consistent: each file is written to a temporary name in its folder and renamed (`os.replace`),
so any number of processes may write the same key at once (identical content, last rename
wins), a killed writer leaves no half entry, a corrupt file loses one entry, and an interrupted
build resumes where it stopped. The file's metadata holds its key (checked on every read) and
what it was made from (inspect with `safetensors.safe_open(path, "pt").metadata()`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import PIL
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load, save_file

from ldm.buckets import resize_and_crop, to_tensor
from ldm.data import CachedLatents, image_transform, to_rgb
from ldm.models import vae_scale_factor

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout of an entry changes
RESIZE_MODES = ("short_side", "cover")
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# Config entries that record where a model came from, not what it computes.
_BOOKKEEPING = {"transformers_version", "torch_dtype", "dtype", "architectures", "name_or_path"}


class CorruptEntry(RuntimeError):
    """A cache file that cannot be read, or holds another key, shape or dtype than expected."""


# --------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------
def digest(obj: Any) -> str:
    """sha256 hex of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a model's config and state dict (every tensor's name, dtype, shape and bytes, in
    name order). Tensors are streamed into the hash one at a time (one copy of a tensor at most,
    from the GPU or of a non-contiguous one): ~0.2 s for SD's 83M-parameter VAE on one CPU core.
    The weights in memory are the truth: a file hash would miss a cast, a fused LoRA or a change
    made after loading, and reads the same bytes anyway."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:  # diffusers: a FrozenDict; transformers: a PretrainedConfig
        values = dict(config) if isinstance(config, dict) else config.to_dict()
        h.update(digest({k: v for k, v in values.items()
                         if not k.startswith("_") and k not in _BOOKKEEPING}).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)};".encode())
        h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def content_hash(img: Image.Image) -> str:
    """sha256 of the upright 8-bit RGB pixels the preprocessing starts from (`ldm.data.to_rgb`:
    EXIF orientation, transparency and palettes applied) and their size: for images held in
    memory. Files on disk are identified by the data check's `image_hash` (sha256 of the bytes)."""
    rgb = to_rgb(img)
    h = hashlib.sha256(f"{rgb.mode}:{rgb.width}x{rgb.height};".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the VAE's input, (3, H, W) in [-1, 1]; every field is part of the key.

    size: (width, height) given to the VAE.
    resize: "short_side": the square training transform (`ldm.data.image_transform`: bilinear
        resize of the short side, center crop); "cover": `ldm.buckets.resize_and_crop` (bicubic
        resize to cover `size`, center crop), the aspect-bucket one.
    crop_box: (left, top, right, bottom) cut from the upright image first (None: all of it).
    flip: mirrored left-right at the end.
    """

    size: tuple[int, int]
    resize: str = "short_side"
    crop_box: tuple[int, int, int, int] | None = None
    flip: bool = False

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(self.size))  # frozen: hashable, whatever was passed
        if self.crop_box is not None:
            object.__setattr__(self, "crop_box", tuple(self.crop_box))
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.resize == "short_side" and self.size[0] != self.size[1]:
            raise ValueError(f"resize='short_side' makes square images, got size {self.size}")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        if self.crop_box is not None:
            img = img.crop(self.crop_box)
        if self.resize == "short_side":
            pixels = _square_transform(self.size[0])(img)
        else:
            pixels = to_tensor(resize_and_crop(img, self.size)[0])
        return pixels.flip(-1) if self.flip else pixels  # (3, H, W)

    def key_fields(self) -> dict[str, Any]:
        return {"size": list(self.size), "resize": self.resize, "crop_box": self.crop_box, "flip": self.flip,
                "code": _preprocess_code(), "pillow": PIL.__version__}


@functools.lru_cache(maxsize=8)
def _square_transform(resolution: int):
    return image_transform(resolution, center_crop=True, random_flip=False)


@functools.lru_cache(maxsize=1)
def _preprocess_code() -> str:
    """A hash of the source of everything that turns a file into pixels, following the calls into
    other `ldm` functions (`resize_and_crop` -> `crop_plan`, ...): edit any of it and every latent
    key changes (no version number to forget to bump)."""
    return digest(_sources([to_rgb, image_transform, resize_and_crop, to_tensor, Preprocess.__call__]))[:16]


def _sources(functions: list) -> list[str]:
    """Source of `functions` and of every `ldm` function they (or functions nested in them) name."""
    seen: dict[str, str] = {}
    todo = list(functions)
    while todo:
        fn = todo.pop()
        name = f"{fn.__module__}.{fn.__qualname__}"
        if name in seen:
            continue
        seen[name] = inspect.getsource(fn)
        codes, module = [fn.__code__], inspect.getmodule(fn)
        while codes:
            code = codes.pop()
            codes += [c for c in code.co_consts if inspect.iscode(c)]
            todo += [g for g in (getattr(module, n, None) for n in code.co_names)
                     if inspect.isfunction(g) and g.__module__.startswith("ldm.")]
    return [seen[k] for k in sorted(seen)]


def latent_items(dataset, resolution: int, buckets: Sequence[tuple[int, int]] | None = None,
                 chunk: int = 256, *, hashes: Sequence[str] | None = None) -> list[tuple[str, Preprocess]]:
    """(content hash, preprocessing) for every row of a `datasets.Dataset`, prepared as the
    uncached path prepares it (center crop, no flip): square at `resolution`, or with `buckets`
    (one (width, height) per row) the bucket's size. The hash is the data check's `image_hash`
    column where there is one, else `content_hash` of the decoded image; `hashes` (one per row)
    replaces it (an in-memory cache, which lives for one run over one data set, may name a row
    by its index)."""
    if hashes is not None:
        if len(hashes) != len(dataset):
            raise ValueError(f"{len(hashes)} hashes for {len(dataset)} rows")
        hashes = list(hashes)
    elif "image_hash" in dataset.column_names:
        hashes = list(dataset["image_hash"])
    else:
        hashes = [content_hash(img) for start in range(0, len(dataset), chunk)
                  for img in dataset[start : start + chunk]["image"]]
    if buckets is None:
        square = Preprocess((resolution, resolution))
        return [(h, square) for h in hashes]
    specs = {b: Preprocess(b, resize="cover") for b in map(tuple, buckets)}  # one object per bucket
    return [(h, specs[tuple(b)]) for h, b in zip(hashes, buckets)]


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------
@dataclass
class CacheStats:
    entries: int  # distinct keys asked for
    checked: int  # of them, those this process owns and checked (all, with one process)
    hits: int  # of the checked: valid on disk already
    misses: int  # of the checked: missing or invalid
    invalid: int  # of the misses: present but unreadable, or of the wrong key / shape / dtype
    encoded: int  # computed by this process
    seconds: float

    def __str__(self) -> str:
        return (f"{self.entries} entries, {self.checked} checked here: {self.hits} hits, {self.misses} misses "
                f"({self.invalid} invalid); {self.encoded} encoded here, {self.seconds:.1f} s")


MISSING = "missing"


def batch_slices(n: int, batch_size: int, min_last: int = 1) -> list[slice]:
    """Consecutive slices of `range(n)`, `batch_size` long; a last one shorter than `min_last`
    joins the one before it (so it holds up to batch_size + min_last - 1)."""
    if batch_size < 1 or min_last < 1:
        raise ValueError(f"batch_size and min_last must be >= 1, got {batch_size} and {min_last}")
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < min_last:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], n])]


class EntryStore:
    """One tensor per safetensors file at root/<key[:2]>/<key>.safetensors, written atomically."""

    def __init__(self, root: str | Path, tensor_name: str):
        self.root, self.tensor_name = Path(root), tensor_name

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def problem(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> str | None:
        """None for a valid entry, MISSING, or what is wrong. Reads the header only: safetensors
        refuses a file whose length does not match its header (truncation)."""
        path = self.path(key)
        if not path.exists():
            return MISSING
        try:
            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("key")
                names = list(f.keys())
                if names != [self.tensor_name]:
                    return f"holds tensors {names}, expected [{self.tensor_name!r}]"
                view = f.get_slice(self.tensor_name)
                got_shape, got_dtype = tuple(view.get_shape()), view.get_dtype()
        except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt entry
            return f"unreadable ({type(e).__name__}: {e})"
        if stored != key:
            return f"holds key {stored!r}"
        if got_shape != tuple(shape) or got_dtype != _DTYPES[dtype]:
            return f"holds {got_dtype} {list(got_shape)}, expected {_DTYPES[dtype]} {list(shape)}"
        return None

    def read(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The entry's tensor, in memory of its own (no memory map: thousands of maps would hit
        the kernel's limit, and a map would see a file rewritten in place)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
            tensor = load(data)[self.tensor_name]
            header_len = int.from_bytes(data[:8], "little")
            stored = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}).get("key")
        except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt entry
            raise CorruptEntry(f"{path}: unreadable ({type(e).__name__}: {e})") from e
        if stored != key or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise CorruptEntry(f"{path}: holds key {stored!r}, {tensor.dtype} {list(tensor.shape)}; expected "
                               f"{key!r}, {dtype} {list(shape)}")
        return tensor

    def write(self, key: str, tensor: torch.Tensor, info: dict[str, Any]) -> None:
        """Write to a temporary file in the entry's folder, then rename: readers see the whole
        entry or none (fsync is skipped: a file lost to a crash is found truncated and redone)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        metadata = {"key": key, "format": str(FORMAT), **{k: json.dumps(v, default=str) for k, v in info.items()}}
        try:
            save_file({self.tensor_name: tensor.contiguous()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def fill(self, wanted: dict[str, Any], compute: Callable[[list[str]], torch.Tensor], *,
             shape_of: Callable[[str], tuple[int, ...]], dtype: torch.dtype,
             group_of: Callable[[str], Hashable], info_of: Callable[[str], dict[str, Any]], batch_size: int,
             rank: int = 0, world_size: int = 1, wait_for_everyone: Callable[[], None] | None = None,
             should_stop: Callable[[], None] | None = None, min_last_batch: int = 1) -> CacheStats:
        """Make the entries of `wanted` (key -> anything) that are missing or invalid, `compute(keys)`
        giving their values stacked, (B, ...), for keys of one `group_of(key)` (e.g. an image size),
        in batches of `batch_size` (`batch_slices`: a last one under `min_last_batch` joins the one before).

        Processes: each key has an owner, rank = key mod `world_size` (the same on every process
        whenever it looked at the folder; a split of the missing list by position would not be, as
        processes start at different times). A process checks the headers of the keys it owns
        (~35 us each) and makes those missing, then all meet at `wait_for_everyone`; after it, a
        process only stats the others' keys and makes any still absent (a process that failed, or
        a cache folder not shared between machines). `should_stop` is called before each batch and
        may raise: the barrier is still reached, then the error goes on."""
        start = time.perf_counter()
        mine = [k for k in wanted if int(k[:15], 16) % world_size == rank]
        missing, invalid = [], 0
        for key in mine:
            problem = self.problem(key, shape_of(key), dtype)
            if problem is None:
                continue
            if problem != MISSING:
                logger.warning("cache entry %s %s; computing it again", self.path(key), problem)
                invalid += 1
            missing.append(key)
        make = functools.partial(self._make, compute=compute, shape_of=shape_of, dtype=dtype, group_of=group_of,
                                 info_of=info_of, batch_size=batch_size, should_stop=should_stop,
                                 min_last_batch=min_last_batch)
        try:
            encoded = make(missing)
        finally:
            if world_size > 1 and wait_for_everyone is not None:
                wait_for_everyone()
        owned = set(mine)
        left = [k for k in wanted if k not in owned and not self.exists(k)]
        if left:
            logger.warning("%d cache entries other processes should have written are missing under %s; "
                           "computing them here", len(left), self.root)
            encoded += make(left)
        return CacheStats(len(wanted), len(mine), len(mine) - len(missing), len(missing), invalid, encoded,
                          time.perf_counter() - start)

    def _make(self, keys: list[str], *, compute, shape_of, dtype, group_of, info_of, batch_size,
              should_stop, min_last_batch) -> int:
        groups: dict[Hashable, list[str]] = {}
        for key in keys:
            groups.setdefault(group_of(key), []).append(key)
        for members in groups.values():
            for batch_slice in batch_slices(len(members), batch_size, min_last_batch):
                if should_stop is not None:
                    should_stop()
                batch = members[batch_slice]
                values = compute(batch)
                for key, value in zip(batch, values, strict=True):
                    value = value.detach().to("cpu", dtype)
                    if tuple(value.shape) != tuple(shape_of(key)):
                        raise ValueError(f"computed {list(value.shape)} for a cache entry of shape "
                                         f"{list(shape_of(key))}")
                    self.write(key, value, info_of(key))
        return len(keys)


class MemoryStore(EntryStore):
    """An `EntryStore` without a disk: entries live in a dict as long as the object, for one
    process (`fill` computes every missing entry here, whatever `rank` and `world_size` say)."""

    def __init__(self, tensor_name: str):
        super().__init__("<memory>", tensor_name)
        self.entries: dict[str, torch.Tensor] = {}

    def exists(self, key: str) -> bool:
        return key in self.entries

    def problem(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> str | None:
        return None if key in self.entries else MISSING  # `_make` checked the shape on the way in

    def read(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return self.entries[key]

    def write(self, key: str, tensor: torch.Tensor, info: dict[str, Any]) -> None:
        self.entries[key] = tensor

    def fill(self, wanted, compute, **kwargs) -> CacheStats:
        return super().fill(wanted, compute, **{**kwargs, "rank": 0, "world_size": 1, "wait_for_everyone": None})


# --------------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------------
class LatentCache:
    """Posterior moments (2C, H/f, W/f), float32, of a frozen diffusers `AutoencoderKL`.

    cache_dir: None keeps the entries in memory, for this object's life and this process only
    (`MemoryStore`): the same encoding, batches and training view, without a disk.
    settings: anything besides the weights that changes the encoding (e.g. {"autocast": "bf16"}).
    """

    dtype = torch.float32

    def __init__(self, cache_dir: str | Path | None, vae, *, settings: dict[str, Any] | None = None):
        self.vae = vae
        # In memory nothing outlives the weights: no need to hash them.
        self.model_id = weights_hash(vae) if cache_dir is not None else "in-memory"
        self.settings = dict(settings or {})
        self.store = EntryStore(Path(cache_dir) / "latents", "moments") if cache_dir is not None else MemoryStore("moments")
        self.channels = 2 * vae.config.latent_channels  # mean and logvar
        self.factor = vae_scale_factor(vae.config)

    def key(self, image_hash: str, spec: Preprocess) -> str:
        return digest({"format": FORMAT, "kind": "vae_moments", "image": image_hash, "vae": self.model_id,
                       "preprocess": spec.key_fields(), "settings": self.settings})

    def shape(self, spec: Preprocess) -> tuple[int, int, int]:
        width, height = spec.size
        return self.channels, height // self.factor, width // self.factor

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2C, H/f, W/f) posterior parameters (the default encode_fn)."""
        return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.parameters

    def ensure(self, items: Sequence[tuple[str, Preprocess]], load_images: Callable[[list[int]], list[Image.Image]],
               *, encode_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 64,
               rank: int = 0, world_size: int = 1, wait_for_everyone: Callable[[], None] | None = None,
               should_stop: Callable[[], None] | None = None, min_last_batch: int = 1) -> CacheStats:
        """Encode the items (content hash, preprocessing) whose entries are missing; `load_images`
        gives the images of a list of item indices (e.g. `lambda idx: dataset[idx]["image"]`),
        asked for the misses only. `encode_fn` (default `self.encode`) must compute what it
        does: it is for wrapping it (device, counting), not for changing it. See `EntryStore.fill`
        for the processes and the batches."""
        first: dict[str, int] = {}
        for i, (image_hash, spec) in enumerate(items):
            first.setdefault(self.key(image_hash, spec), i)
        encode = encode_fn or self.encode

        @torch.no_grad()
        def compute(keys: list[str]) -> torch.Tensor:
            index = [first[k] for k in keys]
            pixels = torch.stack([items[i][1](img) for i, img in zip(index, load_images(index), strict=True)])
            return encode(pixels).float()

        def info(key: str) -> dict[str, Any]:
            image_hash, spec = items[first[key]]
            return {"image": image_hash, "vae": self.model_id, "preprocess": spec.key_fields(),
                    "settings": self.settings}

        stats = self.store.fill(first, compute, shape_of=lambda k: self.shape(items[first[k]][1]), dtype=self.dtype,
                                group_of=lambda k: items[first[k]][1].size, info_of=info, batch_size=batch_size,
                                rank=rank, world_size=world_size, wait_for_everyone=wait_for_everyone,
                                should_stop=should_stop, min_last_batch=min_last_batch)
        logger.info("latent cache %s: %s", self.store.root, stats)
        return stats

    def read(self, image_hash: str, spec: Preprocess) -> torch.Tensor:
        return self.store.read(self.key(image_hash, spec), self.shape(spec), self.dtype)

    def dataset(self, items: Sequence[tuple[str, Preprocess]], captions: list, *,
                in_memory: bool = True) -> torch.utils.data.Dataset:
        """The training view after `ensure`: items {"moments": (2C, h, w), "text": caption cell,
        "index": i}, as `ldm.data.CachedLatents` (which it is when `in_memory`: every entry read
        now, stacked when all have one shape); otherwise each entry is read from its file when
        asked for (data sets larger than memory; works in data-loader workers)."""
        if len(items) != len(captions):
            raise ValueError(f"{len(items)} items but {len(captions)} captions")
        entries = [(self.key(h, s), self.shape(s)) for h, s in items]
        if not in_memory:
            return CachedLatentFiles(self.store, entries, captions)
        moments = [self.store.read(key, shape, self.dtype) for key, shape in entries]
        same = len({m.shape for m in moments}) == 1
        return CachedLatents(torch.stack(moments) if same else moments, captions)


class CachedLatentFiles(torch.utils.data.Dataset):
    """`ldm.data.CachedLatents`' items, each read from its cache file on access."""

    def __init__(self, store: EntryStore, entries: list[tuple[str, tuple[int, int, int]]], captions: list):
        self.store, self.entries, self.captions = store, entries, captions

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key, shape = self.entries[i]
        return {"moments": self.store.read(key, shape, LatentCache.dtype), "text": self.captions[i], "index": i}


def first_moments(view: torch.utils.data.Dataset, rows: int) -> torch.Tensor | None:
    """(rows, 2C, h, w): the cached posterior parameters of the first `rows` rows of a latent
    cache's training view (`LatentCache.dataset`) when they have one shape; None for any other data
    set (images transformed on the fly, masks or class images wrapped around the view)."""
    if not isinstance(view, (CachedLatents, CachedLatentFiles)) or not 0 < rows <= len(view):
        return None
    moments = [view[i]["moments"] for i in range(rows)]
    return torch.stack(moments) if len({m.shape for m in moments}) == 1 else None
