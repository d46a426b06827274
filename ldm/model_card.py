"""A Hugging Face model card (`README.md` with YAML metadata) for a run's output folder.

`model_card(...)` is a pure function of what the run knows (its resolved config, run info, data
statistics, metrics, the last sample grid); `write_model_card(output_dir, ...)` writes it.
The metadata block follows the Hub's model-card spec (`library_name`, `pipeline_tag`, `tags`,
`base_model`, `license`), so the Hub files the folder as a diffusers text-to-image model.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


# ---------------------------------------------------------------------- small pure helpers
def caption_stats(captions: list[str]) -> dict[str, float]:
    """Count, mean and max words of the captions (empty captions count as 0 words)."""
    words = [len(c.split()) for c in captions]
    return {"count": len(words), "mean_words": sum(words) / len(words) if words else 0.0,
            "max_words": max(words, default=0)}


def non_default_settings(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{setting: (value, default)} for every setting of `config` that differs from `defaults`
    (a setting `defaults` lacks counts as changed, with default None)."""
    return {k: (v, defaults.get(k)) for k, v in config.items() if k not in defaults or defaults[k] != v}


def format_duration(seconds: float) -> str:
    """3725 -> '1 h 02 min', 710 -> '11 min 50 s', 42.4 -> '42 s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) if v else "[]"
    if v is None:
        return "—"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _code(value: Any) -> str:
    return f"`{_value(value)}`"


# ---------------------------------------------------------------------- sections
RUN_LABELS = {"global_step": "steps", "num_processes": "processes", "final_loss": "final loss",
              "skipped_updates": "skipped updates (non-finite)", "prediction_type": "prediction type",
              "steps_per_second": "steps per second", "images_per_second": "images per second",
              "torch": "torch"}


def _run_rows(run_info: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, value in run_info.items():
        if isinstance(value, dict) or key in ("global_step", "final_loss"):  # under Training / Metrics
            continue
        label = RUN_LABELS.get(key, key.replace("_", " "))
        if ("time" in key and key.endswith(("_s", "_seconds"))) and isinstance(value, (int, float)):
            rows.append((label.removesuffix(" s").removesuffix(" seconds"), format_duration(value)))
        else:
            rows.append((label, _value(value)))
    return rows


def _training_rows(config: dict[str, Any], run_info: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if config.get("preset") and not config.get("pretrained_model_name_or_path"):
        rows.append(("architecture preset", _code(config["preset"])))
    steps = run_info.get("global_step", config.get("max_train_steps"))
    if steps is not None:
        rows.append(("optimizer steps", _value(steps)))
    batch = config.get("train_batch_size")
    if batch is not None:
        accumulation = config.get("gradient_accumulation_steps", 1) or 1
        processes = run_info.get("num_processes", 1) or 1
        rows.append(("batch", f"{batch} per process x {accumulation} accumulation x {processes} processes "
                              f"= {batch * accumulation * processes}"))
    precision = config.get("mixed_precision")
    rows.append(("precision", f"mixed {precision}" if precision not in (None, "no")
                 else _value(config.get("train_dtype", "float32"))))
    for key, label in (("learning_rate", "learning rate"), ("lr_scheduler", "schedule"),
                       ("resolution", "resolution"), ("seed", "seed")):
        if config.get(key) is not None:
            rows.append((label, _value(config[key])))
    if config.get("lora_rank"):
        rows.append(("LoRA", f"rank {config['lora_rank']}, alpha {_value(config.get('lora_alpha') or config['lora_rank'])}"))
    return rows


def _data_lines(data: dict[str, Any]) -> list[str]:
    rows = []
    if "source" in data:
        rows.append(("source", _value(data["source"])))
    if "size" in data:
        rows.append(("images", _value(data["size"])))
    captions = data.get("captions") or {}
    if captions:
        rows.append(("captions", f"{_value(captions.get('count'))}, {_value(captions.get('mean_words'))} words "
                                 f"on average, at most {_value(captions.get('max_words'))}"))
    rows += [(k.replace("_", " "), _value(v)) for k, v in data.items() if k not in ("source", "size", "captions")]
    return _table(rows, ("data", "")) if rows else []


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    rows = []
    for key, label in (("final_loss", "final training loss"), ("val_loss", "validation loss")):
        if metrics.get(key) is not None:
            rows.append((label, _value(metrics[key])))
    held_out = metrics.get("held_out") or {}
    for key, value in held_out.items():  # an eval.json report: its numbers (per attribute and "all")
        if isinstance(value, float) and 0.0 <= value <= 1.0:
            rows.append((f"held-out adherence: {key}", f"{value:.1%}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((f"held-out {key}", _value(value)))
    rows += [(k.replace("_", " "), _value(v)) for k, v in metrics.items()
             if k not in ("final_loss", "val_loss", "held_out") and not isinstance(v, dict)]
    return _table(rows, ("metric", "value")) if rows else []


def _usage(model_path: str, base_model: str | None, lora: bool, prompt: str) -> list[str]:
    if lora:
        base = base_model or "<the base pipeline>"
        return ["```python", "import torch", "from pipelines import TextToImagePipeline", "",
                f'pipe = TextToImagePipeline.from_pretrained("{base}")',
                f'pipe.load_lora_weights("{model_path}")',
                f'image = pipe("{prompt}", generator=torch.Generator().manual_seed(0)).images[0]', "```", "",
                "With diffusers alone:", "", "```python", "from diffusers import StableDiffusionPipeline", "",
                f'pipe = StableDiffusionPipeline.from_pretrained("{base}", safety_checker=None)',
                f'pipe.load_lora_weights("{model_path}")',
                f'image = pipe("{prompt}").images[0]', "```"]
    return ["```python", "import torch", "from pipelines import TextToImagePipeline", "",
            f'pipe = TextToImagePipeline.from_pretrained("{model_path}")',
            f'image = pipe("{prompt}", generator=torch.Generator().manual_seed(0)).images[0]', "```", "",
            "The folder is a Stable Diffusion folder, so diffusers loads it as it is:", "",
            "```python", "from diffusers import StableDiffusionPipeline", "",
            f'pipe = StableDiffusionPipeline.from_pretrained("{model_path}", safety_checker=None)',
            f'image = pipe("{prompt}").images[0]', "```"]


# ---------------------------------------------------------------------- the card
def model_card(config: dict[str, Any], *, run_info: dict[str, Any] | None = None,
               data_stats: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
               grid: str | None = None, defaults: dict[str, Any] | None = None,
               base_model: str | None = None, license: str | None = None,
               model_path: str | None = None, title: str | None = None) -> str:
    """The README.md text of a run's output folder.

    config: the resolved training config (`TrainConfig.to_dict()`); run_info: run_info.json
    (global_step, num_processes, wall_time_s, ...); data_stats: {"source", "size", "captions":
    caption_stats(...)}; metrics: {"final_loss", "val_loss", "held_out": eval.json's report};
    grid: the last sample grid's path relative to the folder; defaults: the config's defaults
    (`ldm.config.default_config(cfg).to_dict()`), for the non-default settings; base_model:
    default the config's pretrained_model_name_or_path; model_path: the path the loading examples
    use (default the config's output_dir)."""
    run_info, data_stats, metrics = run_info or {}, data_stats or {}, dict(metrics or {})
    if metrics.get("final_loss") is None and run_info.get("final_loss") is not None:
        metrics["final_loss"] = run_info["final_loss"]
    base_model = base_model or config.get("pretrained_model_name_or_path")
    lora = bool(config.get("lora_rank"))
    model_path = model_path or config.get("output_dir") or "."
    title = title or Path(model_path).name or "text-to-image model"
    prompts = config.get("validation_prompts") or []
    prompt = prompts[0] if prompts else "a red circle on the left"

    meta: dict[str, Any] = {}
    if base_model and HUB_ID.match(base_model) and not Path(base_model).exists():
        meta["base_model"] = base_model  # the Hub links a hub id only; a local path stays in the text
    if license:
        meta["license"] = license
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = "text-to-image"
    meta["tags"] = ["text-to-image", "diffusers", "latent-diffusion"] + (["lora"] if lora else [])

    if lora:
        intro = f"LoRA adapters for `{base_model}`" if base_model else "LoRA adapters"
    elif base_model:
        intro = f"A latent text-to-image diffusion model fine-tuned from `{base_model}`"
    else:
        intro = "A latent text-to-image diffusion model trained from scratch"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {title}", "",
             intro + ", trained with the ldm-toolkit (`training/train_ldm.py`).", ""]

    if grid:
        lines += ["## Samples", "", f"![samples]({grid})", ""]
        if prompts:
            lines += ["Rows, top to bottom: " + "; ".join(f"*{p}*" for p in prompts) + ".", ""]

    lines += ["## How to load it", ""] + _usage(model_path, base_model, lora, prompt) + [""]

    data_lines = _data_lines(data_stats)
    if data_lines:
        lines += ["## Data", ""] + data_lines + [""]

    lines += ["## Training", ""] + _table(_training_rows(config, run_info), ("", "")) + [""]
    run_rows = _run_rows(run_info)
    if run_rows:
        lines += ["### Run", ""] + _table(run_rows, ("", "")) + [""]

    metric_lines = _metric_lines(metrics)
    if metric_lines:
        lines += ["## Metrics", ""] + metric_lines + [""]

    if defaults is not None:
        changed = non_default_settings(config, defaults)
        lines += ["## Settings that differ from the defaults", ""]
        if changed:
            lines += _table([(f"`{k}`", _code(v), _code(d)) for k, (v, d) in changed.items()],
                            ("setting", "value", "default"))
        else:
            lines.append("None: every setting is the default.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(output_dir: str | Path, config: dict[str, Any], **kwargs: Any) -> Path:
    """Write `output_dir/README.md` (see `model_card` for the arguments); the grid path, when
    given absolute, is made relative to `output_dir`."""
    output_dir = Path(output_dir)
    grid = kwargs.get("grid")
    if grid is not None and Path(grid).is_absolute():
        try:
            kwargs["grid"] = Path(grid).resolve().relative_to(output_dir.resolve()).as_posix()
        except ValueError:
            kwargs["grid"] = Path(grid).as_posix()
    path = output_dir / CARD_NAME
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(model_card(config, **kwargs))
    return path
