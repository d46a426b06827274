"""Score a text-to-image pipeline on compositions: does it draw the colour, shape and position
the prompt asks for? Read back by the analytic judge (`ldm.judge`). The command line is
`training/evaluate.py`; training calls `evaluate_pipeline` on its final pipeline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ldm.images import labelled_grid
from ldm.judge import Judge, default_judge
from ldm.synthetic import eval_prompt, held_out_compositions

ATTRIBUTES = ("color", "shape", "position")


@dataclass(frozen=True)
class Case:
    prompt: str
    color: str
    shape: str
    position: str


def held_out_cases() -> list[Case]:
    return [Case(eval_prompt(c, s, p), c, s, p) for c, s, p in held_out_compositions()]


def score(readings: list, expected: list[Case]) -> dict[str, float]:
    """Fraction of images whose reading matches the case, per attribute and all three at once."""
    n = max(len(readings), 1)
    result = {a: sum(getattr(r, a) == getattr(c, a) for r, c in zip(readings, expected)) / n for a in ATTRIBUTES}
    result["all"] = sum(all(getattr(r, a) == getattr(c, a) for a in ATTRIBUTES)
                        for r, c in zip(readings, expected)) / n
    return result


@torch.no_grad()
def evaluate_pipeline(pipe, cases: list[Case], *, judge: Judge | None = None, images_per_case: int = 8,
                      num_inference_steps: int = 25, guidance_scale: float = 4.0, seed: int = 0,
                      batch_cases: int = 8) -> tuple[dict, list]:
    """Generate `images_per_case` images per case (image k of every case uses seed + k, so runs
    are comparable), read them, and score. Returns (report, images in case order).
    `pipe`: any callable with the text-to-image pipeline's arguments (prompts,
    num_images_per_prompt, generator, num_inference_steps, guidance_scale) whose result has `.images`."""
    judge = judge or default_judge()
    images = []
    for start in range(0, len(cases), batch_cases):
        chunk = cases[start : start + batch_cases]
        gens = [torch.Generator().manual_seed(seed + k) for _ in chunk for k in range(images_per_case)]
        images += pipe([c.prompt for c in chunk], num_images_per_prompt=images_per_case, generator=gens,
                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale).images
    expected = [c for c in cases for _ in range(images_per_case)]
    readings = [judge.read(im) for im in images]
    per_case = []
    for i, case in enumerate(cases):
        part = slice(i * images_per_case, (i + 1) * images_per_case)
        per_case.append({**asdict(case), **score(readings[part], expected[part]),
                         "read": [asdict(r) for r in readings[part]]})
    report = {**score(readings, expected), "images": len(images), "cases": per_case,
              "settings": {"images_per_case": images_per_case, "num_inference_steps": num_inference_steps,
                           "guidance_scale": guidance_scale, "seed": seed}}
    return report, images


def save_report(report: dict, images: list, out_dir: str | Path, images_per_case: int,
                title: str | None = None) -> Path:
    """eval.json and eval_grid.png: a row per case labelled with its prompt; the title is `title`
    (e.g. the step) followed by the scores."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    prompts = [case["prompt"] for case in report["cases"]]
    heading = f"{title}: {summary(report)}" if title else summary(report)
    labelled_grid(images, rows=len(prompts), cols=images_per_case, row_labels=prompts,
                  title=heading).save(out / "eval_grid.png")
    return out / "eval.json"


def summary(report: dict) -> str:
    return (f"all attributes {report['all']:.1%} | colour {report['color']:.1%} | shape {report['shape']:.1%} | "
            f"position {report['position']:.1%} ({report['images']} images)")
