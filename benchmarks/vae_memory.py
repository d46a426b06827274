"""Peak memory of VAE encode and decode by image size: plain vs tiled vs sliced.

    python benchmarks/vae_memory.py [--sizes 512] [--batch 2] [--tile_size 256] [--ops decode encode]
                                    [--modes plain tiled sliced] [--threads 2] [--out benchmarks/results/vae_memory.json]

The Stable Diffusion 1.5 VAE architecture (`model_preset("sd15")`, random weights: memory does
not depend on the values), float32, a batch of `--batch` images. Each configuration runs in a
fresh subprocess so its peak is its own: on CUDA, `torch.cuda.max_memory_allocated` (tensors
only); on CPU, the process's peak resident set (`ru_maxrss`), of which `working_mib` is the part
above the process after the VAE was built (weights, Python, torch), i.e. what the operation itself
needed. Tiled: tiles of `--tile_size` pixels, a quarter overlap (SD's VAE config tiles at 512;
images no larger than a tile are not tiled). Sliced: the batch one image at a time.
On a 2-core CPU one 512 px decode of two images takes one to two minutes: the default run (512 px,
both operations, three modes) takes 5-10 minutes; 1024 px is 4x and 2048 px 16x that per row.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("plain", "tiled", "sliced")
OPS = ("decode", "encode")
MIB = 2 ** 20


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_one(op: str, size: int, mode: str, batch: int, tile_size: int, threads: int) -> dict:
    """One configuration, in this process (call it in a fresh one)."""
    import torch

    from ldm.models import build_vae
    from ldm.presets import model_preset
    from ldm.vae_utils import configure_vae

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = model_preset("sd15")
    vae = build_vae(cfg.vae, cfg.resolution).to(device).eval().requires_grad_(False)
    configure_vae(vae, tiling=mode == "tiled", slicing=mode == "sliced", tile_size=tile_size)
    f = cfg.vae.downsample_factor
    g = torch.Generator(device).manual_seed(0)
    if op == "decode":
        x = torch.randn(batch, cfg.vae.latent_channels, size // f, size // f, generator=g, device=device)
        run = lambda: vae.decode(x).sample  # noqa: E731
    else:
        x = torch.rand(batch, 3, size, size, generator=g, device=device) * 2 - 1
        run = lambda: vae.encode(x).latent_dist.parameters  # noqa: E731
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated() / MIB
    else:
        before = _rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        out = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / MIB if cuda else _rss_mib()
    return {"op": op, "size": size, "mode": mode, "batch": batch, "tile_size": tile_size,
            "device": "cuda" if cuda else "cpu", "measure": "max_memory_allocated" if cuda else "ru_maxrss",
            "peak_mib": round(peak, 1), "before_mib": round(before, 1), "working_mib": round(peak - before, 1),
            "seconds": round(seconds, 2), "out_shape": list(out.shape)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512], help="image sides in pixels (1024, 2048: 4x, 16x the time)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch", type=int, default=2, help="images per call (slicing needs more than one)")
    p.add_argument("--tile_size", type=int, default=256, help="tile side in pixels")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--out", default="benchmarks/results/vae_memory.json")
    p.add_argument("--one", nargs=3, metavar=("OP", "SIZE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        op, size, mode = args.one
        print(json.dumps(measure_one(op, int(size), mode, args.batch, args.tile_size, args.threads)))
        return

    rows = []
    print(f"{'op':7} {'size':>5} {'mode':7} {'peak MiB':>9} {'working MiB':>12} {'seconds':>8}", flush=True)
    for op in args.ops:
        for size in args.sizes:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--one", op, str(size), mode, "--batch", str(args.batch),
                       "--tile_size", str(args.tile_size), "--threads", str(args.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                    print(f"{op:7} {size:>5} {mode:7} failed: {tail}", flush=True)
                    rows.append({"op": op, "size": size, "mode": mode, "batch": args.batch, "error": tail})
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{op:7} {size:>5} {mode:7} {row['peak_mib']:>9.0f} {row['working_mib']:>12.0f} "
                      f"{row['seconds']:>8.1f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/vae_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
