"""OpenCLIP text towers as transformers' `CLIPTextModel`, so a pipeline that conditions on one stays
in diffusers layout (what Stable Diffusion 2.x did with OpenCLIP ViT-H/14).

open_clip's text tower is CLIP's: token + positional embedding, pre-LN residual blocks under a
causal mask, a final LayerNorm, the features of the end-of-text token (`argmax` of the token ids:
<|endoftext|> = 49407 is the largest id), then a projection. `CLIPTextModel` computes the same with
renamed weights; the fused attention input projection is split into q / k / v. The key mapping
is diffusers' `convert_open_clip_checkpoint` (`diffusers.loaders.single_file_utils`), written for
any depth here: diffusers' drops block 23 unconditionally (ViT-H's last, for SD 2) and names keys
`text_model.*`, which transformers 5's `CLIPTextModel` no longer has.

Differences handled:
- pooling: `CLIPTextModel` pools at the first `eos_token_id` (49407 in the config), open_clip at
  the largest id: the same position for every CLIP-BPE prompt (and still right after a textual
  inversion token, whose id is larger, is added).
- padding: open_clip pads with id 0 ("!"), not with <|endoftext|>; the padded positions are part
  of the cross-attention context, so the tokenizer here pads with "!" too (SD 2's tokenizer does).
- the projection: `CLIPTextModel` has none (Stable Diffusion reads the hidden states); the pooled
  output times open_clip's `text_projection` is open_clip's `encode_text`.
- `layer="penultimate"` (SD 2's `FrozenOpenCLIPEmbedder(layer="penultimate")`) keeps every block
  but the last, then the final LayerNorm: the saved text encoder has one layer fewer, exactly as
  stabilityai/stable-diffusion-2's (23 of ViT-H's 24), so any diffusers pipeline gives the
  penultimate states with no further setting. `clip_skip=1` at inference on a "last" conversion
  gives the same embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.errors import UsageError

LAYERS = ("last", "penultimate")
EOT = 49407
CLIP_VOCAB = 49408
# text_cfg options of open_clip whose computation CLIPTextModel has no equivalent for: name -> its plain value
UNSUPPORTED = {"hf_model_name": None, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
               "final_ln_after_pool": False, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
               "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "act_kwargs": None,
               "norm_kwargs": None, "hf_tokenizer_name": None}
# open_clip names (below `transformer.resblocks.{i}.`) -> CLIPTextModel names (below `encoder.layers.{i}.`)
BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
         "attn.out_proj": "self_attn.out_proj"}
# the prefixes a text tower's keys carry: CLIP, CustomTextCLIP, an SD 2 single file, DDP
PREFIXES = ("", "text.", "cond_stage_model.model.", "module.")


def open_clip_model_config(arch: str) -> dict:
    """open_clip's model config (embed_dim, text_cfg, quick_gelu, ...) for an architecture name
    (`open_clip.list_models()`, e.g. ViT-H-14) or `local-dir:FOLDER` (its open_clip_config.json)."""
    import open_clip

    if arch.startswith("local-dir:"):
        path = Path(arch[len("local-dir:"):]) / "open_clip_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--text_encoder_open_clip {arch}: cannot read {path} ({e})") from None
        config = config.get("model_cfg", config)
    elif ":" in arch:
        raise UsageError(f"--text_encoder_open_clip {arch}: give an open_clip architecture name or "
                         f"local-dir:FOLDER (nothing is downloaded)")
    else:
        config = open_clip.get_model_config(arch)
        if config is None:
            raise UsageError(f"--text_encoder_open_clip {arch}: not an open_clip architecture "
                             f"(open_clip.list_models(), e.g. ViT-H-14, ViT-bigG-14)")
    if "text_cfg" not in config:
        raise UsageError(f"--text_encoder_open_clip {arch}: its config has no text_cfg")
    return config


def text_encoder_config(model_cfg: dict, layer: str = "last", arch: str = "the architecture") -> CLIPTextConfig:
    """The `CLIPTextConfig` of an open_clip text tower (`layer="penultimate"`: one block fewer)."""
    if layer not in LAYERS:
        raise UsageError(f"--text_encoder_layer must be one of {', '.join(LAYERS)}, got {layer!r}")
    text = model_cfg["text_cfg"]
    for name, plain in UNSUPPORTED.items():
        if text.get(name, plain) != plain:
            raise UsageError(f"--text_encoder_open_clip {arch}: text_cfg {name}={text[name]!r} has no equivalent "
                             f"in transformers' CLIPTextModel")
    pool, eos = text.get("pool_type", "argmax"), text.get("eos_id", EOT)
    if text.get("vocab_size", CLIP_VOCAB) != CLIP_VOCAB or not (pool == "argmax" or (pool == "eos" and eos == EOT)):
        raise UsageError(f"--text_encoder_open_clip {arch}: a text tower for CLIP's BPE vocabulary (49408 tokens, "
                         f"pooled at <|endoftext|>) is needed, got vocab_size {text.get('vocab_size')}, "
                         f"pool_type {pool!r}")
    width, layers = text.get("width", 512), text.get("layers", 12)
    kept = layers - (layer == "penultimate")
    if kept < 1:
        raise UsageError(f"--text_encoder_layer penultimate: {arch}'s text tower has {layers} layer")
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=width, intermediate_size=int(width * text.get("mlp_ratio", 4.0)),
        num_hidden_layers=kept, num_attention_heads=text.get("heads", 8),
        max_position_embeddings=text.get("context_length", 77), projection_dim=model_cfg.get("embed_dim", width),
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", layer_norm_eps=1e-5,
        bos_token_id=EOT - 1, eos_token_id=EOT, pad_token_id=0)


def text_tower_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The text tower's tensors of an open_clip checkpoint, without their prefix; and the prefix."""
    for prefix in PREFIXES:
        if f"{prefix}token_embedding.weight" in state_dict and f"{prefix}ln_final.weight" in state_dict:
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix
    raise ValueError("no open_clip text tower in the checkpoint (no token_embedding.weight / ln_final.weight "
                     f"under any of the prefixes {PREFIXES})")


