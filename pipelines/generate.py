"""Generate images from a saved pipeline folder: PNGs with their settings, and a grid.

    python -m pipelines.generate --model outputs/ldm --prompt "a red circle" --prompt "a blue square" \\
        --num_images 4 --steps 30 --guidance 5.0 --seed 0 --sampler dpm++ --out samples/
    python -m pipelines.generate --model outputs/base --lora outputs/ldm-lora --prompt_file prompts.txt --out samples/

Image i of every prompt uses seed + i (one generator each), so an image does not change with the
number of prompts, --num_images or --batch_size. Each PNG is named `<prompt slug>-<seed>.png` and
carries its settings in PNG text chunks: `parameters` in AUTOMATIC1111's layout (which A1111's
"PNG Info" tab and ComfyUI read) plus one key per setting. `grid.png` has a row per prompt, labelled with it, and the settings in its title.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python pipelines/generate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only the standard library and ldm.errors at import: `--help` answers before torch and diffusers load.
from ldm.errors import UsageError, run_cli  # noqa: E402

SAMPLER_NAMES_HINT = "ddpm, ddim, dpm++, euler, euler_a, pndm, unipc"  # ldm.schedulers.SAMPLERS, checked at run time
GRID_NAME = "grid.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.generate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder (with model_index.json)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument("--prompt_file", default=None, help="text file with one prompt per line (blank lines skipped)")
    parser.add_argument("--negative_prompt", default="", help="negative prompt for every image")
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0 of each prompt; image i uses seed + i")
    parser.add_argument("--sampler", default="dpm++", help=f"one of {SAMPLER_NAMES_HINT}")
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's native size)")
    parser.add_argument("--lora", default=None,
                        help="LoRA folder (with pytorch_lora_weights.safetensors) or .safetensors file to apply")
    parser.add_argument("--batch_size", type=int, default=4, help="images per pipeline call (does not change the images)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights' dtype; auto: bfloat16 on a CUDA GPU that has it, float16 on older ones, "
                             "float32 on CPU (the VAE decodes in float32 where float16 would overflow)")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                        help="denoiser and VAE in channels_last (default: on for CUDA, off on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the denoiser's repeated blocks (regional: a short compile, "
                             "paid by the first batch)")
    parser.add_argument("--out", required=True, help="output folder (created; files of the same name are replaced)")
    return parser


# ---------------------------------------------------------------------------- pure helpers
def slugify(prompt: str, max_length: int = 60) -> str:
    """A file-name-safe slug: lower case, runs of other characters -> '-', at most max_length."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_length].rstrip("-")
    return slug or "prompt"


def unique_slugs(prompts: list[str]) -> list[str]:
    """One slug per prompt; a slug already taken by an earlier prompt gets -2, -3, ..."""
    slugs: list[str] = []
    for prompt in prompts:
        base, n, slug = slugify(prompt), 1, slugify(prompt)
        while slug in slugs:
            n += 1
            slug = f"{base}-{n}"
        slugs.append(slug)
    return slugs


def _a1111_quote(value: str) -> str:
    """As A1111's `generation_parameters_copypaste.quote`: a value holding , : or a newline is JSON-quoted."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


@dataclass(frozen=True)
class ImageSettings:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str
    width: int
    height: int
    model: str
    lora: str | None = None

    def parameters(self) -> str:
        """The `parameters` text chunk in A1111's layout: prompt, negative prompt line (when there is
        one), then `Key: value` pairs."""
        pairs = [("Steps", str(self.steps)), ("Sampler", self.sampler), ("CFG scale", str(self.guidance)),
                 ("Seed", str(self.seed)), ("Size", f"{self.width}x{self.height}"), ("Model", self.model)]
        if self.lora:
            pairs.append(("Lora", self.lora))
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_a1111_quote(v)}" for k, v in pairs))
        return "\n".join(lines)

    def text_chunks(self) -> dict[str, str]:
        return {"parameters": self.parameters(), "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "seed": str(self.seed), "steps": str(self.steps), "guidance": str(self.guidance),
                "sampler": self.sampler, "size": f"{self.width}x{self.height}", "model": self.model,
                "lora": self.lora or ""}


def save_png(image, path: Path, chunks: dict[str, str]) -> Path:
    """Write a PIL image as PNG with `chunks` as iTXt text (UTF-8, so any prompt survives)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_itxt(key, value)
    image.save(path, pnginfo=info)
    return path


# ---------------------------------------------------------------------------- checks of the flags
def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UsageError(f"--prompt_file {args.prompt_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompt_file {args.prompt_file}: not readable ({e})") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError("no prompt: give --prompt \"...\" (repeatable) or --prompt_file FILE")
    return prompts


def check_model_folder(model: str) -> Path:
    folder = Path(model)
    if not folder.is_dir():
        raise UsageError(f"--model {model}: no such folder")
    if not (folder / "model_index.json").is_file():
        hint = ""
        if (folder / "pytorch_lora_weights.safetensors").is_file():
            hint = f"; it holds a LoRA: pass the base model as --model and --lora {model}"
        raise UsageError(f"--model {model} is not a pipeline folder: no model_index.json in it "
                         f"(save one with pipe.save_pretrained or training/train_ldm.py){hint}")
    return folder


