"""Text conditioning: an offline CLIP tokenizer, the CLIP text transformer, caption dropout.

The tokenizer is OpenAI CLIP's byte-level BPE. Its merge table ships inside `open_clip_torch`
(`open_clip.tokenizer.default_bpe()`); the vocabulary is derived from it exactly as CLIP's
`simple_tokenizer.py` does (256 byte symbols, the same with `</w>`, one token per merge, then
`<|startoftext|>` = 49406 and `<|endoftext|>` = 49407), so the ids equal those of
`openai/clip-vit-large-patch14` and no hub access is needed.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.presets import TextEncoderConfig

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the 16e6 BPE file


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[str]]:
    if bpe_path is None:
        import open_clip

        bpe_path = open_clip.tokenizer.default_bpe()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


@functools.lru_cache(maxsize=1)
def _cached_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab, merges = clip_vocab_and_merges()
    return vocab, [tuple(m.split()) for m in merges]


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The CLIP tokenizer of Stable Diffusion 1.x (pad = `<|endoftext|>`), built offline."""
    vocab, merges = _cached_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )


def build_text_encoder(cfg: TextEncoderConfig) -> CLIPTextModel:
    """A randomly initialised CLIP text transformer (ViT-L/14's text tower for the sd15 preset)."""
    config = CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_length,
        projection_dim=cfg.projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """(B,) prompts -> (B, L) token ids, padded and truncated to the tokenizer's length."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_tokens(text_encoder: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B, L, D) last hidden states, the U-Net's cross-attention context.

    Like Stable Diffusion, no attention mask: CLIP's causal mask already hides later padding.
    """
    return text_encoder(input_ids.to(text_encoder.device), return_dict=False)[0]


def drop_captions(captions: list[str], p: float, generator: torch.Generator | list[torch.Generator]) -> list[str]:
    """Replace each caption by "" with probability p (classifier-free guidance training,
    Ho & Salimans 2022). "" is also what the pipeline encodes for the unconditional branch.
    `generator` may be a list, one per caption (then caption i draws from generator i)."""
    if isinstance(generator, list):
        keep = torch.cat([torch.rand(1, generator=g) for g in generator]) >= p
    else:
        keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def write_bpe_files(tokenizer_dir: Path) -> None:
    """Write vocab.json and merges.txt from tokenizer.json (BPE models) if they are missing."""
    tok_json = tokenizer_dir / "tokenizer.json"
    if not tok_json.exists() or (tokenizer_dir / "vocab.json").exists():
        return
    model = json.loads(tok_json.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tokenizer_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def word_separation(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, a: str, b: str) -> dict[str, float]:
    """How far apart the text encoder keeps two prompts that differ in words: L2 distance of the
    last hidden states at the first differing token and at the end-of-text token after prompt `a`
    (where CLIP's causal attention has seen every word), and the mean norm of a hidden state.
    A word the encoder has learned to ignore shows ~0 at both."""
    ids = tokenize(tokenizer, [a, b])
    differ = (ids[0] != ids[1]).nonzero()
    if len(differ) == 0:
        raise ValueError(f"{a!r} and {b!r} tokenize alike")
    first = int(differ[0])
    eos = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    with torch.no_grad():
        h = encode_tokens(text_encoder, ids).float()
    gap = (h[0] - h[1]).norm(dim=-1)
    return {"word": float(gap[first]), "end": float(gap[eos]), "norm": float(h.norm(dim=-1).mean()),
            "before": float(gap[:first].max()) if first else 0.0}
