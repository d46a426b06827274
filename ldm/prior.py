"""Prior preservation (DreamBooth, Ruiz et al. 2023, eq. 2), as diffusers' train_dreambooth does it.

    --class_data_dir DIR --class_prompt "a photo of a dog" --num_class_images 200 --prior_loss_weight 1.0

1. Before training, DIR is filled up to `num_class_images` images by the base model (the model
   being fine-tuned, as it is before any step) prompted with the class prompt
   (`ensure_class_images`). The generated files are class_00000.png, class_00001.png, ...: the
   lowest numbers not there yet; image k comes from its own generator seeded from (seed, k), so it
   is the same whatever the batch, the number of processes or how often generation was
   interrupted; files already there (generated, or your own photos) are kept. `class_images.json`
   records what generated them: another prompt or base model in the same folder is refused.
2. Training pairs every instance example with a class example (`PriorPairs`: an epoch is
   max(instances, class images) pairs, the shorter list repeated) and concatenates each batch,
   instances first. Every class image is captioned with the class prompt. The loss is the
   instance loss plus `prior_loss_weight` times the class loss (`prior_preservation_loss`), each
   a mean over its own half of the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ldm.datacheck import folder_rows
from ldm.draws import to_device
from ldm.errors import UsageError

MANIFEST = "class_images.json"


def class_image_name(k: int) -> str:
    return f"class_{k:05d}.png"


def class_image_seed(seed: int, k: int) -> int:
    """The seed of generated class image k: a 63-bit hash of (seed, k)."""
    digest = hashlib.blake2b(f"{seed}/class_image/{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def count_images(folder: str | Path) -> int:
    """Images in `folder` (as training reads it: recursively, masks and hidden files left out)."""
    return len(folder_rows(folder, captions=False).rows) if Path(folder).is_dir() else 0


def missing_class_images(folder: str | Path, num_images: int) -> list[int]:
    """The k of the class images to generate so that `folder` holds `num_images`: the lowest k
    whose class_<k>.png is absent, as many as are missing."""
    folder = Path(folder)
    need = num_images - count_images(folder)
    missing, k = [], 0
    while len(missing) < need:
        if not (folder / class_image_name(k)).exists():
            missing.append(k)
        k += 1
    return missing


def check_manifest(folder: Path, recipe: dict[str, Any], record: bool = True) -> None:
    """Refuse a folder whose images were generated another way (prompt, seed, base model, ...);
    record the recipe when there is none yet and `record`."""
    path = folder / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in recipe if old.get(k) != recipe[k])
        if changed:
            raise UsageError(f"--class_data_dir {folder}: its class images were generated with another "
                             f"{', '.join(changed)} ({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); "
                             "give an empty folder, or the same settings")
    elif record:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recipe, indent=2) + "\n")


def ensure_class_images(folder: str | Path, pipe: Callable[..., Any], *, prompt: str, num_images: int, seed: int,
                        resolution: int, num_inference_steps: int, guidance_scale: float, batch_size: int,
                        base_model: str | None = None, rank: int = 0, world_size: int = 1,
                        wait_for_everyone: Callable[[], None] | None = None) -> int:
    """Generate the missing class images of `folder` with `pipe` (a diffusers-style text-to-image
    pipeline: `pipe(prompts, generator=[...], ...).images`), each written atomically (a stopped
    run leaves no half file). Process `rank` of `world_size` makes every world_size-th missing
    image; all meet at `wait_for_everyone` after. Returns how many this process made."""
    folder = Path(folder)
    recipe = {"prompt": prompt, "seed": seed, "resolution": resolution, "num_inference_steps": num_inference_steps,
              "guidance_scale": guidance_scale, "base_model": base_model}
    missing = missing_class_images(folder, num_images)
    if rank == 0:
        check_manifest(folder, recipe, record=bool(missing))
    if world_size > 1 and wait_for_everyone is not None:
        wait_for_everyone()  # every process counted the folder before any writes to it
    mine = missing[rank::world_size]
    for start in range(0, len(mine), batch_size):
        ks = mine[start : start + batch_size]
        gens = [torch.Generator().manual_seed(class_image_seed(seed, k)) for k in ks]
        images = pipe([prompt] * len(ks), generator=gens, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, height=resolution, width=resolution).images
        for k, image in zip(ks, images, strict=True):
            tmp = folder / f".{class_image_name(k)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, folder / class_image_name(k))
    if world_size > 1 and wait_for_everyone is not None:
        wait_for_everyone()
    return len(mine)


def class_dataset(folder: str | Path, prompt: str, num_images: int, **check: Any):
    """The first `num_images` good images of `folder` (checked as training data is), each
    captioned with `prompt`: a `datasets.Dataset` as `ldm.data.checked_folder` makes."""
    from ldm.data import checked_folder

    ds = checked_folder(folder, caption=prompt, **check)
    return ds.select(range(min(num_images, len(ds))))


def with_class_data(instances, classes):
    """`instances` followed by the rows of `classes`, given `instances`' columns (a column only
    the instances have, such as a loss mask, is None for class rows; a list-of-captions text
    column makes each class caption a list of one)."""
    from datasets import Features, concatenate_datasets

    features = instances.features
    classes = classes.remove_columns([c for c in classes.column_names if c not in features])
    if features["text"] != classes.features["text"]:  # instances have several captions per row
        texts = [[t] for t in classes["text"]]
        classes = classes.remove_columns("text").add_column("text", texts, feature=features["text"])
    for name in features:
        if name not in classes.column_names:
            classes = classes.add_column(name, [None] * len(classes), feature=features[name])
    classes = classes.select_columns(list(features)).cast(Features(features))
    return concatenate_datasets([instances, classes])


class PriorPairs(torch.utils.data.Dataset):
    """Pairs of (instance example, class example) over a training view whose first `num_instance`
    items are the instances and the rest the class images: pair i holds instance i mod n_instance
    and class image i mod n_class. Their "index" (the key of their random draws, `ldm.draws`)
    becomes i and len(self) + i: unique within a step."""

    def __init__(self, view, num_instance: int):
        if not 0 < num_instance < len(view):
            raise ValueError(f"{num_instance} instances in a view of {len(view)} items: no class images")
        self.view, self.num_instance, self.num_class = view, num_instance, len(view) - num_instance

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.view, "set_epoch"):
            self.view.set_epoch(epoch)

    def __len__(self) -> int:
        return max(self.num_instance, self.num_class)

    def __getitem__(self, i: int) -> dict[str, Any]:
        instance = self.view[i % self.num_instance]
        cls = self.view[self.num_instance + i % self.num_class]
        return {"instance": {**instance, "index": i}, "class": {**cls, "index": len(self) + i}}


class PairCollate:
    """A batch of pairs -> `collate` of the instances followed by the class examples, with "prior":
    a list of bools, True for the class examples."""

    def __init__(self, collate: Callable[[list[dict]], dict]):
        self.collate = collate

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate([p["instance"] for p in pairs] + [p["class"] for p in pairs])
        return {**batch, "prior": [False] * len(pairs) + [True] * len(pairs)}


def prior_preservation_loss(loss: torch.Tensor, is_class: Sequence[bool] | None, weight: float) -> torch.Tensor:
    """(B,) per-sample losses -> mean(instance losses) + weight * mean(class losses) (diffusers'
    train_dreambooth); None: the plain mean. An empty half counts 0."""
    if is_class is None:
        return loss.mean()
    cls = to_device(torch.tensor(is_class, dtype=loss.dtype), loss.device)
    inst = 1 - cls
    return ((loss * inst).sum() / inst.sum().clamp_min(1)
            + weight * (loss * cls).sum() / cls.sum().clamp_min(1))
