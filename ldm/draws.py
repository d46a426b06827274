"""The random draws of a training step, one generator per sample.

Each sample's generator is seeded from (run seed, optimizer step, the sample's index in the data
set), so what a sample draws (posterior noise, diffusion noise, timestep, caption dropout, which
of its captions) does not depend on the batch it landed in, the number of processes, gradient
accumulation, data-loader workers or a resume. One process with global batch B and two with B/2
each therefore train on exactly the same draws (tests/test_reliability.py checks the weights).
Generators live on the CPU; draws are moved to the compute device (tiny next to a forward pass)
by `to_device`, which never makes the host wait for the device.
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


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor.to(device)` without a host-device sync. A plain copy from (pageable) CPU memory to a
    CUDA device waits for every kernel already queued; staged in pinned memory, the copy is queued
    like a kernel and the host runs on (torch's pinned allocator keeps the buffer until it is done)."""
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def randn(shape: Sequence[int], generators: torch.Generator | list[torch.Generator] | None,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, ...) standard normal, as diffusers' `randn_tensor`: row b drawn from generators[b] (a list),
    or all from one generator (None: the device's default one). Drawn where the generator lives,
    then moved by `to_device`."""
    if isinstance(generators, list) and len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    first = generators[0] if isinstance(generators, list) else generators
    where = first.device if first is not None else torch.device(device)
    return to_device(randn_tensor(tuple(shape), generator=generators, device=where, dtype=dtype), device)


def sample_posterior(posterior, generators: list[torch.Generator]) -> torch.Tensor:
    """z ~ q(z|x): diffusers' `DiagonalGaussianDistribution.sample` (mean + std * eps), eps from `randn`."""
    params = posterior.parameters
    return posterior.mean + posterior.std * randn(posterior.mean.shape, generators, params.device, params.dtype)


def categorical(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """(B,) long: one index per generator, drawn with probabilities `probs` (K,)."""
    probs = probs.detach().cpu()
    return torch.cat([torch.multinomial(probs, 1, generator=g) for g in generators])
