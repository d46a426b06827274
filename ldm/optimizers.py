"""The optimizers `--optimizer` names: AdamW (default), bitsandbytes' 8-bit AdamW, Prodigy and
Schedule-Free AdamW. The last three are optional packages, asked for only when named.

- adamw: torch's AdamW, fused where it can be (`ldm.runtime.make_adamw`).
- adamw8bit: AdamW with its two moments in 8 bits (~75% less optimizer memory; CUDA).
- prodigy: Prodigy (Mishchenko & Defazio 2023) estimates the step size d itself; the learning rate
  is a multiplier of d, 1.0 by convention (0.5 halves it), and the same for every parameter group
  (prodigyopt refuses groups of different rates; `ldm.config.resolve_optimizer` sees to it).
- schedulefree: Schedule-Free AdamW (Defazio et al. 2024) needs no decaying schedule (its warm-up
  is --lr_warmup_steps). It keeps two sequences: the parameters hold y (where the gradient is
  taken) in train mode and x (the average, the weights to evaluate and save) in eval mode, so every
  evaluation and checkpoint happens inside `evaluation_weights`, and the final save after
  `set_train_mode(optimizer, False)`.

Prodigy and Schedule-Free run with a constant LR schedule (`constant_schedule`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch

from ldm.errors import UsageError
from ldm.runtime import make_adamw

logger = logging.getLogger(__name__)

# name -> (import name, pip package)
OPTIMIZERS = {"adamw": (None, None), "adamw8bit": ("bitsandbytes", "bitsandbytes"),
              "prodigy": ("prodigyopt", "prodigyopt"), "schedulefree": ("schedulefree", "schedulefree")}
# Optimizers that set their own step size (or need no decay): the LR schedule is constant.
SELF_SCHEDULED = ("prodigy", "schedulefree")


def check_optimizer(name: str) -> None:
    """A UsageError naming the flag value, or the pip command, unless `name` can be built here
    (found without importing the package, so that it is cheap at startup)."""
    if name not in OPTIMIZERS:
        raise UsageError(f"--optimizer {name!r}: unknown; choose one of {', '.join(OPTIMIZERS)}")
    module, package = OPTIMIZERS[name]
    if module is not None and importlib.util.find_spec(module) is None:
        raise UsageError(f"--optimizer {name} needs the {package} package: pip install {package} "
                         f"(or pip install -e '.[optim]')")


def constant_schedule(name: str) -> bool:
    """Whether `name` runs with a constant LR schedule whatever --lr_scheduler says."""
    return name in SELF_SCHEDULED


def learning_rate_warning(name: str, learning_rate: float) -> str | None:
    """A line for a --learning_rate that looks meant for another optimizer, else None."""
    if name == "prodigy" and learning_rate < 0.1:
        return (f"--optimizer prodigy: --learning_rate {learning_rate:g} multiplies the step size Prodigy "
                "estimates (1.0 by convention); an AdamW-sized rate makes every step that much smaller")
    return None


def make_optimizer(name: str, groups: list[dict], *, betas: tuple[float, float], weight_decay: float,
                   warmup_steps: int = 0) -> torch.optim.Optimizer:
    """The optimizer `name` over parameter `groups` (each with its "lr"). `warmup_steps` is
    Schedule-Free's own linear warm-up (the others take it from the LR schedule). A Schedule-Free
    optimizer is returned in train mode, ready to step."""
    check_optimizer(name)
    if name in ("adamw", "adamw8bit"):
        return make_adamw(groups, eight_bit=name == "adamw8bit", betas=betas, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # decoupled weight decay, as AdamW's
        return Prodigy(groups, betas=betas, weight_decay=weight_decay, decouple=True)
    from schedulefree import AdamWScheduleFree

    optimizer = AdamWScheduleFree(groups, betas=betas, weight_decay=weight_decay, warmup_steps=warmup_steps)
    optimizer.train()
    return optimizer


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer


def is_schedule_free(optimizer) -> bool:
    return type(_inner(optimizer)).__module__.split(".")[0] == "schedulefree"


def in_train_mode(optimizer) -> bool:
    """Schedule-Free: whether the parameters hold y (train mode); any other optimizer: True."""
    return not is_schedule_free(optimizer) or bool(_inner(optimizer).param_groups[0]["train_mode"])


def set_train_mode(optimizer, train: bool) -> None:
    """Schedule-Free: move the parameters to y (train) or x (eval); no-op for other optimizers or
    when already there. Every process must do the same (the move rounds, slightly)."""
    if is_schedule_free(optimizer) and in_train_mode(optimizer) != train:
        _inner(optimizer).train() if train else _inner(optimizer).eval()


@contextlib.contextmanager
def evaluation_weights(optimizer, *, restore: bool = True):
    """Schedule-Free: the parameters hold x (the weights to evaluate or save) inside the block; no-op
    for other optimizers or when already in eval mode (it stays so).

    After the block, train mode again: with `restore`, y exactly as it was (a copy), so evaluating
    changes no bit of training; without, y computed again from x, which is what a run resumed from
    a checkpoint (which holds x) computes: checkpoint saves use that, so resuming is exact."""
    if not is_schedule_free(optimizer) or not in_train_mode(optimizer):
        yield
        return
    inner = _inner(optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params] if restore else []
    inner.eval()
    try:
        yield
    finally:
        inner.train()
        with torch.no_grad():
            for p, y in zip(params, saved):
                p.copy_(y)
