"""Measure a first stage (VAE): how well does it reconstruct these images, against a bicubic thumbnail?

    python training/evaluate_vae.py --vae ldm/assets/tiny_vae                          # built-in shapes
    python training/evaluate_vae.py --vae outputs/tiny_vae --data photos-heldout       # photos never trained on
    python training/evaluate_vae.py --vae DIR --train_data_dir data/my_images          # your own folder

On pixels in [0, 1], posterior mode (z = mean): PSNR (dB), SSIM (11-tap Gaussian window) and L1,
for the VAE and for the baseline "bicubic down to the latent size and back up" (a 16x16x3 thumbnail
for a 32-px image and a x2 VAE). --data: builtin (the shapes, a seed not trained on), other-palette
(the same layouts in other colours on other backgrounds), photos-heldout (crops at several scales of
scikit-image photos the diverse mix never trains on), diverse (the training mix, another seed).
Writes metrics.json and reconstructions.png (rows: originals, VAE, bicubic) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.config_checks import check_output_dir
from ldm.errors import UsageError, check_positive, existing_folder, run_cli

DATA = ("builtin", "other-palette", "photos-heldout", "diverse")


def load_images(data: str | None, folder: str | None, n: int, resolution: int, seed: int):
    """(N, 3, R, R) pixels in [0, 1]."""
    import numpy as np
    import torch

    from ldm import first_stage_data as fsd

    if folder:
        from ldm.data import image_transform, to_rgb
        from training.train_vae import image_folder

        ds = image_folder(folder)
        tf = image_transform(resolution, True, False)  # centre crop, no flip: (3, R, R) in [-1, 1]
        return torch.stack([(tf(to_rgb(ds[i]["image"])) + 1) / 2 for i in range(min(n, len(ds)))])
    if data == "builtin":
        from ldm.synthetic import make_examples

        images = make_examples(n, resolution, seed=123 + seed)[0]  # the LDM's palette, a seed not trained on
    elif data == "other-palette":
        images = fsd.other_palette_shapes(n, resolution, seed=seed)
    elif data == "photos-heldout":
        if fsd.photo_dir() is None:
            raise UsageError("--data photos-heldout needs scikit-image's photos: pip install scikit-image")
        images = fsd.heldout_photo_crops(n, resolution, seed=seed)
    else:
        images = [fsd.diverse_image(10_000 + seed, i, resolution) for i in range(n)]
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vae", required=True, help="VAE folder, or pipeline folder with vae/ (diffusers layout)")
    parser.add_argument("--train_data_dir", default=None, help="an image folder to measure on (instead of --data)")
    parser.add_argument("--data", default=None, choices=DATA, help="generated images (default: builtin)")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="report folder (default: outputs/eval_vae/<vae folder name>_<data>)")
    args = parser.parse_args(argv)
    if args.train_data_dir and args.data:
        raise UsageError("--train_data_dir and --data: give one of them")
    check_positive(args, "num_images", "resolution")
    vae_path = existing_folder("--vae", args.vae)
    if not ((vae_path / "config.json").is_file() or (vae_path / "vae" / "config.json").is_file()):
        raise UsageError(f"--vae {args.vae}: neither a VAE folder (config.json) nor a pipeline folder with vae/")
    if args.train_data_dir:
        from ldm import datacheck

        datacheck.check_layout(args.train_data_dir, captions=False)
    data = "folder" if args.train_data_dir else (args.data or "builtin")
    # Not inside the VAE's folder by default: that may be the package's own ldm/assets.
    out = Path(args.out or Path("outputs", "eval_vae", f"{vae_path.resolve().name}_{data}"))
    check_output_dir(str(out), "--out")

    from ldm.images import image_grid
    from ldm.models import load_vae, vae_scale_factor
    from ldm.vae_losses import bicubic_roundtrip, image_metrics, reconstruct

    vae = load_vae(args.vae).float().eval()
    factor = vae_scale_factor(vae.config)
    if args.resolution % factor:
        raise UsageError(f"--resolution {args.resolution}: must be a multiple of the VAE's downsampling x{factor}")
    x = load_images(args.data or "builtin", args.train_data_dir, args.num_images, args.resolution, args.seed)
    recon, bicubic = reconstruct(vae, x), bicubic_roundtrip(x, factor)
    report = {"vae": str(args.vae), "data": args.train_data_dir or data, "num_images": len(x),
              "resolution": args.resolution, "latent": [vae.config.latent_channels, args.resolution // factor],
              "vae_metrics": image_metrics(x, recon), "bicubic_metrics": image_metrics(x, bicubic)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    from torchvision.transforms.functional import to_pil_image

    rows = [t[:16] for t in (x, recon, bicubic)]
    image_grid([to_pil_image(im) for row in rows for im in row], cols=len(rows[0])).save(out / "reconstructions.png")
    v, b = report["vae_metrics"], report["bicubic_metrics"]
    print(f"{data}: VAE PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f}, L1 {v['l1']:.4f} | bicubic x{factor} "
          f"PSNR {b['psnr']:.2f} dB, SSIM {b['ssim']:.4f} ({len(x)} images) -> {out}")
    return report


if __name__ == "__main__":
    run_cli(main)
