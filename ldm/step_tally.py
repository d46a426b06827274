"""What a training step tells the host, read once per optimizer step.

On a GPU every read of a device value (`.item()`, `.tolist()`, `if tensor:`) makes the host wait
until the queue is empty, and the GPU then idles while the host prepares what comes next. The
training loop therefore keeps everything it needs to know on the device (is every loss finite,
their sum, the gradient norm) and reads it in one go after clipping, where the decision to apply
or skip the update has to be made. With several processes the same read carries each process's
sample indices and stop request in one all-gather, so that every process takes the same decision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ldm.draws import to_device


@dataclasses.dataclass(frozen=True)
class StepReport:
    update: bool  # every process's losses and the gradient norm were finite: apply the update
    loss: float  # mean of the step's finite micro-batch losses over all processes (0.0 when none was)
    indices: list[int]  # every process's sample indices, micro-batch by micro-batch, process by process
    stop: bool  # some process was asked to stop


class StepTally:
    """`add` each micro-batch (no host read), `read` once at each optimizer step."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._reset()

    def _reset(self) -> None:
        self.stats = torch.zeros(3, device=self.device)  # non-finite losses, sum of the finite ones, their count
        self.indices: list[list[int]] = []

    def add(self, loss: torch.Tensor, indices: Sequence[int]) -> None:
        """One micro-batch: its scalar loss (stays on the device) and its sample indices (host ints)."""
        loss = loss.detach().float().reshape(())
        finite = torch.isfinite(loss)
        self.stats += torch.stack([(~finite).float(), torch.where(finite, loss, 0.0), finite.float()])
        self.indices.append([int(i) for i in indices])

    def read(self, num_processes: int, gather, grad_norm: torch.Tensor | None, stop: bool) -> StepReport:
        """The step's one host-device sync. `gather`: `accelerator.gather` (each process's 1-D tensor,
        concatenated; used when `num_processes` > 1). `grad_norm`: the total gradient norm after
        clipping; None where it is not a skip criterion (fp16's grad scaler skips overflowing steps
        itself; DeepSpeed clips inside its step). `stop`: this process's stop request."""
        bad_grad = (torch.zeros(1, device=self.device) if grad_norm is None
                    else (~torch.isfinite(grad_norm.detach().float())).float().reshape(1).to(self.device))
        local = torch.cat([self.stats, bad_grad])
        sizes = [len(b) for b in self.indices]
        flat = [i for b in self.indices for i in b]
        if num_processes == 1:
            n_bad, total, count, grad_bad = local.tolist()
            indices, stop_any = flat, stop
        else:  # float64 holds sample indices exactly up to 2**53; every process has the same sizes
            host = torch.tensor([float(stop), *flat], dtype=torch.float64)
            rows = gather(torch.cat([local.double(), to_device(host, self.device)]))
            rows = rows.reshape(num_processes, -1).tolist()
            n_bad, total, count = (sum(r[k] for r in rows) for k in range(3))
            grad_bad = max(r[3] for r in rows)
            stop_any = any(r[4] for r in rows)
            per_process = [[int(i) for i in r[5:]] for r in rows]
            indices, start = [], 0
            for size in sizes:  # micro-batch by micro-batch, as the processes trained them
                for own in per_process:
                    indices += own[start:start + size]
                start += size
        self._reset()
        return StepReport(update=n_bad == 0 and grad_bad == 0, loss=total / max(count, 1), indices=indices,
                          stop=bool(stop_any))
