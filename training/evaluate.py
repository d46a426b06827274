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
from ldm.judge import Judge


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
