"""The random draws of a training step, one generator per sample.

Each sample's generator is seeded from (run seed, optimizer step, the sample's index in the data
set), so what a sample draws (posterior noise, diffusion noise, timestep, caption dropout, which
of its captions) does not depend on the batch it landed in, the number of processes, gradient
accumulation, data-loader workers or a resume. One process with global batch B and two with B/2
each therefore train on exactly the same draws (tests/test_reliability.py checks the weights).
Generators live on the CPU; draws are moved to the compute device (tiny next to a forward pass).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed from (seed, step, index); independent streams for nearby keys."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generators(seed: int, step: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample of the batch."""
    return [torch.Generator().manual_seed(sample_seed(seed, step, int(i))) for i in indices]


def randn(shape: Sequence[int], generators: list[torch.Generator], device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, ...) standard normal, row b drawn from generators[b] (diffusers' `randn_tensor`)."""
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    return randn_tensor(tuple(shape), generator=generators, device=torch.device(device), dtype=dtype)


def categorical(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """(B,) long: one index per generator, drawn with probabilities `probs` (K,)."""
    probs = probs.detach().cpu()
    return torch.cat([torch.multinomial(probs, 1, generator=g) for g in generators])
