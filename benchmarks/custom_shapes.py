"""A second synthetic data set in a user's own style, to check that the default recipe is not
tuned to the built-in one: other colours, other words for shapes and places, other sentence
shapes, smaller/larger images. Writes

    OUT/train/    image folder + metadata.jsonl (for --train_data_dir)
    OUT/cases.json    held-out prompts with the expected colour / shape / position
    OUT/palette.json  the colours, for the judge

    python benchmarks/custom_shapes.py outputs/custom_shapes
    accelerate launch --config_file accelerate_config.yaml training/train_ldm.py \
        --train_data_dir outputs/custom_shapes/train --output_dir outputs/custom_ldm
    python training/evaluate.py --pipeline outputs/custom_ldm \
        --cases outputs/custom_shapes/cases.json --colors outputs/custom_shapes/palette.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.synthetic import Obj, Scene, render

PALETTE = {"orange": (255, 130, 0), "teal": (0, 150, 150), "pink": (250, 100, 190), "brown": (120, 70, 20)}
SHAPE_WORDS = {"circle": ("disc", "round dot"), "square": ("box", "square block"), "triangle": ("triangle", "wedge")}
PLACE_WORDS = {"left": "left side", "right": "right side", "top": "upper part", "bottom": "lower part",
               "center": "middle"}
SENTENCES = ("{color} {shape}, {place}", "there is a {color} {shape} in the {place}",
             "{place}: one {color} {shape}")


def caption(color: str, shape: str, position: str, rng: random.Random) -> str:
    words = SHAPE_WORDS[shape][rng.randrange(2)]
    return rng.choice(SENTENCES).format(color=color, shape=words, place=PLACE_WORDS[position])


def held_out(seed: int = 7, count: int = 8) -> list[tuple[str, str, str]]:
    combos = list(itertools.product(PALETTE, SHAPE_WORDS, PLACE_WORDS))
    random.Random(seed).shuffle(combos)
    return sorted(combos[:count])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num_images", type=int, default=4096)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    excluded = set(held_out())
    allowed = [c for c in itertools.product(PALETTE, SHAPE_WORDS, PLACE_WORDS) if c not in excluded]
    canvas = (250, 250, 235)  # an off-white background of its own
    with open(out / "train" / "metadata.jsonl", "w") as meta:
        for i in range(args.num_images):
            color, shape, position = rng.choice(allowed)
            obj = Obj(color, shape, position, "", rng.uniform(0.14, 0.21))
            img = render(Scene((obj,)), args.resolution, palette=PALETTE, background=canvas)
            name = f"{i:05d}.png"
            img.save(out / "train" / name)
            meta.write(json.dumps({"file_name": name, "text": caption(color, shape, position, rng)}) + "\n")
    cases = [{"prompt": f"{c} {SHAPE_WORDS[s][0]}, {PLACE_WORDS[p]}", "color": c, "shape": s, "position": p}
             for c, s, p in held_out()]
    (out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    (out / "palette.json").write_text(json.dumps(PALETTE, indent=2) + "\n")
    print(f"wrote {args.num_images} images to {out / 'train'}, {len(cases)} held-out cases")


if __name__ == "__main__":
    main()
