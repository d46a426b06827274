"""Whole-run wall time of our trainer against diffusers' example trainer, side by side.

    python benchmarks/peer_speed.py --peer PATH/train_text_to_image.py [--workload tiny|sd_half] [--pairs 3]
    python benchmarks/peer_speed.py --peer PATH/train_text_to_image.py --workload sd15 --pairs 2   # on a GPU

The peer is diffusers' `examples/text_to_image/train_text_to_image.py`; pass its path (it is not
copied into this repository). Both sides get the same Stable Diffusion folder (built here with
diffusers' and transformers' own classes, saved by `StableDiffusionPipeline.save_pretrained`),
the same captioned image folder (the HF imagefolder layout), batch, steps, resolution, center
crop without flips, learning rate and constant schedule, min-SNR 5, the workload's precision
(`--mixed_precision`: float32 on CPU, bf16 on a GPU), EMA (foreach on both), no validation
images, no checkpoints, tensorboard logging (the peer cannot switch it off), data loading in the
main process, the same torch thread count.

Workloads:
  tiny     the tiny preset's architecture (its f2 VAE, 4.15M U-Net), 500 images of 32 px,
           batch 16, 80 steps: start-up and per-step overheads dominate.
  sd_half  the SD VAE architecture at half width (block_out_channels (64, 128, 256, 256), f8),
           a 57M two-level U-Net at 64 px (8x8 latents), 64 images, batch 8, 64 steps: the VAE's
           encode costs about half the U-Net's training step, as in SD 1.5 at 512 px (1.12 vs
           2.41 TFLOP per image), which is what caching latents saves.
  sd15     for a GPU: the sd15 architecture (860M U-Net, CLIP ViT-L/14 text encoder, SD VAE) with
           random weights, 256 images of 512 px, batch 16, 60 steps, bf16 mixed precision on both
           sides (issue 21's ">= 1.5x the example on the same GPU").

Runs alternate (ours, peer), (peer, ours), ... so that a machine shared with other jobs slows
both sides alike; each side first runs once for 2 steps untimed (file caches, the data set's
Arrow cache). Prints each run, both medians and the ratio peer / ours (above 1: ours is
faster), and writes the JSON to benchmarks/results/peer_speed_<workload>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Workload:
    name: str
    num_images: int
    resolution: int
    batch: int
    steps: int
    mixed_precision: str = "no"
    gpu: bool = False


WORKLOADS = {
    "tiny": Workload("tiny", num_images=500, resolution=32, batch=16, steps=80),
    "sd_half": Workload("sd_half", num_images=64, resolution=64, batch=8, steps=64),
    "sd15": Workload("sd15", num_images=256, resolution=512, batch=16, steps=60, mixed_precision="bf16", gpu=True),
}
LEARNING_RATE = 1e-4
SNR_GAMMA = 5.0


# ----------------------------------------------------------------------------- pure helpers
def median_pair_ratio(ours: list[float], peer: list[float]) -> float:
    """Median over pairs of peer / ours (above 1: ours is faster)."""
    if len(ours) != len(peer) or not ours:
        raise ValueError(f"need equally many runs on both sides, got {len(ours)} and {len(peer)}")
    return statistics.median(p / o for o, p in zip(ours, peer))


def ratio_of_medians(ours: list[float], peer: list[float]) -> float:
    """median(peer) / median(ours)."""
    return statistics.median(peer) / statistics.median(ours)


def run_order(pairs: int) -> list[str]:
    """Alternating order: ours first in even pairs, the peer first in odd ones."""
    order: list[str] = []
    for i in range(pairs):
        order += ["ours", "peer"] if i % 2 == 0 else ["peer", "ours"]
    return order


def loop_seconds(log: str) -> float | None:
    """The training loop's elapsed time from the last steps bar that reached its total
    ("steps: 100%|...| 80/80 [00:52<00:00, ..."; ours says "steps", the peer "Steps"): seconds,
    whole; None when there is no finished bar. Other bars (writing shards, loading) are ignored."""
    found = None
    for done, total, elapsed in re.findall(r"[Ss]teps: .*?(\d+)/(\d+) \[((?:\d+:)?\d+:\d+)<", log):
        if done == total:
            parts = [int(x) for x in elapsed.split(":")]
            found = float(sum(v * 60 ** i for i, v in enumerate(reversed(parts))))
    return found


# ----------------------------------------------------------------------------- inputs
def build_model_folder(workload: Workload, path: Path) -> Path:
    """A Stable Diffusion folder (model_index.json, vae/, unet/, text_encoder/, tokenizer/,
    scheduler/) written by diffusers' StableDiffusionPipeline, random weights (seed 0)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ldm.models import build_components, load_vae
    from ldm.presets import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, model_preset

    if workload.name == "tiny":
        cfg = model_preset("tiny")
        comps = build_components(cfg, seed=0)
        comps.vae = load_vae(cfg.pretrained_vae)  # the preset's shipped f2 first stage
    elif workload.name == "sd15":
        comps = build_components(model_preset("sd15"), seed=0)
    else:
        cfg = ModelConfig(
            resolution=workload.resolution,
            unet=UNetConfig(block_out_channels=(192, 384), cross_attention=(True, True), layers_per_block=2,
                            attention_head_dim=8),
            vae=VAEConfig(block_out_channels=(64, 128, 256, 256)),  # SD's VAE at half width
            text=TextEncoderConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                   intermediate_size=2048, projection_dim=512),
        )
        comps = build_components(cfg, seed=0)
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=comps.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    del pipe, comps
    torch.set_grad_enabled(True)
    return path


