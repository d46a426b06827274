"""The text encoder's hidden states per caption, computed once per run (in memory) or kept on disk
between runs (`<cache_dir>/text`), with the entry store, keys and layout of `ldm.cache`.

    key = sha256(token ids, text-encoder weights + config, output, dtype, settings, format)

Keyed by the token ids, the encoder's exact input, not by a fingerprint of the tokenizer: any
tokenizer change that matters (vocabulary, merges, normaliser, max_length, padding) changes the
ids; one that does not keeps the hits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ldm.cache import FORMAT, CacheStats, EntryStore, MemoryStore, digest, weights_hash
from ldm.text import encode_tokens, tokenize

logger = logging.getLogger(__name__)

OUTPUTS = ("last_hidden_state",)  # what `ldm.text.encode_tokens` returns


def unique_captions(cells: Iterable[str | Sequence[str]]) -> list[str]:
    """Every caption of the cells (a string or a list of them), first-seen order, "" first (the
    caption dropout's empty caption)."""
    flat = [""]
    for cell in cells:
        flat.extend([cell] if isinstance(cell, str) else cell)
    return list(dict.fromkeys(flat))


class TextEmbeddingCache:
    """Hidden states (L, D) of a frozen text encoder per caption, keyed by the caption's token ids.

    cache_dir: None keeps the entries in memory, for this object's life and this process only
    (`MemoryStore`, as `LatentCache`). dtype: what is stored (default: the encoder's weights'
    dtype). settings: anything besides the weights that changes the output (e.g. {"autocast":
    "fp16"}). in_memory: `lookup` serves tensors loaded by `ensure` instead of reading a file per
    caption.
    """

    def __init__(self, cache_dir: str | Path | None, text_encoder, tokenizer, *, output: str = "last_hidden_state",
                 dtype: torch.dtype | None = None, settings: dict[str, Any] | None = None, in_memory: bool = True):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.text_encoder, self.tokenizer, self.output = text_encoder, tokenizer, output
        self.dtype = dtype or text_encoder.dtype
        # In memory nothing outlives the weights: no need to hash them.
        self.model_id = weights_hash(text_encoder) if cache_dir is not None else "in-memory"
        self.settings = dict(settings or {})
        self.in_memory = in_memory or cache_dir is None
        self.store = EntryStore(Path(cache_dir) / "text", "context") if cache_dir is not None else MemoryStore("context")
        self.hidden_size = text_encoder.config.hidden_size
        self._keys: dict[str, tuple[str, int]] = {}  # caption -> (key, number of tokens L)
        self._memory: dict[str, torch.Tensor] = {}  # key -> (L, D)

    def key(self, ids: torch.Tensor) -> str:
        """The key of one caption's (L,) token ids."""
        return digest({"format": FORMAT, "kind": "text_hidden_states", "ids": ids.tolist(), "encoder": self.model_id,
                       "output": self.output, "dtype": str(self.dtype), "settings": self.settings})

    def keys(self, captions: Sequence[str], batch_size: int = 1024) -> list[tuple[str, int]]:
        """(key, L) of each caption (remembered: a training step's captions are tokenized once per run)."""
        new = [c for c in dict.fromkeys(captions) if c not in self._keys]
        for start in range(0, len(new), batch_size):
            chunk = new[start : start + batch_size]
            self._keys.update((c, (self.key(ids), len(ids))) for c, ids in zip(chunk, tokenize(self.tokenizer, chunk)))
        return [self._keys[c] for c in captions]

    @torch.no_grad()
    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) (the default encode_fn)."""
        return encode_tokens(self.text_encoder, ids)

    def ensure(self, cells: Iterable[str | Sequence[str]], *,
               encode_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 256,
               rank: int = 0, world_size: int = 1, wait_for_everyone: Callable[[], None] | None = None,
               should_stop: Callable[[], None] | None = None) -> CacheStats:
        """Encode the captions of `cells` (strings or lists of them; "" is always added) whose
        entries are missing; with `in_memory`, then load them all. `encode_fn` (default
        `self.encode`) maps (B, L) ids to (B, L, D), for wrapping only (the prepared encoder under
        autocast, counting). See `EntryStore.fill` for the processes."""
        captions = unique_captions(cells)
        wanted: dict[str, str] = {}  # key -> one caption with it
        for caption, (key, _) in zip(captions, self.keys(captions)):
            wanted.setdefault(key, caption)
        encode = encode_fn or self.encode

        @torch.no_grad()
        def compute(keys: list[str]) -> torch.Tensor:
            return encode(tokenize(self.tokenizer, [wanted[k] for k in keys]))

        def info(key: str) -> dict[str, Any]:
            return {"caption": wanted[key], "encoder": self.model_id, "output": self.output, "settings": self.settings}

        shape_of = lambda k: self._shape(wanted[k])  # noqa: E731
        stats = self.store.fill(wanted, compute, shape_of=shape_of, dtype=self.dtype, group_of=shape_of, info_of=info,
                                batch_size=batch_size, rank=rank, world_size=world_size,
                                wait_for_everyone=wait_for_everyone, should_stop=should_stop)
        if self.in_memory:
            self._memory.update({k: self.store.read(k, shape_of(k), self.dtype) for k in wanted})
        logger.info("text cache %s: %s", self.store.root, stats)
        return stats

    def lookup(self, captions: Sequence[str]) -> torch.Tensor:
        """(B,) captions -> (B, L, D), what `encode_tokens(text_encoder, tokenize(tokenizer, captions))`
        gives. A caption must have been passed to `ensure` (here or by an earlier run)."""
        out = []
        for caption, (key, _) in zip(captions, self.keys(captions)):
            tensor = self._memory.get(key)
            if tensor is None:
                if not self.store.exists(key):
                    raise KeyError(f"caption {caption[:60]!r} is not in the text cache {self.store.root}; "
                                   "pass it to ensure() first")
                tensor = self.store.read(key, self._shape(caption), self.dtype)
                if self.in_memory:
                    self._memory[key] = tensor
            out.append(tensor)
        return torch.stack(out)

    def _shape(self, caption: str) -> tuple[int, int]:
        return self.keys([caption])[0][1], self.hidden_size
