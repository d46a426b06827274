"""Process-level settings shared by the entry points."""

from __future__ import annotations

import os

import torch


def use_cpu_cores(num_processes: int, requested: int | None = None) -> int:
    """Give each CPU training process its share of the cores. `accelerate launch` pins
    OMP_NUM_THREADS=1 unless its config says `use_cpu`, which would leave cores idle."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))  # processes on this machine
    threads = requested or max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(threads)
    return threads
