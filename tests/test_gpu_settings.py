"""GPU settings, tested on CPU: mixed precision resolution, channels_last, regional compilation,
the SDPA flash-kernel check, and the in-memory cache of a frozen text encoder's embeddings."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from accelerate import init_empty_weights

from ldm.attention import attention_head_dims, check_flash_kernels, sdpa_kernels
from ldm.models import build_unet
from ldm.presets import model_preset
from ldm.runtime import (compile_repeated_blocks, enable_tf32, requested_mixed_precision, resolve_mixed_precision,
                         use_channels_last)
from ldm.text import build_clip_tokenizer, build_text_encoder, encode_tokens, tokenize
from ldm.text_cache import TextEmbeddingCache


@pytest.mark.parametrize("asked, device, bf16, expected", [
    ("auto", "cuda", True, "bf16"),   # the GPU default
    ("auto", "cuda", False, "no"),    # e.g. V100: no bf16, float32 (fp16 only when asked)
    ("auto", "cpu", True, "no"),      # CPU keeps float32: results unchanged
    ("auto", "mps", False, "no"),
    ("no", "cuda", True, "no"),       # an explicit choice wins
    ("fp16", "cuda", True, "fp16"),
    ("bf16", "cuda", False, "bf16"),
    ("bf16", "cpu", False, "bf16"),   # bf16 autocast works on CPUs
    ("fp16", "cpu", False, "no"),     # accelerate would silently run float32
])
def test_resolve_mixed_precision_table(asked, device, bf16, expected):
    assert resolve_mixed_precision(asked, device, bf16) == expected


@pytest.mark.parametrize("flag, env, expected", [
    ("auto", None, "auto"),
    ("auto", "no", "auto"),      # what accelerate_config.yaml writes: treated as unset
    ("auto", "bf16", "bf16"),    # an accelerate config asking for half precision is followed
    ("auto", "FP16", "fp16"),
    (None, "", "auto"),          # a config saved before "auto" existed
    ("no", "bf16", "no"),        # the flag wins over the environment
    ("bf16", "no", "bf16"),
])
def test_requested_mixed_precision_table(flag, env, expected):
    assert requested_mixed_precision(flag, env) == expected


def test_cpu_defaults_leave_float32_and_memory_format_alone():
    before = torch.backends.cuda.matmul.allow_tf32
    assert enable_tf32(torch.device("cpu")) is False
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert use_channels_last(None, torch.device("cpu")) is False
    assert use_channels_last(None, torch.device("cuda")) is True
    assert use_channels_last(True, torch.device("cpu")) is True and use_channels_last(False, torch.device("cuda")) is False


def _tiny_unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, side, side, generator=g)
    ctx = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), ctx


def _tiny_unet(seed=0):
    cfg = model_preset("tiny")
    torch.manual_seed(seed)
    return build_unet(cfg.unet, in_channels=4, sample_size=8, cross_attention_dim=cfg.text.hidden_size).eval()


def test_channels_last_unet_gives_the_same_output():
    unet = _tiny_unet()
    x, t, ctx = _tiny_unet_inputs(unet)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=ctx).sample
        unet.to(memory_format=torch.channels_last)
        got = unet(x.contiguous(memory_format=torch.channels_last), t, encoder_hidden_states=ctx).sample
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_regional_compile_gives_the_same_output_and_keeps_state_dict_keys():
    unet = _tiny_unet()
    x, t, ctx = _tiny_unet_inputs(unet)
    keys = list(unet.state_dict())
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=ctx).sample
        n = compile_repeated_blocks(unet)
        start = time.perf_counter()
        got = unet(x, t, encoder_hidden_states=ctx).sample
    compiled = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert n == len(compiled) > 0  # every repeated block compiled, in place
    assert list(unet.state_dict()) == keys  # checkpoints keep their names (no "_orig_mod.")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    logging.getLogger(__name__).info("compiled %d blocks in %.1f s", n, time.perf_counter() - start)


def test_sd15_attention_head_dims_on_the_meta_device():
    cfg = model_preset("sd15")
    with init_empty_weights():
        unet = build_unet(cfg.unet, in_channels=4, sample_size=64, cross_attention_dim=cfg.text.hidden_size)
    # 16 transformer blocks (self + cross attention each): 320, 640, 1280 channels over 8 heads
    assert attention_head_dims([unet]) == {40: 10, 80: 10, 160: 12}


def test_flash_kernel_check_is_skipped_on_cpu_with_one_line(caplog):
    unet = _tiny_unet()
    with caplog.at_level(logging.INFO, logger="ldm.attention"):
        assert check_flash_kernels([unet], torch.bfloat16, torch.device("cpu")) == {}
    lines = [r.getMessage() for r in caplog.records]
    dims = sorted(attention_head_dims([unet]))
    assert lines == [f"SDPA flash-kernel check skipped on cpu (head dims {dims})"]
    assert sdpa_kernels(dims, torch.bfloat16, torch.device("cpu")) == {}


@pytest.mark.gpu
def test_sd15_head_dims_get_the_flash_kernel_in_bf16_on_cuda():
    kernels = sdpa_kernels([40, 80, 160], torch.bfloat16, torch.device("cuda"))
    assert kernels == {40: "flash", 80: "flash", 160: "flash"}
    assert sdpa_kernels([40], torch.float32, torch.device("cuda"))[40] != "flash"  # flash needs half precision


def test_in_memory_text_cache_returns_what_the_encoder_gives():
    torch.manual_seed(0)
    text_encoder = build_text_encoder(model_preset("tiny").text).eval()
    tokenizer = build_clip_tokenizer(32)
    cache = TextEmbeddingCache(None, text_encoder, tokenizer, in_memory=False)  # no folder: memory anyway
    stats = cache.ensure(["a red circle", ["a blue square", "a blue square at the top"]])
    assert (stats.entries, stats.misses) == (4, 4) and cache.in_memory  # "" included
    batch = ["a blue square", "", "a red circle", "a blue square at the top"]
    with torch.no_grad():
        expected = encode_tokens(text_encoder, tokenize(tokenizer, batch))  # (B, L, D)
    assert torch.equal(cache.lookup(batch), expected)
    with pytest.raises(KeyError, match="ensure"):
        cache.lookup(["never seen"])