def build_data_folder(workload: Workload, path: Path) -> Path:
    from ldm.synthetic import export_folder

    return export_folder(path, workload.num_images, workload.resolution, seed=0)


def our_command(model: Path, data: Path, out: Path, w: Workload, steps: int, threads: int) -> list[str]:
    return [sys.executable, str(REPO / "training" / "train_ldm.py"),
            "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--resolution", str(w.resolution), "--center_crop", "--no-random_flip",
            "--train_batch_size", str(w.batch), "--max_train_steps", str(steps),
            "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--snr_gamma", str(SNR_GAMMA), "--caption_dropout", "0", "--use_ema", "--mixed_precision", w.mixed_precision,
            "--dataloader_num_workers", "0", "--checkpointing_steps", "0", "--validation_steps", "0",
            "--num_validation_images", "0", "--eval_images_per_case", "0", "--report_to", "tensorboard",
            "--seed", "0", "--cpu_threads", str(threads), "--output_dir", str(out)]


def peer_command(peer: Path, model: Path, data: Path, out: Path, w: Workload, steps: int) -> list[str]:
    return [sys.executable, str(peer),
            "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--resolution", str(w.resolution), "--center_crop",  # no --random_flip
            "--train_batch_size", str(w.batch), "--max_train_steps", str(steps),
            "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--snr_gamma", str(SNR_GAMMA), "--use_ema", "--foreach_ema", "--mixed_precision", w.mixed_precision,
            "--dataloader_num_workers", "0", "--checkpointing_steps", str(10 * steps + 1000),
            "--report_to", "tensorboard", "--seed", "0", "--output_dir", str(out)]


def run_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), LDM_CPU_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float | None]:
    """(wall seconds of the whole process, loop seconds from its progress bar)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout)
    if proc.returncode:
        sys.exit(f"{cmd[1]} failed (exit {proc.returncode}); its output is in {log}")
    return wall, loop_seconds(proc.stdout.replace("\r", "\n"))


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "load_average_1min_at_start": load,
            "platform": platform.platform()}


def versions() -> dict:
    import accelerate
    import diffusers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--peer", required=True, help="path to diffusers' examples/text_to_image/train_text_to_image.py")
    parser.add_argument("--peer_revision", default=None, help="the diffusers commit the peer script is from (recorded)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the workload's)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads, both sides")
    parser.add_argument("--work_dir", default="/tmp/peer_speed")
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. 'machine shared with other jobs')")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/peer_speed_<workload>.json)")
    args = parser.parse_args(argv)
    peer = Path(args.peer).resolve()
    if not peer.is_file():
        sys.exit(f"--peer {args.peer}: no such file (diffusers' examples/text_to_image/train_text_to_image.py)")
    if args.pairs < 1:
        sys.exit(f"--pairs {args.pairs}: need at least 1")
    w = WORKLOADS[args.workload]
    if w.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--workload {w.name} needs a CUDA GPU (both sides train in bf16 there)")
    steps = args.steps or w.steps
    work = Path(args.work_dir) / w.name
    model, data = work / "model", work / "data"
    if not (model / "model_index.json").exists():
        print(f"building the model folder {model}")
        build_model_folder(w, model)
    if not (data / "metadata.jsonl").exists():
        print(f"writing {w.num_images} images to {data}")
        build_data_folder(w, data)
    env = run_env(args.threads)
    cmds = {"ours": lambda out, n: our_command(model, data, out, w, n, args.threads),
            "peer": lambda out, n: peer_command(peer, model, data, out, w, n)}
    for side in ("ours", "peer"):  # untimed: warms file caches and the data set's Arrow cache
        out = work / f"warmup_{side}"
        shutil.rmtree(out, ignore_errors=True)
        timed(cmds[side](out, 2), env, work / f"warmup_{side}.log")
        shutil.rmtree(out, ignore_errors=True)
    walls: dict[str, list[float]] = {"ours": [], "peer": []}
    loops: dict[str, list[float | None]] = {"ours": [], "peer": []}
    for i, side in enumerate(run_order(args.pairs)):
        out = work / f"run_{side}"
        shutil.rmtree(out, ignore_errors=True)
        wall, loop = timed(cmds[side](out, steps), env, work / f"run{i}_{side}.log")
        shutil.rmtree(out, ignore_errors=True)
        walls[side].append(wall)
        loops[side].append(loop)
        print(f"run {i + 1}/{2 * args.pairs} {side}: {wall:.1f} s (loop {loop} s)", flush=True)
    result = {
        "workload": asdict(w) | {"steps": steps},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(), "note": args.note, "threads": args.threads, "versions": versions(),
        "peer": str(peer), "peer_revision": args.peer_revision,
        "order": run_order(args.pairs),
        "ours_s": walls["ours"], "peer_s": walls["peer"],
        "ours_loop_s": loops["ours"], "peer_loop_s": loops["peer"],
        "ours_median_s": statistics.median(walls["ours"]), "peer_median_s": statistics.median(walls["peer"]),
        "ratio_of_medians": ratio_of_medians(walls["ours"], walls["peer"]),
        "median_pair_ratio": median_pair_ratio(walls["ours"], walls["peer"]),
        "commands": {"ours": " ".join(cmds["ours"](work / "run_ours", steps)),
                     "peer": " ".join(cmds["peer"](work / "run_peer", steps))},
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"peer_speed_{w.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{w.name}: ours {result['ours_median_s']:.1f} s, peer {result['peer_median_s']:.1f} s (medians of "
          f"{args.pairs}); peer / ours = {result['ratio_of_medians']:.2f}x (median of pair ratios "
          f"{result['median_pair_ratio']:.2f}x) -> {out}")


if __name__ == "__main__":
    main()
