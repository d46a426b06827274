"""DiT against the tiny U-Net, and a small DiT scaling grid (Peebles & Xie 2023, sec. 5 at toy scale).

    python benchmarks/dit_scaling.py                      # params, GFLOPs per image, seconds per step
    python benchmarks/dit_scaling.py --train [--variants tiny dit-S/2] [-- --max_train_steps 2400]
    python benchmarks/dit_scaling.py --plot scaling.png --from_json results.json [more.json ...]

For each variant: denoiser parameters, forward GFLOPs per image (torch.utils.flop_counter, one
32 px image = 16x16x4 latents and 32 text tokens; a training step costs about 3x), and the median
seconds of a training step at --batch (denoiser + text encoder forward, backward, AdamW), the
variants taking turns step by step so that a shared, busy CPU slows them alike.
With --train, each variant is trained by training/train_ldm.py (its preset's recipe: tiny's for
tiny, tiny-dit's for every DiT; extra flags after `--` are passed on) into --out/<variant>, and its
held-out score read from eval/eval.json.

Variants: `tiny` (U-Net) and DiTs named S or B (width 96 x 4 blocks, 128 x 6 blocks) and their
patch size (4, 2 or, for S, 1: 256 tokens); S/2 is the `tiny-dit` preset (B/2 was until
2026-12-07). --plot draws held-out score against forward GFLOPs per image, one line per DiT
width (the DiT paper's fig. 2 at toy scale), from this run's results or from earlier JSON files
(--from_json; later files win). The DiTs that are not presets are registered as presets in the
training process this script starts, so train_ldm trains them unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
# name -> (width, blocks, heads, patch); width = heads x 32 (S: 3 heads, B: 4)
DITS = {"dit-S/1": (96, 4, 3, 1), "dit-S/2": (96, 4, 3, 2), "dit-S/4": (96, 4, 3, 4), "dit-B/2": (128, 6, 4, 2),
        "dit-B/4": (128, 6, 4, 4)}
VARIANTS = ["tiny", *DITS]


def variant_config(name: str):
    """The ModelConfig of a variant: a preset, or tiny-dit with another DiT."""
    from ldm.presets import DiTConfig, model_preset

    if name == "tiny":
        return model_preset("tiny")
    width, blocks, heads, patch = DITS[name]
    return dataclasses.replace(model_preset("tiny-dit"), dit=DiTConfig(
        patch_size=patch, num_layers=blocks, num_attention_heads=heads, attention_head_dim=width // heads))


def register(name: str) -> None:
    """Make `name` a preset in this process (train_ldm's --preset choices)."""
    from ldm.presets import PRESETS

    PRESETS.setdefault(name, lambda: variant_config(name))


class Step:
    """One variant's denoiser and text encoder (seed 0, the shipped VAE's latent size) and its training step."""

    def __init__(self, name: str, batch: int):
        import torch

        from ldm.models import components_for_training
        from ldm.text import tokenize

        cfg = variant_config(name)
        comps = components_for_training(cfg, pretrained=None, pretrained_vae=cfg.pretrained_vae,
                                        prediction_type=None, seed=0)
        self.net, self.te = comps.denoiser.train(), comps.text_encoder.train()
        self.te.get_input_embeddings().requires_grad_(False)  # as the tiny presets train it
        params = [p for m in (self.net, self.te) for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        c, s = self.net.config.in_channels, self.net.config.sample_size
        self.x = torch.randn(batch, c, s, s, generator=g)
        self.t = torch.randint(0, 1000, (batch,), generator=g)
        colours = ["red", "green", "blue", "yellow"]
        self.ids = tokenize(comps.tokenizer, [f"a {colours[i % 4]} circle on the left" for i in range(batch)])

    def flops_per_image(self) -> float:
        """Forward FLOPs of the denoiser for one image (text embeddings as in a step)."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from ldm.models import denoise
        from ldm.text import encode_tokens

        with torch.no_grad():
            context = encode_tokens(self.te, self.ids[:1])
            with FlopCounterMode(display=False) as counter:
                denoise(self.net, self.x[:1], self.t[:1], context)
        return counter.get_total_flops()

    def __call__(self) -> float:
        import torch.nn.functional as F

        from ldm.models import denoise
        from ldm.text import encode_tokens

        start = time.perf_counter()
        pred = denoise(self.net, self.x, self.t, encode_tokens(self.te, self.ids))
        F.mse_loss(pred, self.x).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def measure(names: list[str], batch: int, rounds: int, threads: int) -> dict[str, dict]:
    import torch

    from ldm.models import count_parameters

    torch.set_num_threads(threads)
    steps = {n: Step(n, batch) for n in names}
    for step in steps.values():  # warm-up (allocator, first-call kernels)
        step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n, step in steps.items():
            times[n].append(step())
    return {n: {"params_M": round(count_parameters(s.net) / 1e6, 3),
                "gflops_per_image": round(s.flops_per_image() / 1e9, 4),
                "step_s": round(statistics.median(times[n]), 4)} for n, s in steps.items()}


def train(name: str, out: Path, extra: list[str]) -> dict:
    """train_ldm.py on the variant (a subprocess: one Accelerator per run); its held-out report."""
    code = ("import sys; sys.path.insert(0, %r); from benchmarks.dit_scaling import register; register(%r); "
            "from training.train_ldm import main; main(sys.argv[1:])") % (str(ROOT), name)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, "--preset", name, "--output_dir", str(out), *extra],
                   check=True, cwd=ROOT)
    report = json.loads((out / "eval" / "eval.json").read_text())
    return {"train_wall_s": round(time.perf_counter() - start, 1),
            **{k: report[k] for k in ("all", "color", "shape", "position", "images")}}


def plot_scaling(results: dict[str, dict], out: str | Path) -> Path:
    """Held-out all-three score (%) against forward GFLOPs per image: the trained DiTs joined by
    width across patch sizes, the U-Net as a star. Variants without a score are left out."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    scored = {n: r for n, r in results.items() if "all" in r and "gflops_per_image" in r}
    if not scored:
        raise ValueError("no variant has both a held-out score and GFLOPs: train some (--train) or pass --from_json")
    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    for width, marker in ((96, "o"), (128, "s")):
        pts = sorted((r["gflops_per_image"], 100 * r["all"], n) for n, r in scored.items()
                     if n in DITS and DITS[n][0] == width)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                    label=f"DiT width {width} x {DITS[pts[0][2]][1]} blocks")
            for x, y, n in pts:
                ax.annotate(f"{n} (p{DITS[n][3]})", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if "tiny" in scored:
        ax.plot([scored["tiny"]["gflops_per_image"]], [100 * scored["tiny"]["all"]], "k*", markersize=12,
                label="tiny U-Net")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("denoiser forward GFLOPs per image (log)")
    ax.set_ylabel("held-out all three (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def merge_results(paths: list[str]) -> dict[str, dict]:
    """Variant -> fields from earlier JSON files; a later file's fields win."""
    merged: dict[str, dict] = {}
    for path in paths:
        for name, fields in json.loads(Path(path).read_text()).items():
            merged.setdefault(name, {}).update(fields)
    return merged


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=32, help="batch of the timed step (the quick start's)")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant, interleaved")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", action="store_true", help="also train and evaluate each variant")
    parser.add_argument("--out", default="outputs/dit_scaling", help="--train: run folders")
    parser.add_argument("--json", default=None, help="write the results here (after each trained variant too)")
    parser.add_argument("--plot", default=None, help="PNG of held-out score against GFLOPs per image")
    parser.add_argument("--from_json", nargs="+", default=None,
                        help="with --plot: draw these earlier results instead of measuring")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.from_json:
        if not args.plot:
            parser.error("--from_json only works with --plot")
        print(plot_scaling(merge_results(args.from_json), args.plot))
        return {}
    results = measure(args.variants, args.batch, args.rounds, args.threads)
    base = results.get("tiny")
    print(f"{'variant':10} {'params':>8} {'GFLOPs/img':>11} {'s/step':>8} {'vs tiny':>8}")
    for name, r in results.items():
        ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else ""
        print(f"{name:10} {r['params_M']:7.2f}M {r['gflops_per_image']:11.4f} {r['step_s']:8.3f} {ratio:>8}")
    if args.train:
        for name in args.variants:
            results[name].update(train(name, Path(args.out) / name.replace("/", "_"), extra))
            print(name, json.dumps(results[name]), flush=True)
            if args.json:  # a later variant's failure keeps the earlier ones
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        print(plot_scaling(results, args.plot))
    return results


if __name__ == "__main__":
    main()
