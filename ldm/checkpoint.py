"""Resumable training checkpoints: atomic folders, rotation, EMA state as safetensors.

A checkpoint is written as `checkpoint-<step>.tmp`, fsynced, completed with a `COMPLETE` marker
(written last: the size and SHA-256 of every file, and the run's fingerprint), then renamed to
`checkpoint-<step>`. Resume only considers complete folders and checks each file against the
marker: a truncated or missing file makes it fall back to the previous checkpoint with a warning
naming the file. Old checkpoints are deleted only after the new one is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from ldm.errors import UsageError

logger = logging.getLogger(__name__)

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def verify(path: Path) -> str | None:
    """None if every file the marker lists is there with its size and hash; else what is wrong,
    naming the file."""
    try:
        marker = read_marker(path)
    except (OSError, ValueError) as err:
        return f"{path / MARKER}: unreadable completion marker ({err})"
    for rel, meta in marker.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != meta["size"]:
            return f"{f}: {f.stat().st_size} bytes, {meta['size']} when saved (truncated?)"
        if _sha256(f) != meta["sha256"]:
            return f"{f}: contents changed since it was saved (hash mismatch)"
    return None


def resolve_resume(output_dir: str | Path, resume: str | None) -> tuple[int, Path] | None:
    """`latest` -> the newest complete checkpoint whose files check out, warning about (and
    skipping) damaged newer ones; None if there never was one. A path -> that one, or an error.

    Raises if checkpoints exist but every one is damaged: starting again from scratch would
    silently throw the run away.
    """
    if not resume:
        return None
    if resume == "latest":
        root = Path(output_dir) / "checkpoints"
        complete = complete_checkpoints(output_dir)
        problems = []
        for step, path in reversed(complete):
            problem = verify(path)
            if problem is None:
                if problems:
                    logger.warning("resuming from %s instead: %s", path.name, "; ".join(problems))
                return step, path
            problems.append(f"{path.name} is damaged ({problem})")
        if problems:
            raise RuntimeError("no usable checkpoint under " + str(root) + ": " + "; ".join(problems))
        return None
    path = Path(resume)
    m = _NAME.match(path.name)
    if not m or not (path / MARKER).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume!r} is not a complete checkpoint "
                                f"folder (checkpoint-<step> with a {MARKER} marker)")
    problem = verify(path)
    if problem:
        raise RuntimeError(f"--resume_from_checkpoint {resume!r} is damaged: {problem}")
    return int(m.group(1)), path


def temp_dir(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(final: Path, step: int, fingerprint: dict | None = None) -> None:
    """Main process only: fsync the temp folder's files, write the marker last (file sizes and
    hashes, the run fingerprint), fsync it, and rename the folder into place."""
    tmp = temp_dir(final)
    files = {}
    for f in sorted(tmp.rglob("*")):
        if f.is_file() and f.name != MARKER:
            _fsync(f)
            files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    marker = {"step": step, "files": files, "fingerprint": fingerprint or {}}
    with open(tmp / MARKER, "w") as fh:
        fh.write(json.dumps(marker, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


def data_fingerprint(dataset) -> str:
    """Identity of a captioned data set that survives moving it (another mount point, copied
    files with new mtimes): its size, a hash of every caption in order and, for checked user data,
    of every image's content hash."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    for caption in dataset["text"]:
        digest.update(json.dumps(caption).encode())
    what = "captions"
    if "image_hash" in dataset.column_names:
        digest.update("".join(dataset["image_hash"]).encode())
        what = "images + captions"
    if "mask_hash" in dataset.column_names:  # loss masks weigh the loss: another mask is another run
        digest.update(json.dumps(list(dataset["mask_hash"])).encode())
        what += " + masks"
    return f"{len(dataset)} examples, {what} {digest.hexdigest()[:16]}"


