"""Exports for other tools: the original Stable Diffusion single-file layout, and kohya's LoRA layout.

A1111, ComfyUI and kohya's scripts load Stable Diffusion as one file in the CompVis key layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`) and LoRA
adapters as `lora_unet_*` / `lora_te_*` modules with `.lora_down` / `.lora_up` / `.alpha`.
Both mappings here are the inverses of what diffusers applies when it reads those layouts
(`diffusers.loaders.single_file_utils.convert_ldm_*_checkpoint` and
`diffusers.loaders.lora_conversion_utils._convert_non_diffusers_lora_to_diffusers`), written from
the model's config so that any number of levels and layers maps, not only SD 1.5's four.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ldm.errors import UsageError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# diffusers ResnetBlock2D parameter names -> the original ResBlock's (U-Net) / ResnetBlock's (VAE)
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# the VAE's mid-block attention: diffusers Attention -> the original AttnBlock (1x1 convolutions)
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# module prefix -> (original prefix, renames of the parameter names below it)
ModuleMap = dict[str, tuple[str, dict[str, str]]]


# ---------------------------------------------------------------------- module maps from configs
def _layers(config) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise UsageError(f"layers_per_block {layers!r} differs between blocks: the original layout needs one number")
    return layers


def unet_module_map(config) -> ModuleMap:
    """diffusers `UNet2DConditionModel` modules -> the original U-Net's, for `config` (its dict).

    The original numbers its blocks in one sequence per side: down level i holds `layers`
    resnets (+ attentions) and then its downsampler, so it takes `layers + 1` input_blocks after
    the first (conv_in); up level i holds `layers + 1` resnets, the last one followed by the
    upsampler (after the attention when the level has one)."""
    layers, levels = _layers(config), len(config["block_out_channels"])
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    m: ModuleMap = {"conv_in": ("input_blocks.0.0", {}),
                    "time_embedding.linear_1": ("time_embed.0", {}), "time_embedding.linear_2": ("time_embed.2", {}),
                    "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {}),
                    "mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
                    "mid_block.attentions.0": ("middle_block.1", {}),
                    "mid_block.resnets.1": ("middle_block.2", UNET_RESNET)}
    for i in range(levels):
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", UNET_RESNET)
            if down_attn[i]:
                m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", {})
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * (layers + 1)}.0.op", {})
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", UNET_RESNET)
            if up_attn[i]:
                m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", {})
        if i < levels - 1:
            k = i * (layers + 1) + layers
            m[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{k}.{2 if up_attn[i] else 1}.conv", {})
    return m


def vae_module_map(config) -> ModuleMap:
    """diffusers `AutoencoderKL` modules -> the original first stage's, for `config`. The decoder's
    up levels are numbered from the bottom in the original (up.0 is the last to run)."""
    layers, levels = _layers(config), len(config["block_out_channels"])
    m: ModuleMap = {name: (name, {}) for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in",
                                                 "decoder.conv_out", "quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        m[f"{side}.conv_norm_out"] = (f"{side}.norm_out", {})
        m[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", VAE_ATTENTION)
        for j in range(2):
            m[f"{side}.mid_block.resnets.{j}"] = (f"{side}.mid.block_{j + 1}", VAE_RESNET)
    for i in range(levels):
        for j in range(layers):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        for j in range(layers + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{levels - 1 - i}.block.{j}", VAE_RESNET)
        if i < levels - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{levels - 1 - i}.upsample.conv", {})
    return m


def rename(state_dict: dict[str, torch.Tensor], modules: ModuleMap) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename every key whose module is in `modules` (the longest matching prefix); return the
    renamed tensors and the keys no module matched."""
    out, unmapped = {}, []
    for key, value in state_dict.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in modules:
                new_prefix, renames = modules[prefix]
                rest = ".".join(parts[n:])
                for old, new in renames.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                out[f"{new_prefix}.{rest}"] = value
                break
        else:
            unmapped.append(key)
    return out, unmapped


