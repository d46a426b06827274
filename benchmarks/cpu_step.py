"""Seconds per training step of a preset's U-Net + text encoder, by precision and memory format.

    python benchmarks/cpu_step.py [--preset tiny] [--batch 32] [--rounds 30] [--threads 2] [--compile]

Forward + backward + fused AdamW on random latents and real captions, for float32 (the
baseline), float32 channels_last, bf16 autocast and bf16 autocast channels_last (and, with
--compile, torch.compile'd U-Nets; their first step is the compilation). The variants take
turns step by step, so a machine that slows down or speeds up during the run (shared cores)
moves them all alike; timed one after the other, channels_last once looked 17% faster and was
not. Prints each variant's median seconds and its ratio against float32, and whether the CPU
has bf16 matrix units (AMX, AVX512-BF16), without which bf16 autocast is not worth trying.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from ldm.models import components_for_training
from ldm.presets import model_preset
from ldm.text import encode_tokens, tokenize


def cpu_bf16_units() -> dict[str, bool]:
    """What PyTorch reports about the CPU's bf16 support (private helpers, so guarded)."""
    found = {}
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, name, None) or getattr(torch._C._cpu, name, None)
        found[name.strip("_")] = bool(fn()) if fn else False
    return found


class Variant:
    """One model copy (same seed, same weights) and its training step."""

    def __init__(self, preset: str, batch: int, device: str, *, bf16: bool, channels_last: bool,
                 compile_unet: bool):
        comps = components_for_training(model_preset(preset), pretrained=None, pretrained_vae=None,
                                        prediction_type=None, seed=0)
        self.unet, self.te = comps.unet.to(device).train(), comps.text_encoder.to(device).train()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW([*self.unet.parameters(), *self.te.parameters()], lr=1e-4, fused=True)
        if compile_unet:
            self.unet = torch.compile(self.unet)
        self.device, self.bf16 = device, bf16
        g = torch.Generator().manual_seed(0)
        c, s = comps.unet.config.in_channels, comps.unet.config.sample_size
        words = [("red", "left"), ("green", "right"), ("blue", "top"), ("yellow", "bottom")]
        self.ids = tokenize(comps.tokenizer, [f"a {c_} circle at the {w}" for c_, w in words] * (batch // 4 + 1))[:batch].to(device)
        self.x = torch.randn(batch, c, s, s, generator=g).to(device)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.target = torch.randn(batch, c, s, s, generator=g).to(device)
        self.times: list[float] = []

    def step(self) -> None:
        start = time.perf_counter()
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            ctx = encode_tokens(self.te, self.ids)
            pred = self.unet(self.x, self.t, encoder_hidden_states=ctx, return_dict=False)[0]
        F.mse_loss(pred.float(), self.target).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=30, help="steps of each variant (the first 3 are warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd U-Nets")
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    if args.rounds < 4:
        ap.error(f"--rounds must be at least 4 (3 warm-up steps), got {args.rounds}")
    torch.set_num_threads(args.threads)
    specs = {"float32": (False, False, False), "float32 channels_last": (False, True, False),
             "bf16 autocast": (True, False, False), "bf16 autocast channels_last": (True, True, False)}
    if args.compile:
        specs.update({"float32 compiled": (False, False, True), "bf16 autocast compiled": (True, False, True)})
    variants = {name: Variant(args.preset, args.batch, args.device, bf16=b, channels_last=cl, compile_unet=c)
                for name, (b, cl, c) in specs.items()}
    report = {"torch": torch.__version__, "threads": args.threads, "batch": args.batch, "preset": args.preset,
              "cpu_bf16_units": cpu_bf16_units(), "rounds": args.rounds, "variants": {}}
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, CPU bf16 units: "
          f"{report['cpu_bf16_units']}")
    for _ in range(args.rounds):
        for v in variants.values():
            v.step()
    base = statistics.median(variants["float32"].times[3:])
    for name, v in variants.items():
        med = statistics.median(v.times[3:])
        report["variants"][name] = {"median_s": round(med, 4), "ratio_vs_float32": round(med / base, 3),
                                    "first_step_s": round(v.times[0], 2)}
        print(f"{name:30s} {med:.3f} s/step  x{med / base:.2f} of float32  (first step {v.times[0]:.1f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
