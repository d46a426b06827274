"""The exponential moving average of the trained weights (--use_ema): diffusers' EMAModel, with
its foreach update done in one pass.

diffusers' foreach `EMAModel.step` computes s <- s - (1 - d)(s - p) as two passes over every
parameter plus a temporary copy of them all (`_foreach_sub`, then `_foreach_sub_`).
`torch._foreach_lerp_(s, p, w)` computes s + w (p - s) in one pass with no temporary. For w < 0.5
that is the same number bit for bit (p - s = -(s - p) and w (-x) = -(w x) exactly; torch's lerp
uses this formula below 0.5, tests/test_ema.py checks it); from w = 0.5 up, which only the first
two warm-up steps reach (w = 1, 0.63; then 0.48, 0.40, ...), lerp switches formula, so those two
keep diffusers' step.
Measured in benchmarks/results/README.md ("Issue 21: per-step overhead against a minimal step").

Everything else (decay and warm-up, state_dict, store / copy_to / restore) is diffusers'.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel


def deepspeed_zero3() -> bool:
    """Whether DeepSpeed ZeRO-3 shards the parameters (diffusers' own step gathers them then)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


def lerp_is_exact(weight: float) -> bool:
    """Whether lerp(s, p, weight) gives the bits of diffusers' s - weight (s - p): below 0.5."""
    return abs(weight) < 0.5


def same_kind(shadow: list[torch.Tensor], parameters: list[torch.Tensor]) -> bool:
    """Whether every shadow tensor has its parameter's dtype and device (what one lerp pass needs)."""
    return len(shadow) == len(parameters) and all(s.dtype == p.dtype and s.device == p.device
                                                  for s, p in zip(shadow, parameters))


class TrainingEMA(EMAModel):
    """diffusers' EMAModel (foreach) whose step is one in-place lerp pass where that is exact."""

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        weight = 1 - self.get_decay(self.optimization_step + 1)  # what diffusers' step will use
        if not self.foreach or not lerp_is_exact(weight) or deepspeed_zero3() or not same_kind(self.shadow_params,
                                                                                                 parameters):
            return super().step(parameters)
        self.optimization_step += 1
        self.cur_decay_value = 1 - weight
        frozen = [(s, p) for s, p in zip(self.shadow_params, parameters) if not p.requires_grad]
        if frozen:  # as diffusers: parameters that are not trained are copied
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen], non_blocking=True)
        trained = [(s, p) for s, p in zip(self.shadow_params, parameters) if p.requires_grad]
        if trained:
            torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], weight)
