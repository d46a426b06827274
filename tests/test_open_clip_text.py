"""OpenCLIP text towers converted to transformers' CLIPTextModel (ldm.open_clip_text): the same
hidden states (last and penultimate layer), pooled features and token ids as open_clip itself, on
a small randomly initialised open_clip model the test saves."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ldm.errors import UsageError
from ldm.open_clip_text import (convert_text_tower, load_open_clip_text_encoder, open_clip_model_config,
                                text_encoder_config, text_tower_state_dict)

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3}
VISION_CFG = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}
PROMPTS = ["a red circle on the left", "", "A  Big, BLUE square!", "word " * 100]  # the last one is truncated


def small_open_clip(folder, quick_gelu: bool, seed: int = 0):
    """A randomly initialised open_clip CLIP (3-layer, width-64 text tower) saved as open_clip saves
    it: open_clip_config.json (for `local-dir:`) and a safetensors state dict."""
    cfg = {"embed_dim": 32, "quick_gelu": quick_gelu, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG}
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=VISION_CFG, text_cfg=TEXT_CFG, quick_gelu=quick_gelu)
    with torch.no_grad():  # non-trivial LayerNorms and biases (open_clip starts them at 1 / 0)
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "ln" in name or name.endswith("bias") else None
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model, f"local-dir:{folder}", folder / "open_clip_model.safetensors"


@pytest.fixture(scope="module", params=[False, True], ids=["gelu", "quick_gelu"])
def saved(request, tmp_path_factory):
    return small_open_clip(tmp_path_factory.mktemp("open_clip"), quick_gelu=request.param)


def open_clip_reference(model, ids):
    """open_clip's own outputs: the last two blocks through ln_final (its forward_intermediates),
    and encode_text (pooled at argmax(ids), projected)."""
    with torch.no_grad():
        out = model.forward_intermediates(text=ids, text_indices=2, normalize_intermediates=True)
        return out["text_intermediates"][1], out["text_intermediates"][0], model.encode_text(ids)


def test_converted_encoder_matches_open_clip(saved):
    model, arch, weights = saved
    ids = open_clip.tokenize(PROMPTS)
    last, penultimate, features = open_clip_reference(model, ids)
    encoder, tokenizer = load_open_clip_text_encoder(arch, weights, layer="last")
    # the tokenizer: open_clip's ids, padding (0) included
    ours_ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours_ids, ids) and tokenizer.pad_token_id == 0
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        skipped = encoder.final_layer_norm(out.hidden_states[-2])  # the pipeline's clip_skip=1
    torch.testing.assert_close(out.last_hidden_state, last, rtol=0, atol=1e-5)
    torch.testing.assert_close(skipped, penultimate, rtol=0, atol=1e-5)
    # pooled at <|endoftext|> (open_clip: argmax of the ids), times open_clip's projection
    torch.testing.assert_close(out.pooler_output @ model.text_projection, features, rtol=0, atol=1e-5)
    assert (last - penultimate).abs().max() > 1e-2  # the two layers differ: the comparison can fail


def test_penultimate_conversion_drops_the_last_block_as_sd2(saved):
    model, arch, weights = saved
    ids = open_clip.tokenize(PROMPTS)
    _, penultimate, _ = open_clip_reference(model, ids)
    encoder, _ = load_open_clip_text_encoder(arch, weights, layer="penultimate")
    assert encoder.config.num_hidden_layers == TEXT_CFG["layers"] - 1
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids).last_hidden_state, penultimate, rtol=0, atol=1e-5)


def test_sd2_text_encoder_config_from_vit_h_14():
    """stabilityai/stable-diffusion-2's text_encoder: OpenCLIP ViT-H/14's tower, 23 of its 24 layers."""
    config = text_encoder_config(open_clip_model_config("ViT-H-14"), "penultimate")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.hidden_act, config.max_position_embeddings) == (1024, 4096, 23, 16, "gelu", 77)
    assert text_encoder_config(open_clip_model_config("ViT-H-14")).num_hidden_layers == 24


def test_prefixed_checkpoints_convert_alike(saved):
    """CustomTextCLIP ("text."), an SD 2 single file ("cond_stage_model.model.") and DDP ("module.")."""
    model, _, _ = saved
    plain = {k: v for k, v in model.state_dict().items()}
    expected = convert_text_tower(text_tower_state_dict(plain)[0], 3)
    for prefix in ("text.", "cond_stage_model.model.", "module."):
        tower, found = text_tower_state_dict({prefix + k: v for k, v in plain.items()})
        assert found == prefix
        got = convert_text_tower(tower, 3)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("arch, weights, layer, message", [
    ("ViT-Nope-1", "{w}", "last", "not an open_clip architecture"),
    ("hf-hub:laion/x", "{w}", "last", "nothing is downloaded"),
    ("local-dir:{tmp}/nowhere", "{w}", "last", "cannot read"),
    ("{arch}", "{tmp}/missing.safetensors", "last", "no such file"),
    ("{arch}", "{tmp}/garbage.bin", "last", "not a readable open_clip checkpoint"),
    ("ViT-B-32", "{w}", "last", "does not hold ViT-B-32's text tower (no tensor transformer.resblocks.3"),
    ("{wide}", "{w}", "last", "has shape (49408, 64), local-dir:"),
    ("{arch}", "{tmp}/vision_only.safetensors", "last", "no open_clip text tower in the checkpoint"),
    ("{arch}", "{w}", "second", "--text_encoder_layer must be one of last, penultimate"),
    ("{ls}", "{w}", "last", "ls_init_value=0.1 has no equivalent"),
])
def test_mistakes_are_one_line_usage_errors(saved, tmp_path, arch, weights, layer, message):
    _, good_arch, good_weights = saved
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    ls = tmp_path / "ls"
    ls.mkdir()
    (ls / "open_clip_config.json").write_text(json.dumps({"embed_dim": 32, "text_cfg": {**TEXT_CFG, "ls_init_value": 0.1}}))
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "open_clip_config.json").write_text(json.dumps({"embed_dim": 32, "text_cfg": {**TEXT_CFG, "width": 128}}))
    save_file({"visual.proj": torch.zeros(2, 2)}, str(tmp_path / "vision_only.safetensors"))
    fill = dict(tmp=tmp_path, w=good_weights, arch=good_arch, ls=f"local-dir:{ls}", wide=f"local-dir:{wide}")
    with pytest.raises(UsageError) as err:
        load_open_clip_text_encoder(arch.format(**fill), weights.format(**fill), layer)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_training_with_an_open_clip_tower_saves_a_diffusers_pipeline(tmp_path):
    """train_ldm --text_encoder_open_clip local-dir:... --text_encoder_layer penultimate: the saved
    text encoder is the converted tower (frozen), 2 of 3 layers, and the folder loads in diffusers."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from test_training import launch

    model, arch, weights = small_open_clip(tmp_path / "oc", quick_gelu=False)
    out = tmp_path / "run"
    launch(["--output_dir", str(out), "--text_encoder_open_clip", arch, "--text_encoder_weights", str(weights),
            "--text_encoder_layer", "penultimate", "--max_train_steps", "2", "--train_batch_size", "4",
            "--builtin_num_images", "8", "--checkpointing_steps", "0", "--num_validation_images", "0",
            "--eval_images_per_case", "0", "--lr_warmup_steps", "0", "--report_to", "none"])
    expected, _ = load_open_clip_text_encoder(arch, weights, "penultimate")
    saved = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert saved.keys() == expected.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in expected.state_dict().items())
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.text_encoder.config.num_hidden_layers == 2 and pipe.unet.config.cross_attention_dim == 64
    assert pipe.tokenizer("a red circle", padding="max_length", max_length=77).input_ids[5] == 0  # "!" pads
    ids = open_clip.tokenize(["a red circle"])
    with torch.no_grad():
        _, penultimate, _ = open_clip_reference(model, ids)
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, penultimate, rtol=0, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--text_encoder_open_clip", "ViT-H-14"], "--text_encoder_open_clip ARCH and --text_encoder_weights FILE go together"),
    (["--text_encoder_weights", "x.safetensors"], "go together"),
    (["--text_encoder_layer", "first"], "--text_encoder_layer must be last or penultimate, got 'first'"),
])
def test_training_flags_are_checked_at_startup(argv, message):
    from ldm.config import resolve_train_config

    with pytest.raises(UsageError, match=message):
        resolve_train_config(argv)