def model_fingerprint(model_cfg: Any, *parts: Any) -> str:
    """A short hash of the architecture (a ModelConfig) and anything else that defines the model."""
    text = json.dumps([dataclasses.asdict(model_cfg), *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_finite(groups: dict[str, Any]) -> None:
    """Refuse to write a checkpoint holding NaN or Inf: name the first bad tensor.
    groups: name -> a module or a list of tensors."""
    for group, holder in groups.items():
        named = (holder.named_parameters() if isinstance(holder, torch.nn.Module)
                 else ((str(i), t) for i, t in enumerate(holder)))
        for name, tensor in named:
            if not torch.isfinite(tensor.detach()).all():
                raise RuntimeError(f"refusing to save a checkpoint: {group} {name} holds NaN or Inf")


def check_pickles(path: Path, process_index: int = 0) -> None:
    """Load every pickled file of a checkpoint (accelerate's optimizer, scheduler, sampler and
    RNG states) with `torch.load(weights_only=True)` before accelerate does. accelerate swallows a
    failure to load the RNG states and carries on with fresh ones; here any file that is not a
    plain tensor/state pickle (e.g. one that would run code) stops the resume, naming the file."""
    from accelerate.utils.other import load  # torch.load(weights_only=True) + numpy RNG globals

    rng = path / f"random_states_{process_index}.pkl"
    if not rng.is_file():
        raise RuntimeError(f"{rng}: missing (the RNG state of process {process_index}); the checkpoint "
                           "was written by another number of processes or is damaged")
    for f in sorted([*path.glob("*.bin"), *path.glob("*.pkl")]):
        try:
            load(f, map_location="cpu")
        except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...
            raise RuntimeError(f"{f}: refused to load it ({type(err).__name__}: {str(err).splitlines()[0]})") from err


# Changing these under a resumed run makes it another run: refused unless --allow_config_drift.
# Anything else in the fingerprint (step count, LR schedule) is reported with a warning, so that
# a run can be extended.
STRICT_KEYS = ("global_batch", "world_size", "gradient_accumulation_steps", "resolution", "seed", "model", "data",
               "lora", "optimizer", "prior")


def drift(saved: dict, current: dict) -> list[tuple[str, str]]:
    """(key, "key: old -> new") for everything that differs between a checkpoint's fingerprint
    and this run's."""
    keys = sorted(set(saved) | set(current))
    return [(k, f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}")
            for k in keys if saved.get(k) != current.get(k)]


def run_fingerprint(cfg: Any, model_cfg: Any, *, world_size: int, zero_terminal_snr: bool | None,
                    pretrained_vae: str | None, prediction_type: str, trained: list[str], data: str) -> dict:
    """What defines a training run (`cfg`: a TrainConfig, `model_cfg`: its ModelConfig), saved in
    every checkpoint's marker and compared on resume (`check_drift`). trained: the names of the
    trained modules ("unet", "text_encoder"); data: `data_fingerprint` of the data set."""
    train_te = "text_encoder" in trained
    frozen_token_embedding = train_te and not cfg.train_token_embedding
    # A local VAE folder is known by its weights, not its path: a moved or re-cloned checkout
    # resumes, a retrained VAE at the same path does not.
    pretrained_vae = weights_id(pretrained_vae)
    model_cfg = dataclasses.replace(model_cfg, pretrained_vae=weights_id(model_cfg.pretrained_vae))
    return {
        "global_batch": cfg.train_batch_size * world_size * cfg.gradient_accumulation_steps,
        "world_size": world_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "resolution": model_cfg.resolution, "max_train_steps": cfg.max_train_steps, "learning_rate": cfg.learning_rate,
        "lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps, "seed": cfg.seed,
        "objective": [cfg.snr_gamma, cfg.noise_offset, cfg.input_perturbation, zero_terminal_snr],
        "model": model_fingerprint(model_cfg, cfg.pretrained_model_name_or_path, pretrained_vae, prediction_type,
                                   train_te, *(["token embedding frozen"] if frozen_token_embedding else [])),
        "data": data, **({"lora": [cfg.lora_rank, cfg.lora_alpha]} if cfg.lora_rank else {}),
        **({"aspect_buckets": [cfg.aspect_buckets, cfg.bucket_no_upscale]} if cfg.aspect_buckets else {}),
        **({"train_dtype": cfg.train_dtype} if cfg.train_dtype != "float32" else {}),
        # another optimizer's state cannot be loaded (absent for adamw: older checkpoints resume)
        **({"optimizer": cfg.optimizer} if cfg.optimizer != "adamw" else {}),
        # not strict: a changed value is logged on resume and used from then on
        "text_encoder_lr": cfg.text_encoder_lr, "caption_dropout": cfg.caption_dropout,
        "timestep_bias": [cfg.timestep_bias_strategy, cfg.timestep_bias_multiplier, cfg.timestep_bias_portion,
                          cfg.timestep_bias_end_multiplier],
        **({"tags": [cfg.shuffle_tags, cfg.keep_tokens, cfg.tag_dropout]}
           if cfg.shuffle_tags or cfg.tag_dropout else {}),
        # class images join every batch: strict, like the data (absent without: older checkpoints resume)
        **({"prior": [cfg.class_prompt, cfg.num_class_images, cfg.prior_loss_weight]} if cfg.class_data_dir else {}),
    }


def weights_id(source: str | None) -> str | None:
    """A local diffusers model folder -> a hash of its weights file(s); anything else unchanged."""
    if not source or not Path(source).is_dir():
        return source
    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        return source
    return "weights " + hashlib.sha256("".join(_sha256(f) for f in files).encode()).hexdigest()[:16]


def check_drift(path: Path, fingerprint: dict, allow_config_drift: bool = False) -> list[str]:
    """Compare the fingerprint saved in checkpoint `path` with this run's: a change of a key in
    STRICT_KEYS raises (unless `allow_config_drift`), naming each change; returns the lines of
    every change (for a warning each)."""
    changed = drift(read_marker(path).get("fingerprint", {}), fingerprint)
    strict = [line for key, line in changed if key in STRICT_KEYS]
    if strict and not allow_config_drift:
        raise ValueError(f"refusing to resume from {path}: this run differs from the one that saved it\n  "
                         + "\n  ".join(strict) + "\n(pass --allow_config_drift to resume anyway)")
    return [line for _, line in changed]


def save(accelerator: Any, output_dir: str | Path, step: int, fingerprint: dict, modules: dict[str, Any],
         emas: dict[str, EMAModel], keep: int | None = None, extra: dict[str, Any] | None = None) -> None:
    """Every process: write checkpoint `step` of a run (accelerate's state of the prepared models,
    optimizer, LR schedule, samplers and RNGs; the EMAs as safetensors) into its temp folder,
    commit it (marker last, then rename) and rotate to the `keep` newest. Refuses NaN / Inf in
    `modules` or the EMAs before writing anything. `extra`: name -> an object whose `state_dict()`
    holds only tensors (e.g. ldm.posthoc_ema.PowerEMA), saved as `<name>.safetensors`."""
    final = checkpoint_dir(output_dir, step)
    tmp = temp_dir(final)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # a leftover from a run killed mid-save
    extra = extra or {}
    check_finite({**modules, **{f"ema_{n}": e.shadow_params for n, e in emas.items()},
                  **{n: list(x.state_dict().values()) for n, x in extra.items()}})
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            for name, ema in emas.items():
                save_ema(ema, tmp / f"ema_{name}.safetensors")
            for name, state in extra.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in state.state_dict().items()},
                          str(tmp / f"{name}.safetensors"))
            commit(final, step, fingerprint)
    except (OSError, RuntimeError) as err:
        explained = explain_failed_save(err, tmp, expected_size(modules, emas))
        if explained is err:
            raise
        raise explained from err
    if accelerator.is_main_process:
        removed = rotate(output_dir, keep, protect=final)
        logger.info("saved %s%s", final, f", removed {[p.name for p in removed]}" if removed else "")
    accelerator.wait_for_everyone()


