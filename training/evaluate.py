"""Score a text-to-image pipeline on compositions: does it draw the colour, shape and position
the prompt asks for? Read back by the analytic judge (`ldm.judge`).

    python training/evaluate.py --pipeline outputs/ldm                # held-out built-in compositions
    python training/evaluate.py --pipeline DIR --cases cases.json --colors palette.json

`cases.json`: [{"prompt": "...", "color": "...", "shape": "...", "position": "..."}, ...];
`palette.json`: {"colour name": [r, g, b], ...}. Writes eval.json (per-attribute and
all-attribute accuracy, per case) and eval_grid.png (a row per case) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ldm.images import image_grid
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
    are comparable), read them, and score. Returns (report, images in case order)."""
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


def save_report(report: dict, images: list, out_dir: str | Path, images_per_case: int) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    image_grid(images, cols=images_per_case).save(out / "eval_grid.png")
    return out / "eval.json"


def summary(report: dict) -> str:
    return (f"all attributes {report['all']:.1%} | colour {report['color']:.1%} | shape {report['shape']:.1%} | "
            f"position {report['position']:.1%} ({report['images']} images)")


def main(argv: list[str] | None = None) -> dict:
    from pipelines import TextToImagePipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="pipeline folder (diffusers layout)")
    parser.add_argument("--out", default=None, help="report folder (default: <pipeline>/eval)")
    parser.add_argument("--cases", default=None, help="JSON list of cases (default: built-in held-out set)")
    parser.add_argument("--colors", default=None, help="JSON palette for the judge (default: built-in)")
    parser.add_argument("--images_per_case", type=int, default=8)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--sampler", default=None, help="override the saved scheduler (e.g. ddim, dpm++)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cases = held_out_cases()
    if args.cases:
        cases = [Case(**c) for c in json.loads(Path(args.cases).read_text())]
    judge = Judge({k: tuple(v) for k, v in json.loads(Path(args.colors).read_text()).items()}) if args.colors else None
    pipe = TextToImagePipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if args.sampler:
        pipe.set_sampler(args.sampler)
    report, images = evaluate_pipeline(pipe, cases, judge=judge, images_per_case=args.images_per_case,
                                       num_inference_steps=args.num_inference_steps,
                                       guidance_scale=args.guidance_scale, seed=args.seed)
    path = save_report(report, images, args.out or Path(args.pipeline) / "eval", args.images_per_case)
    print(f"{summary(report)} -> {path}")
    return report


if __name__ == "__main__":
    main()
