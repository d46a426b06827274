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
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.evaluation import Case, evaluate_pipeline, held_out_cases, save_report, summary
from ldm.config_checks import check_output_dir
from ldm.errors import UsageError, check_positive, existing_folder, run_cli
from ldm.judge import Judge


def read_json(path: str, flag: str):
    """The JSON in a file named by a flag; a missing or malformed file is a UsageError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: not readable ({e})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} {path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None


def read_cases(path: str) -> list[Case]:
    data = read_json(path, "--cases")
    if not isinstance(data, list) or not data:
        raise UsageError(f"--cases {path}: expected a non-empty JSON list of cases")
    fields = ("prompt", "color", "shape", "position")
    for i, c in enumerate(data):
        if not isinstance(c, dict) or sorted(c) != sorted(fields) or not all(isinstance(v, str) for v in c.values()):
            raise UsageError(f"--cases {path}: entry {i} must be an object with the strings {', '.join(fields)}, "
                             f"got {json.dumps(c)[:80]}")
    return [Case(**c) for c in data]


def read_colors(path: str) -> Judge:
    data = read_json(path, "--colors")
    ok = isinstance(data, dict) and data and all(
        isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) and 0 <= x <= 255 for x in v)
        for v in data.values())
    if not ok:
        raise UsageError(f"--colors {path}: expected a JSON object of colour name -> [r, g, b] (0-255)")
    return Judge({k: tuple(v) for k, v in data.items()})


def grid_title(pipeline: Path) -> str:
    """The folder's name and, for a training run's folder, its step (run_info.json)."""
    try:
        step = json.loads((pipeline / "run_info.json").read_text()).get("global_step")
    except (OSError, ValueError):
        step = None
    return f"{pipeline.name} step {step}" if step is not None else pipeline.name


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
    check_positive(args, "images_per_case", "num_inference_steps")
    pipeline = existing_folder("--pipeline", args.pipeline)
    if not (pipeline / "model_index.json").is_file():
        raise UsageError(f"--pipeline {args.pipeline}: not a pipeline folder (no model_index.json)")
    check_output_dir(args.out or str(pipeline / "eval"), "--out")
    from ldm.schedulers import SAMPLERS

    if args.sampler and args.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {args.sampler}: unknown; choose one of {', '.join(SAMPLERS)}")
    cases = read_cases(args.cases) if args.cases else held_out_cases()
    judge = read_colors(args.colors) if args.colors else None

    pipe = TextToImagePipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if args.sampler:
        pipe.set_sampler(args.sampler)
    report, images = evaluate_pipeline(pipe, cases, judge=judge, images_per_case=args.images_per_case,
                                       num_inference_steps=args.num_inference_steps,
                                       guidance_scale=args.guidance_scale, seed=args.seed)
    path = save_report(report, images, args.out or Path(args.pipeline) / "eval", args.images_per_case,
                       title=grid_title(pipeline))
    print(f"{summary(report)} -> {path}")
    return report


if __name__ == "__main__":
    run_cli(main)
