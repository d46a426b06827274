"""Sampling on a CPU: our `TextToImagePipeline` against diffusers' `StableDiffusionPipeline` on the
same Stable Diffusion folder, scheduler (DDIM) and seed: latency of each and the largest pixel
difference between their images.

    python benchmarks/sampling_speed.py --workload tiny [--steps 50] [--repeats 5] [--threads 1]
    python benchmarks/sampling_speed.py --model PATH --resolution 512

`--workload` builds (once) the folder of `benchmarks/peer_speed.py`'s workload: `tiny` (the tiny
preset's architecture, 32 px) or `sd_half` (the SD VAE at half width, a 57M U-Net, 64 px).
Both pipelines share the modules loaded from the folder, guidance 7.5, batch 1, float32; the
calls alternate (ours, diffusers), (diffusers, ours), ... after one untimed call each; medians.
Prints both latencies and diffusers / ours (above 1: ours is faster); JSON to
benchmarks/results/sampling_speed_<name>.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import gpu_suite  # noqa: E402
import peer_speed  # noqa: E402


def load_components(folder: Path) -> SimpleNamespace:
    """The modules of a Stable Diffusion folder, loaded by diffusers' own pipeline class."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    return SimpleNamespace(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                           noise_scheduler=pipe.scheduler)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", choices=sorted(peer_speed.WORKLOADS), help="build peer_speed.py's folder")
    source.add_argument("--model", help="a Stable Diffusion folder (diffusers layout)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="pixels (default: the workload's; needed with --model)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per pipeline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work_dir", default="/tmp/peer_speed", help="where --workload's folder is built")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/sampling_speed_<name>.json)")
    args = parser.parse_args(argv)
    if args.model:
        folder, name = Path(args.model), Path(args.model).name
        if not (folder / "model_index.json").is_file():
            sys.exit(f"--model {args.model}: no model_index.json there (a diffusers Stable Diffusion folder)")
        if args.resolution is None:
            sys.exit("--model needs --resolution")
        resolution = args.resolution
    else:
        w = peer_speed.WORKLOADS[args.workload]
        folder, name, resolution = Path(args.work_dir) / w.name / "model", w.name, args.resolution or w.resolution
        if not (folder / "model_index.json").exists():
            print(f"building the model folder {folder}")
            peer_speed.build_model_folder(w, folder)
    torch.set_num_threads(args.threads)
    comps = load_components(folder)
    bench = gpu_suite.sampling_bench(comps, steps=args.steps, resolution=resolution, repeats=args.repeats,
                                     device=torch.device("cpu"), dtype=torch.float32)
    result = {"benchmark": "sampling_speed", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "commit": gpu_suite.git_commit(), "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "model": str(folder), "workload": args.workload,
              "command": " ".join(["python", "benchmarks/sampling_speed.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "versions": gpu_suite.versions(), **bench}
    print(f"{name}: ours {bench['ours_latency_s']:.2f} s, diffusers {bench['diffusers_latency_s']:.2f} s "
          f"(medians of {args.repeats}, {args.steps} DDIM steps, {resolution} px); diffusers / ours = "
          f"{bench['diffusers_over_ours']:.2f}x; largest pixel difference {bench['max_abs_pixel_diff']:.3g}")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"sampling_speed_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
