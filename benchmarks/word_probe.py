"""Does a trained pipeline tell its prompts' words apart, and does the layout follow them?

Two checks, for when a model ignores some words (e.g. draws "at the top" and "at the bottom" alike):

1. text encoder: for prompt pairs that differ in one word, the L2 distance of the last hidden
   states at that word and at the end-of-text token (`ldm.text.word_separation`); ~0 means the
   encoder has merged the words, and no U-Net can follow them.
2. U-Net: its x0 prediction from pure noise at t = T (where the layout is decided), decoded and
   averaged over `--noises` draws, reduced to the centroid of what differs from the border colour
   (x, y in [0, 1]). Different words should move it.

    python benchmarks/word_probe.py --pipeline outputs/ldm
    python benchmarks/word_probe.py --pipeline outputs/ldm --object "a blue square" \\
        --words "on the left" "on the right" "at the top" "at the bottom" "in the center"
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.diffusion import to_x0_and_eps  # noqa: E402
from ldm.judge import layout_centroid  # noqa: E402
from ldm.text import encode_tokens, tokenize, word_separation  # noqa: E402
from pipelines import TextToImagePipeline  # noqa: E402

DIRECTIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")


@torch.no_grad()
def x0_at_t_max(pipe: TextToImagePipeline, prompt: str, noises: int, seed: int) -> torch.Tensor:
    """The U-Net's x0 prediction from pure noise at the last training timestep, decoded, averaged
    (meaningful for v-prediction on a zero-terminal-SNR schedule, as the tiny preset trains)."""
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    t = scheduler.config.num_train_timesteps - 1
    alpha_bar = scheduler.alphas_cumprod[t].to(torch.float32)
    context = encode_tokens(pipe.text_encoder, tokenize(pipe.tokenizer, [prompt] * noises))
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn((noises, unet.config.in_channels, size, size), generator=generator)
    out = unet(x_t, torch.full((noises,), t), context).sample
    x0, _ = to_x0_and_eps(scheduler.config.prediction_type, out, x_t, alpha_bar.expand(noises))
    return vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1).mean(0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="diffusers-layout pipeline folder")
    parser.add_argument("--object", default="a red circle", help="the prompt before each word")
    parser.add_argument("--words", nargs="+", default=list(DIRECTIONS))
    parser.add_argument("--noises", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    pipe = TextToImagePipeline.from_pretrained(args.pipeline)
    prompts = [f"{args.object} {w}" for w in args.words]
    print("text encoder: L2 distance of last hidden states (at the word / at end-of-text; hidden norm)")
    separation = {}
    for a, b in itertools.combinations(prompts, 2):
        s = word_separation(pipe.text_encoder, pipe.tokenizer, a, b)
        separation[f"{a} | {b}"] = s
        print(f"  {a!r} vs {b!r}: {s['word']:.2f} / {s['end']:.2f}  (norm {s['norm']:.2f})")
    print("U-Net: centroid (x, y) of the decoded x0 prediction at t = T")
    layout = {}
    for prompt in prompts:
        layout[prompt] = layout_centroid(x0_at_t_max(pipe, prompt, args.noises, args.seed))
        print(f"  {prompt!r}: ({layout[prompt][0]:.2f}, {layout[prompt][1]:.2f})")
    report = {"pipeline": args.pipeline, "separation": separation, "layout": layout}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
