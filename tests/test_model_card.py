"""ldm/model_card.py: the card's metadata parses and files the model under diffusers, and the text
names the base model, every non-default setting, the data, the metrics and the sample grid; its
loading example runs."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import yaml

from ldm.config import TrainConfig, default_config
from ldm.model_card import (caption_stats, format_duration, model_card, non_default_settings,
                            write_model_card)

DEFAULTS = default_config(TrainConfig()).to_dict()  # the tiny preset's, as a run's card has them


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, flags=re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def finetune_card(**kw) -> str:
    config = replace(TrainConfig(), pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
                     learning_rate=1e-4, max_train_steps=500, train_batch_size=8, mixed_precision="bf16",
                     output_dir="outputs/sd15-finetuned").to_dict()
    return model_card(config, defaults=DEFAULTS, grid="validation/step_000500.png",
                      run_info={"global_step": 500, "num_processes": 2, "wall_time_s": 710.4,
                                "steps_per_second": 0.704, "final_loss": 0.1234},
                      data_stats={"source": "data/my_images", "size": 1200,
                                  "captions": caption_stats(["a red circle", "a big blue square on the left"])},
                      metrics={"final_loss": 0.1234, "val_loss": 0.1301,
                               "held_out": {"color": 0.95, "shape": 0.875, "position": 0.8, "all": 0.7,
                                            "images": 80, "cases": [{"prompt": "x"}]}},
                      license="creativeml-openrail-m", **kw)


def test_small_helpers_known_answers():
    assert caption_stats(["a red circle", "", "one two three four five"]) == {
        "count": 3, "mean_words": pytest.approx(8 / 3), "max_words": 5}
    assert caption_stats([]) == {"count": 0, "mean_words": 0.0, "max_words": 0}
    assert [format_duration(s) for s in (42.4, 710, 3725)] == ["42 s", "11 min 50 s", "1 h 02 min"]
    assert non_default_settings({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5}) == {"b": (2, 5), "c": (3, None)}


def test_card_metadata_parses_and_names_the_base_and_the_licence():
    meta = front_matter(finetune_card())
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["license"] == "creativeml-openrail-m"
    assert {"text-to-image", "diffusers", "latent-diffusion"} <= set(meta["tags"]) and "lora" not in meta["tags"]


def test_card_lists_the_non_default_settings_and_only_those():
    card = finetune_card()
    section = card.split("## Settings that differ from the defaults")[1]
    for setting, value, default in (("learning_rate", "0.0001", "0.001"), ("max_train_steps", "500", "3600"),
                                    ("mixed_precision", "bf16", "auto"), ("train_batch_size", "8", "32")):
        assert f"| `{setting}` | `{value}` | `{default}` |" in section, setting
    assert "`seed`" not in section and "`lr_scheduler`" not in section  # defaults stay out


def test_card_embeds_the_grid_and_reports_data_run_and_metrics():
    card = finetune_card()
    assert "![samples](validation/step_000500.png)" in card
    assert "*a red circle on the left*" in card  # the grid's rows
    assert "fine-tuned from `stable-diffusion-v1-5/stable-diffusion-v1-5`" in card
    assert "| source | data/my_images |" in card and "| images | 1200 |" in card
    assert "| captions | 2, 5 words on average, at most 7 |" in card
    assert "8 per process x 1 accumulation x 2 processes = 16" in card and "mixed bf16" in card
    assert "| wall time | 11 min 50 s |" in card and "| optimizer steps | 500 |" in card
    assert "| final training loss | 0.1234 |" in card and "| processes | 2 |" in card
    assert "| validation loss | 0.1301 |" in card and "| held-out adherence: all | 70.0% |" in card
    assert "| held-out images | 80 |" in card and "cases" not in card  # per-case detail stays in eval.json
    blocks = python_blocks(card)
    assert 'TextToImagePipeline.from_pretrained("outputs/sd15-finetuned")' in blocks[0]
    assert 'StableDiffusionPipeline.from_pretrained("outputs/sd15-finetuned", safety_checker=None)' in blocks[1]
    for code in blocks:
        compile(code, "card", "exec")


def test_lora_card_loads_adapters_onto_the_base_and_keeps_a_local_base_out_of_the_metadata(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "ldm").mkdir(parents=True)  # the local base the run loaded
    config = replace(TrainConfig(), pretrained_model_name_or_path="outputs/ldm", lora_rank=4,
                     output_dir="outputs/ldm-lora").to_dict()
    card = model_card(config, defaults=DEFAULTS)
    meta = front_matter(card)
    assert "lora" in meta["tags"] and "base_model" not in meta and "license" not in meta
    assert "LoRA adapters for `outputs/ldm`" in card and "| LoRA | rank 4, alpha 4 |" in card
    assert "## Samples" not in card  # no grid given
    blocks = python_blocks(card)
    assert 'from_pretrained("outputs/ldm")' in blocks[0] and 'load_lora_weights("outputs/ldm-lora")' in blocks[0]
    assert 'load_lora_weights("outputs/ldm-lora")' in blocks[1]


def test_write_model_card_and_its_loading_example_runs(tiny_pipeline_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "validation").mkdir(parents=True)
    grid = out / "validation" / "step_000003.png"
    config = replace(TrainConfig(), output_dir=str(tiny_pipeline_dir)).to_dict()
    path = write_model_card(out, config, defaults=DEFAULTS, grid=str(grid), run_info={"global_step": 3})
    card = path.read_text()
    assert path == out / "README.md" and "![samples](validation/step_000003.png)" in card
    assert "A latent text-to-image diffusion model trained from scratch" in card
    code = python_blocks(card)[0].replace("generator=", "num_inference_steps=2, generator=")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code, scope)  # the card's own example: our pipeline from the folder, one image
    assert scope["image"].size == (32, 32)
