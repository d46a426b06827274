"""How much does a first stage let a square and a circle differ, per object colour and background?

A latent diffusion model pays for an error in proportion to its size in the latents. Where a
square and a circle of one colour on one background hardly differ there, getting the corners
right is worth little to the loss, and shape is learned last for that pair (on the built-in data:
yellow on white). For each background and colour this prints the squared L2 distance between a
centred square and circle of the same size, in the VAE's scaled latents and in pixels ([-1, 1]).

    python benchmarks/latent_contrast.py
    python benchmarks/latent_contrast.py --vae outputs/custom_vae --colors outputs/custom_shapes/palette.json \\
        --backgrounds '{"off-white": [250, 250, 235]}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data import image_transform  # noqa: E402
from ldm.presets import ASSETS  # noqa: E402
from ldm.synthetic import BACKGROUNDS, COLORS, Obj, Scene, render  # noqa: E402

RGB = tuple[int, int, int]


@torch.no_grad()
def shape_contrast(vae, color: RGB, background: RGB, resolution: int, radius: float) -> tuple[float, float]:
    """(latent, pixel) squared L2 between a square and a circle of half-side `radius` (a fraction
    of the side) in `color` on `background`, centred; latents are the posterior means x the
    VAE's scaling factor, as the diffusion model sees them."""
    images = [render(Scene((Obj("c", shape, "center", "small", radius),)), resolution,
                     palette={"c": color}, background=background) for shape in ("square", "circle")]
    to_tensor = image_transform(resolution, center_crop=True, random_flip=False)  # as training encodes
    x = torch.stack([to_tensor(im) for im in images]).to(vae.device, vae.dtype)
    z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    return float((z[0] - z[1]).pow(2).sum()), float((x[0] - x[1]).pow(2).sum())


def table(vae, colors: dict[str, RGB], backgrounds: dict[str, RGB], resolution: int,
          radius: float) -> dict[str, dict[str, dict[str, float]]]:
    """{background: {colour: {"latent": ..., "pixel": ...}}}."""
    out = {}
    for bg_name, bg in backgrounds.items():
        out[bg_name] = {}
        for name, rgb in colors.items():
            latent, pixel = shape_contrast(vae, tuple(rgb), tuple(bg), resolution, radius)
            out[bg_name][name] = {"latent": latent, "pixel": pixel}
    return out


def main(argv: list[str] | None = None) -> dict:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vae", default=str(ASSETS / "tiny_vae"), help="diffusers AutoencoderKL folder")
    parser.add_argument("--colors", default=None, help="JSON palette file {name: [r, g, b]} (default: built-in)")
    parser.add_argument("--backgrounds", default=None,
                        help="JSON {name: [r, g, b]}, a file or inline (default: the built-in backgrounds)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--radius", type=float, default=0.145, help="half-side as a fraction of the image side")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)

    colors = json.loads(Path(args.colors).read_text()) if args.colors else COLORS
    if args.backgrounds is None:
        backgrounds = BACKGROUNDS
    else:
        text = args.backgrounds
        backgrounds = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    result = table(vae, colors, backgrounds, args.resolution, args.radius)

    names = list(colors)
    print("square vs circle, squared L2 in the scaled latents (pixels in brackets)")
    print(f"{'background':12s}" + "".join(f"{n:>18s}" for n in names))
    for bg_name, row in result.items():
        print(f"{bg_name:12s}" + "".join(f"{row[n]['latent']:9.1f} ({row[n]['pixel']:5.1f})" for n in names))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
