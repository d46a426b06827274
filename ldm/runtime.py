"""Process-level settings shared by the entry points."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import torch

logger = logging.getLogger(__name__)


THREADS_ENV = "LDM_CPU_THREADS"


def use_cpu_cores(num_processes: int, requested: int | None = None) -> int:
    """Give each CPU training process its share of the cores. `accelerate launch` pins
    OMP_NUM_THREADS=1 unless its config says `use_cpu`, which would leave cores idle, so that
    variable is not read; `requested` (--cpu_threads), else $LDM_CPU_THREADS, else
    cores / processes on this machine. Set LDM_CPU_THREADS where other jobs share the cores:
    OpenMP threads that outnumber the free cores spin against each other and can make a run
    several times slower (benchmarks/results/README.md, "CPU step studies")."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))  # processes on this machine
    threads = requested or cpu_threads_from_env() or max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(threads)
    return threads


def cpu_threads_from_env() -> int | None:
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return int(value)


class StopRequested(Exception):
    """Raised inside long loops (latent caching, validation sampling) once a stop was asked for."""


class GracefulStop:
    """SIGTERM / SIGINT set a flag instead of killing the process; the training loop checks it at
    step boundaries, commits one checkpoint and exits 0. Launchers (torchrun, SLURM, Kubernetes)
    send SIGKILL ~30 s after SIGTERM, so nothing slow may happen after the flag is seen.
    A second signal is logged and otherwise ignored, so it cannot interrupt the save."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signum: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            logger.warning("received %s: stopping at the next step boundary with a checkpoint",
                           signal.Signals(signum).name)
        else:
            logger.warning("received %s again: already stopping", signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """For loops that cannot stop cleanly half-way: raise StopRequested."""
        if self.requested:
            raise StopRequested

    def agreed(self, accelerator: Any) -> bool:
        """True on every process once any process was signalled (one tiny all-reduce)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_adamw(groups: list[dict], *, eight_bit: bool = False, **kwargs) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: ~75% less optimizer memory;
    needs the optional `bnb` extra and, for its kernels, a CUDA device).

    torch's AdamW runs fused (one kernel for all parameters) when every parameter is a
    floating-point tensor on CPU or CUDA: the same update maths, several times faster than the
    per-tensor loop on the tiny U-Net (benchmarks/results/README.md, "CPU step studies")."""
    if not eight_bit:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("--use_8bit_adam needs bitsandbytes: pip install -e '.[bnb]'") from e
    return bnb.optim.AdamW8bit(groups, **kwargs)


# --------------------------------------------------------------------------------------------
# GPU settings: precision, TF32, memory format, compilation (each a no-op or off on CPU)
# --------------------------------------------------------------------------------------------
def requested_mixed_precision(flag: str | None, env_value: str | None) -> str:
    """What the user asked for: --mixed_precision, else accelerate's setting
    (ACCELERATE_MIXED_PRECISION, from `accelerate launch`'s config), else "auto". The env value
    "no" counts as unset: it is what our own accelerate_config.yaml (and accelerate's default)
    writes, so only an explicit `--mixed_precision no` turns bf16 off on a GPU."""
    if flag not in (None, "auto"):
        return flag
    env_value = (env_value or "").strip().lower()
    return env_value if env_value not in ("", "no") else "auto"


def resolve_mixed_precision(asked: str, device_type: str, bf16_supported: bool) -> str:
    """The mixed precision that runs. "auto": bf16 on a CUDA device that supports it, else "no"
    (float32; CPU results are unchanged). fp16 needs a GPU (accelerate would silently run float32
    on a CPU), so it is "no" there; anything else explicit is kept."""
    if asked == "auto":
        return "bf16" if device_type == "cuda" and bf16_supported else "no"
    if asked == "fp16" and device_type == "cpu":
        return "no"
    return asked


def enable_tf32(device: torch.device) -> bool:
    """On CUDA, float32 matmuls and cuDNN convolutions run on TF32 tensor cores (10-bit mantissa
    inputs, float32 accumulation: the precision PyTorch calls "high"). Logged; False elsewhere."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    logger.info("TF32 matmuls and cuDNN convolutions enabled on %s", device)
    return True


def use_channels_last(asked: bool | None, device: torch.device) -> bool:
    """--channels_last, by default on for CUDA (NHWC convolutions use tensor cores without
    transposes) and off on CPU, where it was measured no faster."""
    return device.type == "cuda" if asked is None else asked


def compile_repeated_blocks(model: torch.nn.Module, *, fullgraph: bool = False) -> int:
    """Regional compilation: torch.compile each repeated block of `model` in place (its
    parameters and state_dict keys unchanged), so compile time is that of one block per shape
    rather than the whole U-Net. diffusers' `compile_repeated_blocks` when the model declares its
    repeated blocks, else every BasicTransformerBlock and ResnetBlock2D. Returns the block count."""
    names = set(getattr(model, "_repeated_blocks", None) or ()) or {"BasicTransformerBlock", "ResnetBlock2D"}
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if hasattr(model, "compile_repeated_blocks") and getattr(model, "_repeated_blocks", None) and blocks:
        model.compile_repeated_blocks(fullgraph=fullgraph)
    else:
        for block in blocks:
            block.compile(fullgraph=fullgraph)
    return len(blocks)


def gpu_settings(unet: torch.nn.Module, vae: torch.nn.Module, device: torch.device, *,
                 channels_last: bool | None, torch_compile: bool) -> dict:
    """TF32, the memory format of the U-Net and the VAE (which encodes the data), and regional
    compilation of the U-Net, before `accelerator.prepare`. One log line; returns what was applied."""
    applied = {"tf32": enable_tf32(device), "channels_last": use_channels_last(channels_last, device),
               "compiled_blocks": 0}
    if applied["channels_last"]:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if torch_compile:
        applied["compiled_blocks"] = compile_repeated_blocks(unet)
    logger.info("GPU settings: TF32 %s, channels_last %s, torch.compile %s", "on" if applied["tf32"] else "off",
                "on" if applied["channels_last"] else "off",
                f"{applied['compiled_blocks']} U-Net blocks" if torch_compile else "off")
    return applied


def effective_global_batch(cfg: Any, num_processes: int, num_examples: int) -> int:
    """Samples per optimizer step; a data set smaller than one batch makes every step use all of it (warned)."""
    asked = cfg.train_batch_size * num_processes * cfg.gradient_accumulation_steps
    if num_examples >= cfg.train_batch_size * num_processes:
        return asked
    logger.warning("the data set has %d examples, fewer than one batch (%d x %d processes): every step uses "
                   "those %d (global batch %d, not %d)", num_examples, cfg.train_batch_size, num_processes,
                   num_examples, num_examples * cfg.gradient_accumulation_steps, asked)
    return num_examples * cfg.gradient_accumulation_steps


def throughput(wall_s: float, steps: int, global_batch: int, device: torch.device) -> dict:
    """run_info's speed figures: wall time from start-up to the end of training, steps and images
    per second of it, and peak memory (the accelerator's allocations, else the CPU resident set)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"wall_time_s": round(wall_s, 1), "steps_per_s": round(steps / wall_s, 3),
            "images_per_s": round(steps * global_batch / wall_s, 2), "peak_memory_mb": round(peak, 1)}
