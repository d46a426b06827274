"""The offline CLIP tokenizer and caption dropout."""

from __future__ import annotations

import open_clip
import pytest
import torch

from ldm.text import build_clip_tokenizer, drop_captions, tokenize

TEXTS = ["a red circle", "A photo of an astronaut riding a horse, 4k!", "naïve café, ümlaut 123",
         "don't  stop   believing", "emoji 🙂 and CJK 猫", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(77)


def test_ids_equal_open_clip_reference_tokenizer(tokenizer):
    reference = open_clip.tokenizer.SimpleTokenizer()
    for text in TEXTS:
        assert tokenizer(text).input_ids == [49406, *reference.encode(text), 49407], text


def test_known_stable_diffusion_ids(tokenizer):
    # the ids Stable Diffusion's own tokenizer gives for this prompt
    assert tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)


def test_padding_and_truncation_to_model_length():
    tok = build_clip_tokenizer(8)
    ids = tokenize(tok, ["a red circle", "one two three four five six seven eight nine"])
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == [49406, 320, 736, 7117, 49407, 49407, 49407, 49407]
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407  # truncated, still ends with EOS


def test_caption_dropout_rate_and_determinism():
    captions = [f"caption {i}" for i in range(4000)]
    out = drop_captions(captions, 0.25, torch.Generator().manual_seed(0))
    dropped = sum(c == "" for c in out)
    assert 900 < dropped < 1100  # 1000 expected, std ~27
    assert all(o in ("", c) for o, c in zip(out, captions))
    assert out == drop_captions(captions, 0.25, torch.Generator().manual_seed(0))
    assert drop_captions(captions[:50], 0.0, torch.Generator().manual_seed(0)) == captions[:50]
    assert captions[:4] == [f"caption {i}" for i in range(4)]  # the input list is unchanged


def test_word_separation_sees_only_what_differs_and_a_merged_word_reads_zero():
    from ldm.presets import model_preset
    from ldm.text import build_text_encoder, word_separation

    torch.manual_seed(0)
    cfg = model_preset("tiny").text
    encoder, tok = build_text_encoder(cfg).eval(), build_clip_tokenizer(cfg.max_length)
    top, bottom = "a red circle at the top", "a red circle at the bottom"
    s = word_separation(encoder, tok, top, bottom)
    assert s["before"] == 0.0  # causal attention: tokens before the differing word are unchanged
    assert s["word"] > 0.1 * s["norm"] and s["end"] > 0.1 * s["norm"]  # a random encoder keeps them apart
    # give "bottom" the embedding of "top": the encoder can no longer tell the prompts apart
    emb = encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb[tok.convert_tokens_to_ids("bottom</w>")] = emb[tok.convert_tokens_to_ids("top</w>")]
    merged = word_separation(encoder, tok, top, bottom)
    assert merged["word"] < 1e-5 and merged["end"] < 1e-5
    with pytest.raises(ValueError, match="tokenize alike"):
        word_separation(encoder, tok, top, top)
