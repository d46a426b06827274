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