def resume(accelerator: Any, output_dir: str | Path, resume_from: str | None, fingerprint: dict,
           emas: dict[str, EMAModel], *, allow_config_drift: bool = False, lr_scheduler: Any = None,
           learning_rates: list[float] | None = None, extra: dict[str, Any] | None = None) -> int | None:
    """Every process: `--resume_from_checkpoint` (`resolve_resume`) -> the step resumed from, with
    the state, EMAs and `extra` states (as `save` takes them) loaded; None for a fresh start. A
    checkpoint of another run is refused (`check_drift`); other changed settings are logged (main
    process). `learning_rates` (one per optimizer group) replace the restored ones, so a changed
    --learning_rate takes effect."""
    found = resolve_resume(output_dir, resume_from)
    main = accelerator.is_main_process
    if found is None:
        if resume_from and main:
            logger.info("no complete checkpoint under %s; starting from scratch", output_dir)
        return None
    step, path = found
    for line in check_drift(path, fingerprint, allow_config_drift):
        if main:
            logger.warning("resuming with a changed setting: %s", line)
    load(accelerator, path, emas, extra)
    if lr_scheduler is not None and learning_rates is not None:
        before = set_base_learning_rates(lr_scheduler, learning_rates)
        if before != list(learning_rates) and main:
            logger.warning("learning rates %s from the checkpoint replaced by %s (the schedule continues from "
                           "step %d)", before, list(learning_rates), step)
    if main:
        logger.info("resumed from %s (step %d)", path, step)
    return step