def check_lora(lora: str) -> Path:
    from ldm.lora import WEIGHT_NAME

    path = Path(lora)
    if not path.exists():
        raise UsageError(f"--lora {lora}: no such file or folder")
    if path.is_dir() and not (path / WEIGHT_NAME).is_file():
        raise UsageError(f"--lora {lora}: no {WEIGHT_NAME} in this folder")
    if path.is_file() and path.suffix != ".safetensors":
        raise UsageError(f"--lora {lora}: not a .safetensors file")
    return path


def check_counts(args: argparse.Namespace) -> None:
    for flag in ("num_images", "steps", "batch_size"):
        value = getattr(args, flag)
        if value < 1:
            raise UsageError(f"--{flag} must be a positive integer, got {value}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be a positive number of pixels, got {value}")


def check_sampler(name: str) -> None:
    from ldm.schedulers import SAMPLERS

    if name not in SAMPLERS:
        raise UsageError(f"--sampler {name!r}: unknown; choose one of {', '.join(sorted(SAMPLERS))}")


def sampling_dtype(name: str, device_type: str, bf16_supported: bool) -> str:
    """--dtype as a torch dtype name; auto: bfloat16 on a CUDA GPU that supports it, float16 on
    other CUDA GPUs, float32 elsewhere (half precision is slow or unsupported on CPUs)."""
    if name != "auto":
        return name
    if device_type != "cuda":
        return "float32"
    return "bfloat16" if bf16_supported else "float16"


def native_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width): the flags, or the model's native size (U-Net sample_size x VAE scale factor);
    both must be multiples of the VAE's downsampling factor."""
    f = pipe.vae_scale_factor
    default = pipe.denoiser.config.sample_size * f
    height, width = height or default, width or default
    for flag, value in (("height", height), ("width", width)):
        if value % f:
            raise UsageError(f"--{flag} {value}: must be a multiple of {f} (the VAE's downsampling factor)")
    return height, width


# ---------------------------------------------------------------------------- the command
def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    prompts = read_prompts(args)
    check_counts(args)
    model = check_model_folder(args.model)
    lora = check_lora(args.lora) if args.lora else None
    check_sampler(args.sampler)

    import torch
    from tqdm.auto import tqdm

    from ldm.images import labelled_grid
    from pipelines import TextToImagePipeline

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    dtype = sampling_dtype(args.dtype, device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
    pipe = TextToImagePipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype)).to(device)
    pipe.set_sampler(args.sampler)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.enable_gpu_settings(channels_last=args.channels_last, compile=args.compile)  # after the LoRA: compiled with it
    pipe.set_progress_bar_config(disable=True)  # one bar over the images instead of one per call
    height, width = native_size(pipe, args.height, args.width)

    slugs = unique_slugs(prompts)
    jobs = [(p, i) for p in range(len(prompts)) for i in range(args.num_images)]  # (prompt index, image index)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[tuple[int, int], object] = {}
    paths: list[Path] = []
    with tqdm(total=len(jobs), unit="image", desc="generating") as bar:
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start:start + args.batch_size]
            # CPU generators: the same seed gives the same image on any device.
            generators = [torch.Generator().manual_seed(args.seed + i) for _, i in chunk]
            try:
                result = pipe([prompts[p] for p, _ in chunk], negative_prompt=args.negative_prompt or None,
                              num_inference_steps=args.steps, guidance_scale=args.guidance,
                              height=height, width=width, generator=generators)
            except ValueError as e:  # the pipeline's own argument checks
                raise UsageError(str(e)) from None
            for (p, i), image in zip(chunk, result.images):
                settings = ImageSettings(prompt=prompts[p], negative_prompt=args.negative_prompt,
                                         seed=args.seed + i, steps=args.steps, guidance=args.guidance,
                                         sampler=args.sampler, width=width, height=height, model=args.model,
                                         lora=args.lora)
                paths.append(save_png(image, out / f"{slugs[p]}-{args.seed + i}.png", settings.text_chunks()))
                images[p, i] = image
            bar.update(len(chunk))

    # a row per prompt, labelled with it; the settings in the title
    title = (f"{Path(args.model).name} | {args.sampler}, {args.steps} steps, CFG {args.guidance} | "
             f"seeds {args.seed}-{args.seed + args.num_images - 1}")
    grid = labelled_grid([images[job] for job in jobs], rows=len(prompts), cols=args.num_images,
                         row_labels=prompts, title=title)
    # The grid's chunks: the settings of its first image, plus every row's prompt and the seeds of the columns.
    grid_chunks = {**ImageSettings(prompt=prompts[0], negative_prompt=args.negative_prompt, seed=args.seed,
                                   steps=args.steps, guidance=args.guidance, sampler=args.sampler, width=width,
                                   height=height, model=args.model, lora=args.lora).text_chunks(),
                   "prompts": json.dumps(prompts, ensure_ascii=False),
                   "seeds": json.dumps([args.seed + i for i in range(args.num_images)])}
    paths.append(save_png(grid, out / GRID_NAME, grid_chunks))
    print(f"wrote {len(jobs)} images and {GRID_NAME} ({len(prompts)} rows x {args.num_images}) to {out}")
    return paths


if __name__ == "__main__":
    run_cli(main)
