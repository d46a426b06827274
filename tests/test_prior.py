"""Prior preservation (ldm/prior.py): class-image generation, pairing, the loss; one tiny run."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ldm.config import resolve_train_config
from ldm.errors import UsageError
from ldm.prior import (MANIFEST, PairCollate, PriorPairs, class_image_name, ensure_class_images,
                       missing_class_images, prior_preservation_loss, with_class_data)


class FakePipe:
    """A text-to-image pipeline whose image depends only on its generator (as the real one's
    does with one generator per image); counts the images it makes."""

    def __init__(self):
        self.made = 0

    def __call__(self, prompts, generator, num_inference_steps, guidance_scale, height, width):
        self.made += len(prompts)
        pixels = [(torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy() for g in generator]
        return SimpleNamespace(images=[Image.fromarray(p) for p in pixels])


SETTINGS = dict(prompt="a photo of a dog", seed=3, resolution=8, num_inference_steps=2, guidance_scale=4.0)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_only_missing_images_are_generated_and_each_is_a_function_of_seed_and_index(tmp_path):
    folder = tmp_path / "class"
    pipe = FakePipe()
    assert ensure_class_images(folder, pipe, num_images=5, batch_size=2, **SETTINGS) == 5
    first = files(folder)
    assert list(first) == [class_image_name(k) for k in range(5)] and pipe.made == 5
    assert json.loads((folder / MANIFEST).read_text())["prompt"] == "a photo of a dog"
    # an interrupted generation: two images missing; a photo of the user's own is kept and counted
    (folder / class_image_name(1)).unlink()
    (folder / class_image_name(3)).unlink()
    Image.new("RGB", (8, 8)).save(folder / "my_dog.png")
    assert missing_class_images(folder, 5) == [1]
    assert missing_class_images(folder, 6) == [1, 3]
    pipe = FakePipe()
    assert ensure_class_images(folder, pipe, num_images=6, batch_size=4, **SETTINGS) == 2 and pipe.made == 2
    again = files(folder)
    assert {k: again[k] for k in first} == first  # the same bytes, whatever the batch
    assert ensure_class_images(folder, FakePipe(), num_images=6, batch_size=4, **SETTINGS) == 0


def test_processes_share_the_work_and_make_the_same_images(tmp_path):
    ensure_class_images(tmp_path / "one", FakePipe(), num_images=5, batch_size=8, **SETTINGS)
    barrier, made = threading.Barrier(2), {}

    def process(rank: int) -> None:  # two processes as threads, meeting at a barrier
        made[rank] = ensure_class_images(tmp_path / "two", FakePipe(), num_images=5, batch_size=8, rank=rank,
                                         world_size=2, wait_for_everyone=barrier.wait, **SETTINGS)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == {0: 3, 1: 2}  # k = 0, 2, 4 and k = 1, 3
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_another_prompt_in_a_folder_of_generated_images_is_refused(tmp_path):
    ensure_class_images(tmp_path, FakePipe(), num_images=2, batch_size=2, **SETTINGS)
    with pytest.raises(UsageError, match="generated with another prompt"):
        ensure_class_images(tmp_path, FakePipe(), num_images=2, batch_size=2, **{**SETTINGS, "prompt": "a cat"})


def test_prior_loss_against_known_answers():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # instances [1, 2] (mean 1.5), class [3, 4] (mean 3.5): 1.5 + 0.5 * 3.5
    assert prior_preservation_loss(loss, [False, False, True, True], 0.5).item() == 3.25
    assert prior_preservation_loss(loss, [False, False, True, True], 0.0).item() == 1.5
    assert prior_preservation_loss(loss, None, 1.0).item() == 2.5  # no class images: the plain mean
    assert prior_preservation_loss(loss, [False] * 4, 1.0).item() == 2.5  # an empty half counts 0


def test_pairs_concatenate_instances_then_class_examples_with_unique_indices():
    view = [{"x": torch.tensor([i]), "text": f"t{i}", "index": i} for i in range(5)]  # 2 instances, 3 class images
    pairs = PriorPairs(view, num_instance=2)
    assert len(pairs) == 3
    collate = PairCollate(lambda items: {"x": torch.cat([e["x"] for e in items]), "text": [e["text"] for e in items],
                                         "index": [e["index"] for e in items]})
    batch = collate([pairs[i] for i in range(3)])
    assert batch["x"].tolist() == [0, 1, 0, 2, 3, 4]  # instance i mod 2, then class image i mod 3
    assert batch["index"] == [0, 1, 2, 3, 4, 5] and batch["prior"] == [False] * 3 + [True] * 3
    with pytest.raises(ValueError):
        PriorPairs(view, num_instance=5)


def test_class_rows_get_the_instance_columns():
    from datasets import Dataset, Features, List, Value

    instances = Dataset.from_dict({"text": [["a", "b"]], "mask": ["m.png"], "w": [1]},
                                  features=Features({"text": List(Value("string")), "mask": Value("string"),
                                                     "w": Value("int32")}))
    classes = Dataset.from_dict({"text": ["a dog", "a dog"], "w": [2, 3], "extra": [0, 0]})
    both = with_class_data(instances, classes)
    assert both["text"] == [["a", "b"], ["a dog"], ["a dog"]]
    assert both["mask"] == ["m.png", None, None] and both["w"] == [1, 2, 3]
    assert both.column_names == ["text", "mask", "w"]


@pytest.mark.parametrize("flags, message", [
    (["--class_data_dir", "{tmp}/c"], "--class_data_dir needs --class_prompt"),
    (["--class_prompt", "a dog"], "--class_prompt is for prior preservation: give --class_data_dir too"),
    (["--class_data_dir", "{tmp}/c", "--class_prompt", "a dog"], "--class_data_dir {tmp}/c holds 0 of "
     "--num_class_images 100 images; generating the rest needs the base model: give --pretrained_model_name_or_path"),
    (["--class_data_dir", "{tmp}/c", "--class_prompt", "a dog", "--prior_loss_weight", "-1"],
     "--prior_loss_weight must be >= 0"),
    (["--class_data_dir", "{tmp}/c", "--class_prompt", "a dog", "--aspect_buckets"], "drop --aspect_buckets"),
])
def test_prior_flag_mistakes_are_one_line_errors(flags, message, tmp_path):
    flags = [f.format(tmp=tmp_path) for f in flags]
    with pytest.raises(UsageError, match=re.escape(message.format(tmp=tmp_path))):
        resolve_train_config(["--output_dir", str(tmp_path / "o"), *flags])


@pytest.mark.slow
def test_dreambooth_run_with_masks_and_shuffled_tags_resumes_exactly(tmp_path, tiny_pipeline_dir):
    """From a pretrained folder (frozen text encoder, so the text cache would be on): class images
    generated first, then trained with the instances (a folder with loss masks and tag captions,
    shuffled and dropped per step, with a trigger prefix). A run resumed from its step-2
    checkpoint ends with the same weights; the second run generates nothing."""
    from tests.test_masks import masked_folder
    from tests.test_training import FAST, assert_same, launch, weights

    data = masked_folder(tmp_path / "data", n=4)
    for i in range(4):
        (data / f"{i:04d}.txt").write_text("red, blue, halves, square, flat")
    common = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(data), *FAST,
              "--train_batch_size", "2", "--class_data_dir", str(tmp_path / "class"), "--class_prompt", "a shape",
              "--num_class_images", "3", "--shuffle_tags", "--tag_dropout", "0.3", "--keep_tokens", "1",
              "--caption_prefix", "sks style, ", "--num_validation_images", "0"]
    a = launch([*common, "--output_dir", str(tmp_path / "a")])
    assert "prior preservation: 3 class images generated" in a.stderr
    assert sorted(p.name for p in (tmp_path / "class").glob("*.png")) == [class_image_name(k) for k in range(3)]
    assert "kept images with a loss mask" in a.stderr
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert len([r for r in log if "loss" in r]) == 4
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-2", tmp_path / "c" / "checkpoints" / "checkpoint-2")
    c = launch([*common, "--output_dir", str(tmp_path / "c"), "--resume_from_checkpoint", "latest"])
    assert "prior preservation: 0 class images generated" in c.stderr
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "c"))
