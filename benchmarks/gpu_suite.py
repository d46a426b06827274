"""Every GPU benchmark in one command; one JSON (GPU, versions, date) to benchmarks/results/.

    python benchmarks/gpu_suite.py                 # on a GPU: sd15 architecture, 512 px (< 8 min on an H200)
    python benchmarks/gpu_suite.py --smoke         # on CPU: the tiny preset, a few steps, end to end

Needs torch and this project's dependencies only (no network: the weights are random, the
architectures are the presets'). On a machine without diffusers / open_clip_torch, carry them
as wheels (docs/performance.md says how) and `pip install --no-index` them first.

What it measures (each section is independent: one that fails is recorded under "errors" and
the others still run; a section that would overrun --budget_s is skipped and says so):

  attention   which SDPA kernel serves each of the U-Net's attention head dims (sd15: 40, 80,
              160) in bf16: flash, memory-efficient, or only the math fallback.
  train_step  U-Net training step on cached latents (B, 4, 64, 64) and cached text embeddings
              (B, 77, 768): bf16 autocast over float32 weights, fused AdamW, SDPA; eager, then
              channels_last, then regional torch.compile (the repeated transformer blocks, as
              `--torch_compile` would): images/s, step time, peak memory, FLOPs per step counted
              with torch.utils.flop_counter and MFU against the GPU's dense bf16 peak.
  sampling    our TextToImagePipeline against diffusers' StableDiffusionPipeline on the same
              weights, DDIM, 50 steps, batch 1, CFG 7.5, one seed, in bf16: latency of each
              (interleaved, median) and the largest pixel difference of their images; then
              ours with `enable_gpu_settings` (channels_last, regional torch.compile): latency.
  lora        LoRA rank 4 on the U-Net's attention, batch 1, frozen VAE and text encoder in
              bf16, the image encoded every step: peak memory and step time.
  data_loading  the training data loader alone on the uncached path (JPEGs decoded, resized,
              randomly cropped and flipped, pinned, copied): images/s by worker count, and the
              best of them over the train_step section's fastest images/s (above 1: never the
              bottleneck; the uncached path also VAE-encodes each batch on the GPU).
  loop_syncs  training/train_ldm.py's own loop (tiny preset) under torch's CUDA sync debug mode:
              host-device syncs per optimizer step and where they come from (target: at most one).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name; the longest key found in
# torch.cuda.get_device_name() wins ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; H100 NVL and PCIe are lower
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in device_name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def mfu(flops_per_step: float, step_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (TFLOP/s)."""
    if not peak or step_s <= 0:
        return None
    return flops_per_step / step_s / (peak * 1e12)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move, and cast only when the dtype changes (diffusers warns on every cast)."""
    module.to(device)
    return module if next(module.parameters()).dtype == dtype else module.to(dtype=dtype)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ----------------------------------------------------------------------------- sections
def attention_kernels(head_dims: list[int], device: torch.device) -> dict:
    """For each head dim: which SDPA backends accept a bf16 (2, 8, 1024, d) self-attention."""
    if device.type != "cuda":
        return {"skipped": "flash / memory-efficient SDPA kernels are CUDA-only"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    found = {}
    for d in head_dims:
        q = torch.randn(2, 8, 1024, d, device=device, dtype=torch.bfloat16)
        row = {}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, q, q)
                row[name] = True
            except Exception:  # noqa: BLE001 - "no kernel for these inputs" comes as several types
                row[name] = False
        found[str(d)] = row
    return found


def head_dims(unet) -> list[int]:
    """Head dims of the U-Net's attention layers (sd15: 40, 80, 160)."""
    from diffusers.models.attention_processor import Attention

    return sorted({m.inner_dim // m.heads for m in unet.modules() if isinstance(m, Attention)})


def timed_calls(fn, *, warmup: int, repeats: int, device: torch.device) -> tuple[float, list[float], object]:
    """`fn()` `warmup` times untimed (compilation, allocator), then `repeats` times, each timed
    between device syncs: (the warm-up's seconds, each timed call's seconds, the last result)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    first, times, out = time.perf_counter() - t0, [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return first, times, out


def uncompile(model: torch.nn.Module) -> None:
    """Undo regional compilation in place (each block back to eager) and clear dynamo's caches."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


def train_step_bench(comps, *, batch: int, steps: int, warmup: int, device: torch.device, half: torch.dtype | None,
                     variants: list[str], budget: Budget, peak: float | None) -> dict:
    """The U-Net's step on cached latents and text embeddings, per variant."""
    unet = comps.unet.to(device).train()
    unet.requires_grad_(True)
    cfg = unet.config
    latent = cfg.sample_size
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():  # the cached text embeddings: the frozen encoder's output, once
        ids = comps.tokenizer(["a photograph of an astronaut riding a horse"] * batch, padding="max_length",
                              max_length=comps.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids.to(device)
        context = comps.text_encoder.to(device)(ids, return_dict=False)[0].detach()
    latents = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device)  # cached z
    alpha_bar = comps.noise_scheduler.alphas_cumprod.to(device)

    def autocast():  # a fresh context each use
        return torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()

    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)

    def step(model) -> torch.Tensor:
        t = torch.randint(0, len(alpha_bar), (batch,), device=device)
        noise = torch.randn_like(latents)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # x_t, DDPM eq. 4
        with autocast():
            pred = model(noisy, t, encoder_hidden_states=context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # forward + backward (AdamW is not counted)
        with autocast():
            pred = unet(latents, torch.zeros(batch, dtype=torch.long, device=device), encoder_hidden_states=context,
                        return_dict=False)[0]
        pred.float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    results = {"batch": batch, "resolution_latent": latent, "flops_per_step": flops, "peak_bf16_tflops": peak,
               "variants": {}}
    for variant in variants:
        if budget.left() < (150 if variant == "compiled" else 30):
            results["variants"][variant] = {"skipped": f"{budget.left():.0f} s of the budget left"}
            continue
        model = unet
        if variant in ("channels_last", "compiled"):
            unet.to(memory_format=torch.channels_last)
        if variant == "compiled":
            unet.compile_repeated_blocks(fullgraph=True)  # regional: each transformer block, compiled once
        reset_memory(device)
        first, times, loss = timed_calls(lambda: step(model), warmup=warmup, repeats=steps, device=device)
        step_s = statistics.median(times)
        results["variants"][variant] = {
            "step_s": step_s, "images_per_s": batch / step_s, "mfu": mfu(flops, step_s, peak),
            "achieved_tflops": flops / step_s / 1e12, "peak_memory_bytes": peak_memory(device),
            "warmup_s": first, "steps_timed": steps, "final_loss": float(loss)}
    if "compiled" in variants:  # back to eager for the sections after this one
        uncompile(unet)
    unet.to(memory_format=torch.contiguous_format)
    unet.zero_grad(set_to_none=True)
    return results


def sampling_bench(comps, *, steps: int, resolution: int, repeats: int, device: torch.device,
                   dtype: torch.dtype, gpu_settings: bool = False, compile: bool = False) -> dict:
    """Ours against diffusers' StableDiffusionPipeline: same modules, DDIM, one seed; with
    `gpu_settings`, then ours again with `enable_gpu_settings` (channels_last, and regional
    torch.compile when `compile`)."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm.schedulers import make_sampler
    from pipelines import TextToImagePipeline

    for m in (comps.unet, comps.vae, comps.text_encoder):
        to(m, device, dtype).eval().requires_grad_(False)
    ours = TextToImagePipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                               unet=comps.unet, scheduler=make_sampler("ddim", comps.noise_scheduler.config))
    theirs = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                     unet=comps.unet, scheduler=DDIMScheduler.from_config(comps.noise_scheduler.config),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    prompt = "a photograph of an astronaut riding a horse"

    def call(pipe, n_steps: int) -> np.ndarray:
        return pipe(prompt, num_inference_steps=n_steps, guidance_scale=7.5, height=resolution, width=resolution,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images

    with torch.inference_mode():
        call(ours, 2), call(theirs, 2)  # warm-up (kernels, allocator)
        times = {"ours": [], "diffusers": []}
        images = {}
        for i in range(repeats):  # alternating order, so that a busy machine slows both alike
            for name, pipe in (("ours", ours), ("diffusers", theirs))[:: 1 if i % 2 == 0 else -1]:
                sync(device)
                t0 = time.perf_counter()
                images[name] = call(pipe, steps)
                sync(device)
                times[name].append(time.perf_counter() - t0)
    result = {"sampler": "ddim", "steps": steps, "batch": 1, "guidance_scale": 7.5, "resolution": resolution,
              "dtype": str(dtype).replace("torch.", ""), "ours_latency_s": statistics.median(times["ours"]),
              "diffusers_latency_s": statistics.median(times["diffusers"]), "ours_s_all": times["ours"],
              "diffusers_s_all": times["diffusers"],
              "max_abs_pixel_diff": float(np.abs(images["ours"] - images["diffusers"]).max())}
    result["diffusers_over_ours"] = result["diffusers_latency_s"] / result["ours_latency_s"]
    if not gpu_settings:
        return result
    try:  # the same call as `python -m pipelines.generate --channels_last [--compile]` makes (outside
        # inference mode: the memory format change makes new parameter tensors)
        applied = ours.enable_gpu_settings(channels_last=True, compile=compile)
        with torch.inference_mode():  # the warm-up call compiles, when asked
            warmup, fast, image = timed_calls(lambda: call(ours, steps), warmup=1, repeats=repeats, device=device)
    finally:  # the next sections get the plain modules back
        uncompile(comps.unet)
        for m in (comps.unet, comps.vae):
            m.to(memory_format=torch.contiguous_format)
    return result | {"gpu_settings": {"applied": applied, "warmup_s": warmup, "latency_s": statistics.median(fast),
                                      "s_all": fast,
                                      "max_abs_pixel_diff_vs_plain": float(np.abs(image - images["ours"]).max())}}


def lora_bench(comps, *, resolution: int, rank: int, steps: int, device: torch.device, dtype: torch.dtype) -> dict:
    """LoRA training at batch 1: the image encoded and the caption embedded every step."""
    from ldm.lora import add_lora, trainable_parameters

    for m in (comps.unet, comps.vae, comps.text_encoder):
        to(m, device, dtype).requires_grad_(False)
    unet = comps.unet
    add_lora(unet, rank)
    unet.train()
    params = trainable_parameters(unet)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    alpha_bar = comps.noise_scheduler.alphas_cumprod.to(device)
    g = torch.Generator("cpu").manual_seed(0)
    image = (torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1).to(device, dtype)
    ids = comps.tokenizer(["a photograph of an astronaut riding a horse"], padding="max_length",
                          max_length=comps.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(device)
    reset_memory(device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            z = comps.vae.encode(image).latent_dist.sample(generator=None) * comps.vae.config.scaling_factor
            context = comps.text_encoder(ids, return_dict=False)[0]
        t = torch.randint(0, len(alpha_bar), (1,), device=device)
        noise = torch.randn_like(z)
        a = alpha_bar[t].view(-1, 1, 1, 1).to(dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, encoder_hidden_states=context, return_dict=False)[0]
        F.mse_loss(pred.float(), noise.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"rank": rank, "batch": 1, "resolution": resolution, "trainable_parameters": sum(p.numel() for p in params),
            "base_dtype": str(dtype).replace("torch.", ""), "step_s": statistics.median(times),
            "peak_memory_bytes": peak_memory(device),
            "peak_memory_gib": None if device.type != "cuda" else peak_memory(device) / 2**30}


def data_loading_bench(device: torch.device, *, resolution: int, num_images: int, batch: int,
                       workers: list[int]) -> dict:
    """The training data loader on its own, no model: a folder of JPEGs larger than `resolution`
    (smooth colour fields with noise, which compress like photos), decoded, resized, randomly
    cropped and flipped (the uncached path: random augmentation rules out cached latents),
    collated, pinned and copied to the device. Images/s for each worker count, over one epoch
    after the first batch (the workers' start)."""
    import tempfile

    import numpy as np
    from PIL import Image

    from ldm.data import checked_folder, training_dataloader

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        height, width = resolution * 3 // 2, resolution * 5 // 4  # portrait, larger than the crop
        ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
        for i in range(num_images):
            colour = rng.uniform(0, 255, (3, 3))  # a linear field per channel
            field = colour[:, 0, None, None] + colour[:, 1, None, None] * ys + colour[:, 2, None, None] * xs
            pixels = np.clip(field.transpose(1, 2, 0) / 2 + rng.normal(0, 12, (height, width, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(f"{tmp}/{i:05d}.jpg", quality=90)
            Path(f"{tmp}/{i:05d}.txt").write_text(f"image {i}")
        data = checked_folder(tmp)
        for n in workers:
            loader, _ = training_dataloader(data, resolution=resolution, batch_size=batch, seed=0, center_crop=False,
                                            random_flip=True, num_workers=n, pin_memory=device.type == "cuda")
            seen, t0 = 0, None
            for k, b in enumerate(loader):
                b["pixel_values"].to(device, non_blocking=device.type == "cuda")
                if k == 0:
                    sync(device)
                    t0 = time.perf_counter()
                else:
                    seen += len(b["index"])
            sync(device)
            rows[str(n)] = {"images_per_s": seen / (time.perf_counter() - t0), "images": seen}
    return {"resolution": resolution, "source_size": [width, height], "batch": batch, "num_images": num_images,
            "pinned": device.type == "cuda", "workers": rows}


def loop_sync_bench(device: torch.device, *, steps: int) -> dict:
    """training/train_ldm.py's own loop (tiny preset, built-in data, the run's defaults: bf16 on a
    GPU) with torch's CUDA sync debug mode on: the host-device syncs of each optimizer step, counted
    between two steps' `StepTally.read` (the first and last steps, with start-up and end-of-run
    work, are left out) and where they come from. On a CPU (--smoke) nothing syncs: the loop only
    runs end to end."""
    import tempfile
    import traceback as tb
    import warnings
    from collections import Counter
    from unittest import mock

    import ldm.step_tally as step_tally
    import training.train_ldm as train_ldm

    events: list[str] = []
    read = step_tally.StepTally.read

    def marked(self, *a, **k):
        events.append("STEP")
        return read(self, *a, **k)

    def on_warning(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            ours = [f for f in tb.extract_stack()[:-1] if f.filename.startswith(str(REPO))]
            events.append(f"{Path(ours[-1].filename).name}:{ours[-1].name}:{ours[-1].lineno}" if ours else "elsewhere")

    cpu = {"ACCELERATE_USE_CPU": "true"} if device.type == "cpu" else {}  # --smoke on a GPU machine: CPU too
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), mock.patch.dict(os.environ, cpu), \
                mock.patch.object(step_tally.StepTally, "read", marked):
            warnings.simplefilter("always")
            warnings.showwarning = on_warning
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            train_ldm.main(["--preset", "tiny", "--output_dir", tmp, "--max_train_steps", str(steps),
                            "--train_batch_size", "8", "--builtin_num_images", "48", "--validation_steps", "0",
                            "--num_validation_images", "0", "--eval_images_per_case", "0", "--report_to", "none"])
            wall = time.perf_counter() - t0
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    marks = [i for i, e in enumerate(events) if e == "STEP"]
    per_step = [events[a + 1:b] for a, b in zip(marks, marks[1:-1])]
    return {"preset": "tiny", "steps": len(marks), "run_s": wall, "counted": device.type == "cuda",
            "syncs_per_step": [len(s) for s in per_step], "target_max": 1,
            "where": dict(Counter(e for s in per_step for e in s))}


# ----------------------------------------------------------------------------- driver
def versions() -> dict:
    import accelerate
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


def git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy size on CPU (tiny preset, a few steps)")
    parser.add_argument("--device", default=None, help="default: cuda when available (always cpu with --smoke)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: 32, smoke 4); halved on OOM")
    parser.add_argument("--budget_s", type=float, default=420.0, help="sections that would run past it are skipped")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_suite_<gpu>_<date>.json)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    budget = Budget(args.budget_s)
    device = torch.device("cpu" if args.smoke else (args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if device.type == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke for the CPU end-to-end check, or on a GPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls outside autocast (AdamW is not one)
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops(name) if device.type == "cuda" else None
    smoke = args.smoke
    preset, resolution = ("tiny", 32) if smoke else ("sd15", 512)
    half = torch.bfloat16 if device.type == "cuda" else None  # CPU smoke: float32 (bf16 is slow without AMX)
    sample_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    from ldm.models import build_components, build_noise_scheduler
    from ldm.presets import model_preset

    result: dict = {"suite": "gpu_suite", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "smoke": smoke, "preset": preset, "resolution": resolution, "commit": git_commit(),
                    "device": {"type": device.type, "name": name, "peak_bf16_tflops": peak,
                               "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda"
                               else None},
                    "versions": versions(), "command": " ".join(["python", "benchmarks/gpu_suite.py", *(argv or sys.argv[1:])]),
                    "benchmarks": {}, "errors": {}}
    t0 = time.perf_counter()
    with torch.device(device):  # initialise the random weights where they will run
        comps = build_components(model_preset(preset), seed=0)
    comps.noise_scheduler = build_noise_scheduler(model_preset(preset).noise)  # its tensors on the CPU, as usual
    result["build_s"] = time.perf_counter() - t0

    def section(key: str, fn, min_left: float) -> None:
        if budget.left() < min_left:
            result["benchmarks"][key] = {"skipped": f"{budget.left():.0f} s of the budget left"}
            return
        t = time.perf_counter()
        try:
            result["benchmarks"][key] = fn() | {"section_s": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
            result["errors"][key] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        reset_memory(device)
        print(f"{key}: {json.dumps(result['benchmarks'].get(key) or result['errors'].get(key))[:400]}", flush=True)

    section("attention", lambda: {"head_dims": head_dims(comps.unet),
                                  "kernels": attention_kernels(head_dims(comps.unet), device)}, 5)

    def train():
        batch = args.batch or (4 if smoke else 32)
        variants = ["eager", "channels_last"] + (["compiled"] if args.compile and not smoke else [])
        while True:
            try:
                return train_step_bench(comps, batch=batch, steps=2 if smoke else 10, warmup=1 if smoke else 3,
                                        device=device, half=half, variants=variants, budget=budget, peak=peak)
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2
                comps.unet.zero_grad(set_to_none=True)
                reset_memory(device)
                print(f"out of memory: batch {batch}", flush=True)

    section("train_step", train, 60)
    section("sampling", lambda: sampling_bench(comps, steps=3 if smoke else 50, resolution=resolution,
                                               repeats=1 if smoke else 3, device=device, dtype=sample_dtype,
                                               gpu_settings=True, compile=args.compile and not smoke), 30)
    section("lora", lambda: lora_bench(comps, resolution=resolution, rank=4, steps=2 if smoke else 5, device=device,
                                       dtype=sample_dtype), 20)
    section("data_loading", lambda: data_loading_bench(device, resolution=resolution, num_images=32 if smoke else 512,
                                                       batch=4 if smoke else 32,
                                                       workers=[0, 2] if smoke else [0, 4, 8, 12]), 30)
    loader, step = result["benchmarks"].get("data_loading", {}), result["benchmarks"].get("train_step", {})
    if "workers" in loader and "variants" in step:  # > 1: the loader outpaces the fastest measured step
        fastest = max((v["images_per_s"] for v in step["variants"].values() if "images_per_s" in v), default=None)
        best = max(w["images_per_s"] for w in loader["workers"].values())
        loader["loader_over_step"] = best / fastest if fastest else None
    section("loop_syncs", lambda: loop_sync_bench(device, steps=4 if smoke else 12), 60)
    result["wall_s"] = time.monotonic() - started
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        f"gpu_suite_{'smoke' if smoke else name.replace(' ', '_')}_{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['wall_s']:.0f} s; errors: {sorted(result['errors']) or 'none'})")
    return result


if __name__ == "__main__":
    main()