def set_base_learning_rates(lr_scheduler: Any, learning_rates: list[float]) -> list[float]:
    """Give a restored LambdaLR schedule (every diffusers `get_scheduler` one; accelerate's
    wrapper or bare) new base learning rates, one per optimizer group, and set each group's
    current rate for the step it is at. Returns the base rates it had."""
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)
    before = [float(b) for b in sched.base_lrs]
    if before == [float(x) for x in learning_rates]:
        return before
    if not hasattr(sched, "lr_lambdas") or len(learning_rates) != len(sched.optimizer.param_groups):
        raise UsageError(f"cannot change the learning rate of a resumed {type(sched).__name__} schedule "
                         f"({before} -> {list(learning_rates)}); resume with the old --learning_rate")
    sched.base_lrs = [float(x) for x in learning_rates]
    for group, base, lam in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * lam(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
    return before


def load(accelerator: Any, path: Path, emas: dict[str, EMAModel], extra: dict[str, Any] | None = None) -> None:
    """Every process: restore a checkpoint `save` wrote (pickles checked first, `check_pickles`)."""
    check_pickles(path, accelerator.process_index)
    for name in extra or {}:  # before anything is loaded
        if not (path / f"{name}.safetensors").is_file():
            raise UsageError(f"{path} has no {name}.safetensors: the run that saved it did not keep that state "
                             f"(started without --{name}?); resume with the flags it was started with")
    accelerator.load_state(str(path))
    for name, ema in emas.items():
        load_ema(ema, path / f"ema_{name}.safetensors")
    for name, state in (extra or {}).items():
        state.load_state_dict(load_file(str(path / f"{name}.safetensors")))


def rotate(output_dir: str | Path, keep: int | None, protect: Path | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`, never `protect` (the one just
    written, even if an older run left higher step numbers) nor the newest. Main process only."""
    if not keep or keep < 1:
        return []
    found = [p for _, p in complete_checkpoints(output_dir)]
    if protect is not None and protect in found:
        found.remove(protect)
        keep -= 1
    doomed = found[:-keep] if keep > 0 else found
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def clean_stale_temps(output_dir: str | Path) -> list[Path]:
    """Remove `checkpoint-<step>.tmp` folders a killed or failed save left behind (they may hold
    gigabytes). Main process only, before the run writes its first checkpoint."""
    root = Path(output_dir) / "checkpoints"
    stale = sorted(root.glob("checkpoint-*.tmp")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


class NoSpaceError(UsageError):
    """The disk filled up while a checkpoint was written: nothing the user did wrong, but theirs
    to fix, so it is reported as one line (exit 2) with the sizes, not as a traceback."""


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def _is_out_of_space(err: BaseException) -> bool:
    import errno

    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
    text = str(err)
    # torch's zip writer reports a full disk as a failed write at some position
    return any(s in text for s in ("No space left", "unexpected pos", "PytorchStreamWriter failed writing"))


def expected_size(modules: dict[str, Any], emas: dict[str, EMAModel]) -> int:
    """Bytes a checkpoint will take, roughly: the models' weights, Adam's two moments and the EMA
    of what is trained."""
    total = 0
    for m in modules.values():
        for p in m.parameters():
            total += p.numel() * p.element_size() * (3 if p.requires_grad else 1)
    for e in emas.values():
        total += sum(t.numel() * t.element_size() for t in e.shadow_params)
    return total


def explain_failed_save(err: BaseException, tmp: Path, needed: int) -> BaseException:
    """A failed write of checkpoint folder `tmp` (removed here): a full disk becomes a
    NoSpaceError naming the device and the sizes; anything else is returned unchanged."""
    shutil.rmtree(tmp, ignore_errors=True)
    if not _is_out_of_space(err):
        return err
    free = shutil.disk_usage(tmp.parent).free
    return NoSpaceError(f"no space left on the device of {tmp.parent} while writing {tmp.name.removesuffix('.tmp')} "
                        f"(needed ~{_mb(needed)}, {_mb(free)} free after removing the partial folder); free some "
                        "space or lower --checkpoints_total_limit, then resume with --resume_from_checkpoint latest")


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
