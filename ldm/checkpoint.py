"""Resumable training checkpoints: atomic folders, rotation, EMA state as safetensors.

A checkpoint is written as `checkpoint-<step>.tmp`, completed with a `COMPLETE` marker, then
renamed to `checkpoint-<step>`; only complete folders are ever resumed from, and old ones are
deleted only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"checkpoint-{step}"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and (p / MARKER).exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume: str | None) -> tuple[int, Path] | None:
    """`latest` -> newest complete checkpoint (None if there is none); a path -> that one."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    m = _NAME.match(path.name)
    if not m or not (path / MARKER).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume!r} is not a complete checkpoint "
                                f"folder (checkpoint-<step> with a {MARKER} marker)")
    return int(m.group(1)), path


def temp_dir(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def commit(final: Path, step: int) -> None:
    """Main process only: mark the temp folder complete, fsync, and rename it into place."""
    tmp = temp_dir(final)
    (tmp / MARKER).write_text(json.dumps({"step": step}) + "\n")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rotate(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep` (never the newest). Main process only."""
    if not keep or keep < 1:
        return []
    found = complete_checkpoints(output_dir)
    doomed = [p for _, p in found[:-keep]]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def save_ema(ema: EMAModel, path: str | Path) -> None:
    """EMA shadow weights as safetensors, its counters as metadata (no pickle)."""
    state = ema.state_dict()
    tensors = {f"shadow.{i}": t.detach().contiguous().cpu() for i, t in enumerate(state["shadow_params"])}
    meta = {k: json.dumps(v) for k, v in state.items() if k != "shadow_params"}
    save_file(tensors, str(path), metadata=meta)


def load_ema(ema: EMAModel, path: str | Path) -> None:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    shadow = [tensors[f"shadow.{i}"] for i in range(len(tensors))]
    if len(shadow) != len(ema.shadow_params):
        raise ValueError(f"{path}: {len(shadow)} EMA tensors, the model has {len(ema.shadow_params)}")
    device = ema.shadow_params[0].device
    ema.load_state_dict({**meta, "shadow_params": [t.to(device) for t in shadow]})
