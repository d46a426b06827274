"""Where a `--pretrained_*` value points, checked in well under a second before anything loads.

A value is a local folder (diffusers layout), a local single file, or a hub id. Mistakes are
`UsageError`s naming the value: a missing path says "no such folder"; a folder without the
expected sub-folders names them; a hub id that is neither cached nor reachable says whether the
hub could not be reached (no network, `HF_HUB_OFFLINE`) or has no such model. diffusers' own
loaders would otherwise retry for half a minute and end in a message about `config.json`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ldm.errors import UsageError

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # `ldm.models.load_single_file`
HUB_TIMEOUT_S = 5.0
# huggingface_hub's repo-id rule: `name` or `namespace/name`, letters, digits, - _ . only
_REPO_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


def looks_like_hub_id(value: str) -> bool:
    return bool(_REPO_ID.match(value)) and not value.startswith((".", "-")) and ".." not in value


def check_pipeline_source(value: str, flag: str = "--pretrained_model_name_or_path") -> str:
    """"folder", "file" (a single-file checkpoint) or "hub" for a full model, else UsageError."""
    path = Path(value).expanduser()
    if path.is_file():
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return "file"
        raise UsageError(f"{flag} {value}: a file, but not a single-file checkpoint "
                         f"({', '.join(SINGLE_FILE_SUFFIXES)}) nor a diffusers folder")
    if path.is_dir():
        missing = [part for part in PIPELINE_PARTS if not (path / part).is_dir()]
        if missing == ["unet"] and (path / "transformer").is_dir():  # a DiT pipeline (--preset tiny-dit)
            missing = []
        if missing:
            raise UsageError(f"{flag} {value}: no {', '.join(p + '/' for p in missing)} in this folder "
                             f"(a diffusers pipeline folder has {', '.join(p + '/' for p in PIPELINE_PARTS)})")
        return "folder"
    _check_hub(value, flag, "model_index.json")
    return "hub"


def check_vae_source(value: str, flag: str = "--pretrained_vae_name_or_path") -> str:
    """"folder" (a VAE folder, or a pipeline folder with vae/) or "hub", else UsageError."""
    path = Path(value).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "vae" / "config.json").is_file():
            return "folder"
        raise UsageError(f"{flag} {value}: neither a VAE folder (config.json) nor a pipeline folder with "
                         f"vae/config.json")
    if path.exists():
        raise UsageError(f"{flag} {value}: a file; give a diffusers VAE folder (or a pipeline folder with vae/)")
    _check_hub(value, flag, "config.json", "vae/config.json")
    return "hub"


def local_config(value: str, *names: str) -> dict | None:
    """The first of `names` (e.g. "unet/config.json") read from a local folder, else None."""
    import json

    for name in names:
        file = Path(value).expanduser() / name
        if file.is_file():
            try:
                return json.loads(file.read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"{file}: not readable JSON ({e})") from None
    return None


def _check_hub(value: str, flag: str, *files: str) -> None:
    """Passes for a hub id that is cached or that the hub knows; UsageError otherwise."""
    if not looks_like_hub_id(value):
        raise UsageError(f"{flag} {value}: no such folder")
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    if any(isinstance(huggingface_hub.try_to_load_from_cache(value, f), str) for f in files):
        return
    here = f"{flag} {value}: no such folder or file here"
    if constants.HF_HUB_OFFLINE:
        raise UsageError(f"{here}, and not in the hub cache (HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.model_info(value, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise UsageError(f"{here}, and no model {value!r} on the hub (or it is private: huggingface-cli login)") \
            from None
    except Exception as e:  # noqa: BLE001 - DNS, connection, timeout, proxy: each means unreachable
        raise UsageError(f"{here}, and the hub is unreachable to look it up as a model id "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
