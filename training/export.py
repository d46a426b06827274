"""Export a run for other tools: one Stable Diffusion single file, or LoRA adapters in kohya's layout.

    python training/export.py --pipeline outputs/ldm --single_file outputs/ldm.safetensors
    python training/export.py --lora outputs/ldm-lora --lora_format kohya --out outputs/ldm-lora-kohya.safetensors

The single file has the original layout A1111 and ComfyUI load (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`); diffusers reads it back with
`StableDiffusionPipeline.from_single_file(file, config=<the pipeline folder>)`. The kohya file has
`lora_unet_*` / `lora_te_*` modules with `.lora_down.weight`, `.lora_up.weight` and `.alpha`, which
kohya's scripts, A1111, ComfyUI and diffusers' `load_lora_weights` read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.errors import UsageError, run_cli
from ldm.export import load_pipeline_modules, lora_to_kohya, pipeline_to_original, read_lora_folder


def _output(path: str, flag: str) -> Path:
    out = Path(path)
    if out.suffix != ".safetensors":
        raise UsageError(f"{flag} {path}: the export is written as safetensors only; name it *.safetensors")
    if out.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def export_single_file(pipeline: str, single_file: str, half: bool = False) -> Path:
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    out = _output(single_file, "--single_file")
    unet, vae, text_encoder = load_pipeline_modules(pipeline)
    state_dict, unmapped = pipeline_to_original(unet, vae, text_encoder)
    if half:
        state_dict = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    save_file(state_dict, str(out), metadata={"format": "pt"})
    print(f"wrote {out} ({len(state_dict)} tensors, {out.stat().st_size / 2**20:.1f} MiB)")
    if unmapped:
        modules = sorted({".".join(k.split(".")[:2]) for k in unmapped})
        print(f"warning: {len(unmapped)} weights ({', '.join(modules)}) have no name in the original SD layout "
              f"(the tiny preset's text-time embedding); they are kept under their diffusers names, which "
              f"A1111 and ComfyUI skip: those tools would run the model without them. "
              f"ldm.export.load_single_file_pipeline loads the file whole.", file=sys.stderr)
    prediction = DDPMScheduler.load_config(pipeline, subfolder="scheduler").get("prediction_type", "epsilon")
    if prediction != "epsilon":
        print(f"note: the model predicts {prediction}; tell the loading tool so (A1111: a v-prediction .yaml "
              f"beside the file; ComfyUI: ModelSamplingDiscrete set to v_prediction).", file=sys.stderr)
    return out


def export_kohya_lora(lora: str, out: str | None) -> Path:
    from safetensors.torch import save_file

    state_dict, info = read_lora_folder(lora)
    path = _output(out or str(Path(lora) / "lora_kohya.safetensors"), "--out")
    converted = lora_to_kohya(state_dict, alpha=info.get("alpha"))
    metadata = {"format": "pt", "ss_network_module": "networks.lora"}
    if info.get("rank"):
        metadata["ss_network_dim"] = str(info["rank"])
    if info.get("alpha"):
        metadata["ss_network_alpha"] = str(info["alpha"])
    if info.get("base_model"):
        metadata["ss_sd_model_name"] = str(info["base_model"])
    save_file(converted, str(path), metadata=metadata)
    modules = sum(k.endswith(".alpha") for k in converted)
    print(f"wrote {path} ({modules} LoRA modules, kohya layout)")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="pipeline folder (diffusers layout) to export")
    parser.add_argument("--single_file", default=None, help="write the pipeline here (original SD layout)")
    parser.add_argument("--half", action="store_true", help="store the single file in float16 (half the size)")
    parser.add_argument("--lora", default=None, help="LoRA run folder (pytorch_lora_weights.safetensors) to export")
    parser.add_argument("--lora_format", default="kohya", choices=["kohya"], help="key layout of the LoRA file")
    parser.add_argument("--out", default=None,
                        help="where the LoRA file goes (default: <lora>/lora_kohya.safetensors)")
    args = parser.parse_args(argv)

    if bool(args.pipeline) == bool(args.lora):
        raise UsageError("give either --pipeline DIR --single_file OUT.safetensors, or --lora DIR --lora_format kohya")
    if args.pipeline:
        if not args.single_file:
            raise UsageError("--pipeline needs --single_file OUT.safetensors (where to write it)")
        return export_single_file(args.pipeline, args.single_file, half=args.half)
    if args.single_file:
        raise UsageError("--single_file exports a --pipeline; for a LoRA give --out")
    return export_kohya_lora(args.lora, args.out)


if __name__ == "__main__":
    run_cli(main)
