"""Tag-style captions ("1girl, red hair, smiling, outdoors"), as kohya sd-scripts trains them.

    --caption_prefix "sks style, "   a trigger written in front of every instance caption
    --shuffle_tags --keep_tokens 1    the comma-separated tags shuffled each step, the first 1 in place
    --tag_dropout 0.1                 each tag after the kept ones left out with probability 0.1

The prefix is added to the data set's captions once (`add_prefix`), so the data fingerprint
and the text cache see it; the per-step processing (`process_tags`) recognises it and never
shuffles or drops it, and `keep_tokens` counts the caption's own tags after it (kohya counts the
prefix as a tag: there, --keep_tokens 1 is what keeps the trigger first). The random draws come
from the sample's own generator (`ldm.draws`): a resumed run, or one with another number of
processes, shuffles and drops exactly the same tags. Without --shuffle_tags and --tag_dropout
nothing is drawn, so other runs keep their draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

SEPARATOR = ", "


@dataclass(frozen=True)
class TagOptions:
    shuffle: bool = False
    keep_tokens: int = 0  # leading tags never shuffled or dropped
    dropout: float = 0.0  # probability that each other tag is left out
    prefix: str = ""  # the trigger, already added to the captions by `add_prefix`

    @property
    def random(self) -> bool:
        """Whether a caption changes from step to step (then a cache of its embedding cannot help)."""
        return self.shuffle or self.dropout > 0

    @classmethod
    def from_config(cls, cfg: Any) -> TagOptions:
        return cls(shuffle=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens, dropout=cfg.tag_dropout,
                   prefix=cfg.caption_prefix)


def split_tags(text: str) -> list[str]:
    """The comma-separated tags of `text`, stripped, empty ones left out."""
    return [t.strip() for t in text.split(",") if t.strip()]


def process_tags(caption: str, opts: TagOptions, generator: torch.Generator) -> str:
    """One caption as trained this step: the tags after the first `keep_tokens` each dropped with
    probability `dropout` (one uniform draw per tag, in order), then shuffled (one `randperm`),
    joined with ", "; the prefix, when the caption starts with it, stays in front untouched.
    Draws nothing when neither is asked for (the caption is returned as it is)."""
    if not opts.random:
        return caption
    head = opts.prefix if opts.prefix and caption.startswith(opts.prefix) else ""
    tags = split_tags(caption[len(head):])
    kept, rest = tags[: opts.keep_tokens], tags[opts.keep_tokens :]
    if opts.dropout > 0 and rest:
        survive = (torch.rand(len(rest), generator=generator) >= opts.dropout).tolist()
        rest = [t for t, s in zip(rest, survive) if s]
    if opts.shuffle and len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return head + SEPARATOR.join(kept + rest)


def tag_captions(captions: Sequence[str], opts: TagOptions, generators: Sequence[torch.Generator],
                 untouched: Sequence[bool] | None = None) -> list[str]:
    """`process_tags` for a batch, caption i with generator i; captions flagged in `untouched`
    (prior preservation's class prompts) are left as they are and draw nothing."""
    untouched = untouched if untouched is not None else [False] * len(captions)
    return [c if skip else process_tags(c, opts, g) for c, g, skip in zip(captions, generators, untouched, strict=True)]


def add_prefix(cell: str | list[str], prefix: str) -> str | list[str]:
    """A caption cell (one caption or several) with `prefix` in front of each caption."""
    if not prefix:
        return cell
    return prefix + cell if isinstance(cell, str) else [prefix + c for c in cell]


def with_prefix(dataset, prefix: str):
    """A `datasets.Dataset` whose text column has `prefix` in front of every caption."""
    if not prefix:
        return dataset
    texts = [add_prefix(cell, prefix) for cell in dataset["text"]]
    feature = dataset.features["text"]
    return dataset.remove_columns("text").add_column("text", texts, feature=feature)
