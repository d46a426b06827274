"""The output folder of a training run: one run per folder.

A new run (not resuming) in a folder that holds another run's files would mix the two: the
old run's checkpoints outrank the new one's in rotation and in `--resume_from_checkpoint latest`,
and its samples and reports stay beside the new ones. So such a start is refused, unless the
user resumes the run that is there or asks for the folder to be cleared.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ldm.errors import UsageError

# What a training run writes into its --output_dir (train_ldm and train_vae). Only these are
# looked at, and only these are removed by --overwrite_output_dir: other files are the user's.
RUN_FILES = ("checkpoints", "train_log.jsonl", "run_info.json", "train_config.yaml", "model_config.yaml",
             "model_index.json", "pytorch_lora_weights.safetensors", "lora_info.json", "samples", "eval",
             "logs", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "config.json",
             "diffusion_pytorch_model.safetensors", "vae_info.json", "train_vae_config.yaml", "reconstructions",
             "training_curves.png", "transformer", "posthoc_ema")


def run_files(output_dir: str | Path) -> list[Path]:
    """The files and folders of a previous run in `output_dir` (empty folders do not count)."""
    out = Path(output_dir)
    found = []
    for name in RUN_FILES:
        p = out / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(p)
    return found


def check_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool) -> list[Path]:
    """Check `output_dir` before anything is written to it; returns what `overwrite` will clear.

    Raises UsageError if it is a file, or if it holds another run's files and the run neither
    resumes (`--resume_from_checkpoint`) nor clears it (`--overwrite_output_dir`). Nothing is
    removed here: `clear_run_files` does that once every other check has passed.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out}: is a file, not a folder")
    if resuming and overwrite:
        raise UsageError("--overwrite_output_dir clears the folder that --resume_from_checkpoint would "
                         "resume from: pass one of them")
    found = run_files(out) if out.is_dir() else []
    if found and not (resuming or overwrite):
        steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
                       if p.name.split("-")[1].isdigit()) if (out / "checkpoints").is_dir() else []
        held = f"checkpoints up to step {steps[-1]}" if steps else ", ".join(p.name for p in found[:4])
        raise UsageError(f"--output_dir {out} holds another run ({held}): pass --resume_from_checkpoint "
                         "latest to continue it, --overwrite_output_dir to clear it, or another --output_dir")
    return found if overwrite else []


def clear_run_files(paths: list[Path]) -> None:
    """Remove a previous run's files (what `check_output_dir` returned for --overwrite_output_dir)."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