# ---------------------------------------------------------------------- components -> original keys
def unet_to_original(state_dict: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, unmapped = rename(state_dict, unet_module_map(config))
    return {UNET_PREFIX + k: v for k, v in out.items()}, unmapped


def vae_to_original(state_dict: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, unmapped = rename(state_dict, vae_module_map(config))
    for key, value in out.items():  # the original's attention projections are 1x1 convolutions
        if ".mid.attn_1." in key and key.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")):
            out[key] = value[:, :, None, None]
    return {VAE_PREFIX + k: v for k, v in out.items()}, unmapped


def text_encoder_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' `CLIPTextModel` keeps its names under `cond_stage_model.transformer.text_model.`
    (newer transformers drop the `text_model.` level from the module; the file keeps it)."""
    return {TEXT_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state_dict.items()}


def pipeline_to_original(unet, vae, text_encoder) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One state dict in the original single-file layout from the three diffusers / transformers
    modules, and the U-Net / VAE weights that layout has no name for (the tiny preset's text-time
    embedding, `add_embedding.*` of `addition_embed_type="text"`): those are kept under their
    component's prefix with their diffusers names, which the usual loaders skip."""
    unet_sd, unet_left = unet_to_original(unet.state_dict(), unet.config)
    vae_sd, vae_left = vae_to_original(vae.state_dict(), vae.config)
    unet_sd.update({UNET_PREFIX + k: unet.state_dict()[k] for k in unet_left})
    vae_sd.update({VAE_PREFIX + k: vae.state_dict()[k] for k in vae_left})
    sd = {**unet_sd, **vae_sd, **text_encoder_to_original(text_encoder.state_dict())}
    return {k: v.contiguous() for k, v in sd.items()}, [f"unet.{k}" for k in unet_left] + [f"vae.{k}" for k in vae_left]


def load_single_file_pipeline(path: str | Path, config: str | Path, **kwargs):
    """diffusers' `StableDiffusionPipeline.from_single_file(path, config=config)`, offline, plus the
    weights the original layout has no name for (written by `pipeline_to_original` under their
    diffusers names), so an exported tiny-preset model loads back whole."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    # low_cpu_mem_usage=False: modules the converter does not fill keep their initial values
    # (on the meta device they could not run) until the extras below replace them
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False,
                                                    low_cpu_mem_usage=False, **kwargs)
    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
        for module, prefix in ((pipe.unet, UNET_PREFIX), (pipe.vae, VAE_PREFIX)):
            own = module.state_dict()
            extras = {k[len(prefix):]: fh.get_tensor(k) for k in keys
                      if k.startswith(prefix) and k[len(prefix):] in own}
            if extras:
                module.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in extras.items()}})
    return pipe


# ---------------------------------------------------------------------- LoRA: diffusers / peft -> kohya
# The down / up names diffusers and peft have written: peft (lora_A / lora_B), diffusers'
# LoRA layers (lora.down / lora.up, lora_linear_layer.down / .up), old attention processors
# (processor.to_q_lora.down ...).
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?:lora_(?P<ab>[AB])|lora(?:_linear_layer)?\.(?P<du>down|up))\.weight$")
_PROCESSOR_KEY = re.compile(r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def _lora_module(key: str) -> tuple[str, str] | None:
    """(module path, "down" | "up") of one diffusers / peft LoRA weight, None for anything else."""
    m = _PROCESSOR_KEY.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['module']}.{proj}", m["du"]
    m = _LORA_KEY.match(key)
    if m:
        return m["module"], m["du"] or ("down" if m["ab"] == "A" else "up")
    return None


def kohya_name(component: str, module: str) -> str:
    """`lora_unet_down_blocks_1_attentions_0_..._to_q` / `lora_te_text_model_encoder_layers_0_self_attn_q_proj`:
    the module's diffusers / transformers path with dots as underscores (kohya trains SD 1.x on
    the diffusers U-Net and transformers' CLIP, so the names are theirs)."""
    if component == "text_encoder" and not module.startswith("text_model."):
        module = "text_model." + module
    return KOHYA_PREFIXES[component] + module.replace(".", "_")


def lora_to_kohya(state_dict: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A diffusers / peft LoRA state dict (`unet.*` / `text_encoder.*` keys) in kohya's layout.

    Each module gets `.lora_down.weight` (A, (r, in)), `.lora_up.weight` (B, (out, r)) and `.alpha`
    (the update is B A * alpha / r): `alpha` as trained, else the file's own `*.alpha`, else r
    (scale 1, what diffusers assumes for a file without alphas)."""
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas = {k[: -len(".alpha")]: v for k, v in state_dict.items() if k.endswith(".alpha")}
    for key, value in state_dict.items():
        if key.endswith(".alpha"):
            continue
        component, _, rest = key.partition(".")
        found = _lora_module(rest) if component in KOHYA_PREFIXES else None
        if found is None:
            raise UsageError(f"LoRA key {key!r} is not a U-Net or text-encoder adapter weight this export knows "
                             f"(expected unet.* / text_encoder.* ... lora_A / lora_B / lora.down / lora.up)")
        module, direction = found
        name = kohya_name(component, module)
        out[f"{name}.lora_{direction}.weight"] = value.contiguous()
        if direction == "down":
            ranks[name] = value.shape[0]
            own = alphas.get(f"{component}.{module}")
            a = alpha if alpha is not None else (float(own) if own is not None else value.shape[0])
            out[f"{name}.alpha"] = torch.tensor(float(a))
    missing = [n for n in ranks if f"{n}.lora_up.weight" not in out]
    missing += [k.rsplit(".", 2)[0] for k in out if k.endswith("lora_up.weight")
                and k.rsplit(".", 2)[0] not in ranks]
    if missing:
        raise UsageError(f"LoRA module {missing[0]} has only one of its down / up weights")
    return out


# ---------------------------------------------------------------------- folders
def check_pipeline_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"--pipeline {path}: no such folder")
    if not (path / "model_index.json").is_file():
        if (path / "pytorch_lora_weights.safetensors").is_file():
            raise UsageError(f"--pipeline {path}: holds LoRA adapters only (pytorch_lora_weights.safetensors); "
                             f"export them with --lora {path} --lora_format kohya")
        raise UsageError(f"--pipeline {path}: not a pipeline folder (no model_index.json)")
    if (path / "transformer" / "config.json").is_file() and not (path / "unet").is_dir():
        raise UsageError(f"--pipeline {path}: its denoiser is a transformer (DiT, transformer/); the SD 1.x single-file "
                         f"layout holds a U-Net only. Load the folder itself (TextToImagePipeline.from_pretrained); "
                         f"docs/dit.md says what else reads it")
    for sub in ("unet", "vae", "text_encoder"):
        if not (path / sub / "config.json").is_file():
            raise UsageError(f"--pipeline {path}: no {sub}/config.json; the single-file layout needs a U-Net, "
                             f"a VAE and a CLIP text encoder")
    index = json.loads((path / "model_index.json").read_text())
    if index.get("text_encoder", [None, None])[1] != "CLIPTextModel":
        raise UsageError(f"--pipeline {path}: its text encoder is {index.get('text_encoder')}; the SD 1.x "
                         f"single-file layout holds a CLIPTextModel")
    return path


def load_pipeline_modules(path: str | Path):
    """The U-Net, VAE and text encoder of a diffusers-layout pipeline folder (weights only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = check_pipeline_folder(path)
    return (UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            AutoencoderKL.from_pretrained(path, subfolder="vae"),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder"))


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def read_lora_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapters of a LoRA run folder and its `lora_info.json` ({} when absent)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"--lora {path}: no such folder")
    weights = path / LORA_WEIGHT_NAME
    if not weights.is_file():
        hint = " (it is a full pipeline: export it with --pipeline)" if (path / "model_index.json").is_file() else ""
        raise UsageError(f"--lora {path}: no {LORA_WEIGHT_NAME}{hint}")
    info_path = path / "lora_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return load_file(str(weights)), info