def convert_text_tower(state_dict: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """open_clip text-tower tensors (unprefixed) -> `CLIPTextModel` tensors, blocks 0..layers-1."""
    out = {"embeddings.token_embedding.weight": state_dict["token_embedding.weight"],
           "embeddings.position_embedding.weight": state_dict["positional_embedding"],
           "final_layer_norm.weight": state_dict["ln_final.weight"],
           "final_layer_norm.bias": state_dict["ln_final.bias"]}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for name, new in BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = state_dict[f"{src}{name}.{kind}"]
        # nn.MultiheadAttention's fused input projection: rows [q; k; v], each `width` rows
        for kind in ("weight", "bias"):
            q, k, v = state_dict[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
            for proj, value in (("q", q), ("k", k), ("v", v)):
                out[f"{dst}self_attn.{proj}_proj.{kind}"] = value.contiguous()
    return out


def open_clip_tokenizer(context_length: int = 77) -> CLIPTokenizer:
    """CLIP's BPE (shipped with open_clip) padded as open_clip pads: with id 0 ("!")."""
    from ldm.text import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(context_length)
    tokenizer.pad_token = "!"
    return tokenizer


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved by open_clip: .safetensors, or a torch file read with weights_only=True
    (a training checkpoint's "state_dict" entry is taken)."""
    from open_clip.factory import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--text_encoder_weights {path}: no such file")
    try:
        return load_state_dict(str(path), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the file is the user's to fix
        raise UsageError(f"--text_encoder_weights {path}: not a readable open_clip checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_open_clip_text_encoder(arch: str, weights: str | Path, layer: str = "last"
                                ) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """(text encoder, tokenizer) from an open_clip architecture and checkpoint, in float32."""
    model_cfg = open_clip_model_config(arch)
    config = text_encoder_config(model_cfg, layer, arch)
    try:
        tower, _ = text_tower_state_dict(read_checkpoint(weights))
        converted = convert_text_tower(tower, config.num_hidden_layers)
    except KeyError as e:
        raise UsageError(f"--text_encoder_weights {weights}: does not hold {arch}'s text tower (no tensor "
                         f"{e.args[0]}: another architecture?)") from None
    except ValueError as e:
        raise UsageError(f"--text_encoder_weights {weights}: {e}") from None
    model = CLIPTextModel(config)
    expected = model.state_dict()
    wrong = [k for k, v in converted.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise UsageError(f"--text_encoder_weights {weights}: {wrong[0]} has shape {tuple(converted[wrong[0]].shape)}, "
                         f"{arch} expects {tuple(expected[wrong[0]].shape)} (another architecture?)")
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    model.eval()
    return model, open_clip_tokenizer(config.max_position_embeddings)


# ---------------------------------------------------------------------- training wiring
def with_open_clip_text(model_cfg, arch: str | None, weights: str | None, layer: str = "last"):
    """(model_cfg with the tower's text shape, (text encoder, tokenizer)) for --text_encoder_open_clip
    ARCH --text_encoder_weights FILE; (model_cfg, None) without it. The denoiser built from the
    returned config attends to the tower's width."""
    from dataclasses import replace

    from ldm.presets import TextEncoderConfig

    if not arch:
        return model_cfg, None
    encoder, tokenizer = load_open_clip_text_encoder(arch, weights, layer)
    c = encoder.config
    text = TextEncoderConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                             num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                             max_length=c.max_position_embeddings, projection_dim=c.projection_dim,
                             vocab_size=c.vocab_size)
    return replace(model_cfg, text=text), (encoder, tokenizer)


def use_text_encoder(comps, open_clip_text: tuple[CLIPTextModel, CLIPTokenizer] | None) -> None:
    """Put the converted tower and its tokenizer in `comps` (a pretrained text encoder: frozen unless
    --train_text_encoder); a pretrained denoiser must attend to its width. None: nothing to do."""
    if open_clip_text is None:
        return
    encoder, tokenizer = open_clip_text
    config = comps.denoiser.config
    expected = config.get("cross_attention_dim") or config.get("caption_channels")
    if expected != encoder.config.hidden_size:
        raise UsageError(f"--text_encoder_open_clip: its text width {encoder.config.hidden_size} differs from the "
                         f"width {expected} the pretrained denoiser attends to")
    comps.text_encoder, comps.tokenizer, comps.text_encoder_pretrained = encoder, tokenizer, True
