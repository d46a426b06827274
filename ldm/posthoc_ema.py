"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, Section 3 and Appendix C.1-C.2).

Training keeps two power-function EMAs of the weights and saves their snapshots now and then;
after training, the EMA of any other length is a linear combination of the snapshots, with
weights found by least squares between the EMA profiles (how much each training step counts).

A power-function EMA with exponent gamma averages the weights theta_tau of steps tau = 1..t with
the density p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) (Eq. 2). Its length is given by
sigma_rel, the profile's standard deviation relative to t (Eq. 3):

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).

Stepped with beta(t) = (1 - 1/t)^(gamma + 1) (Eq. 4), the weight of step tau at step t is exactly
(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): the density integrated over (tau - 1, tau]. So
with the weights seen as constant between steps, the inner products of profiles below are the
exact ones, and the reconstruction's only error is that of the least-squares fit.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.errors import UsageError

DEFAULT_SIGMA_RELS = (0.05, 0.10)  # EDM2's two training profiles
MAX_SIGMA_REL = 1 / math.sqrt(12)  # gamma = 0: a uniform average of every step so far
SNAPSHOT_DIR = "posthoc_ema"  # in the run's --output_dir: never rotated away with the checkpoints


# --------------------------------------------------------------------------------------------
# The maths (pure functions)
# --------------------------------------------------------------------------------------------
def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent `gamma` (Eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative std `sigma_rel` (0 < sigma_rel <= 1/sqrt(12)).

    Eq. 3 rearranged with s = sigma_rel^-2: (gamma + 2)^2 (gamma + 3) = s (gamma + 1), i.e. the cubic
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0, whose largest real root is the one."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}], got {sigma_rel}")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_beta(t: int, gamma: float) -> float:
    """The decay of the update at step t = 1, 2, ... (Eq. 4): ema <- beta ema + (1 - beta) theta_t.
    beta(1) = 0, so the EMA starts at the first step's weights."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_inner_products(t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor,
                           gamma_b: torch.Tensor) -> torch.Tensor:
    """<p_a, p_b> = integral over tau of the two profiles' densities (broadcast, float64).

    With t_a <= t_b: integral_0^t_a (a+1) tau^a / t_a^(a+1) * (b+1) tau^b / t_b^(b+1) dtau
                   = (a+1)(b+1) (t_a/t_b)^b / ((a+b+1) t_b);  symmetric otherwise."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(x, dtype=torch.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    a_first = t_a <= t_b
    t_short, t_long = torch.where(a_first, t_a, t_b), torch.where(a_first, t_b, t_a)
    gamma_long = torch.where(a_first, gamma_b, gamma_a)  # the exponent of the longer profile
    return ((gamma_a + 1) * (gamma_b + 1) * (t_short / t_long) ** gamma_long
            / ((gamma_a + gamma_b + 1) * t_long))


def solve_weights(t: torch.Tensor, gamma: torch.Tensor, target_t: float,
                  target_gamma: float) -> tuple[torch.Tensor, float]:
    """Least squares (Appendix C.2): the weights x (n,) of n snapshot profiles (steps `t`, exponents
    `gamma`, each (n,)) whose sum is closest in L2 to the target profile, and the relative error
    ||sum_i x_i p_i - p_target|| / ||p_target|| of that fit (0: exact).

    Normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>."""
    t, gamma = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(gamma, dtype=torch.float64)
    A = profile_inner_products(t[:, None], gamma[:, None], t[None, :], gamma[None, :])  # (n, n)
    b = profile_inner_products(t, gamma, torch.tensor(target_t), torch.tensor(target_gamma))  # (n,)
    x = torch.linalg.solve(A, b)
    c = profile_inner_products(target_t, target_gamma, target_t, target_gamma)  # ||p_target||^2
    residual = (c - 2 * b @ x + x @ A @ x).clamp(min=0)
    return x, float((residual / c).sqrt())


# --------------------------------------------------------------------------------------------
# During training: the profiles, their checkpointed state and their snapshots
# --------------------------------------------------------------------------------------------
def named_trainable(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """"<module>.<parameter>" -> parameter, for every trained parameter of `modules` (name -> module)."""
    return {f"{m}.{n}": p for m, module in modules.items() for n, p in module.named_parameters() if p.requires_grad}


class PowerEMA:
    """Power-function EMAs of a set of named parameters, one per sigma_rel (Eq. 4), stepped
    together. The EMAs are kept in float32 (float64 parameters: float64) on the parameters' device."""

    def __init__(self, params: dict[str, torch.Tensor], sigma_rels: tuple[float, ...] = DEFAULT_SIGMA_RELS):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.names = list(params)
        self.t = 0  # updates so far
        self.profiles = [{n: p.detach().to(_ema_dtype(p), copy=True) for n, p in params.items()}
                         for _ in self.sigma_rels]

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor]) -> None:
        """One update of every profile with the current weights (call after each optimizer step)."""
        self.t += 1
        current = [params[n].detach().to(_ema_dtype(params[n])) for n in self.names]
        for gamma, profile in zip(self.gammas, self.profiles):
            torch._foreach_lerp_(list(profile.values()), current, 1.0 - power_ema_beta(self.t, gamma))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors): the step count, the sigma_rels and every profile."""
        state = {"t": torch.tensor(self.t, dtype=torch.int64),
                 "sigma_rels": torch.tensor(self.sigma_rels, dtype=torch.float64)}
        for i, profile in enumerate(self.profiles):
            state.update({f"{i}.{n}": v for n, v in profile.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = tuple(state["sigma_rels"].tolist())
        if saved != self.sigma_rels:
            raise UsageError(f"the checkpoint's post-hoc EMA has --posthoc_ema_sigma_rels {list(saved)}, this run "
                             f"{list(self.sigma_rels)}: resume with the same values")
        for i, profile in enumerate(self.profiles):
            for n, v in profile.items():
                if f"{i}.{n}" not in state:
                    raise UsageError(f"the checkpoint's post-hoc EMA has no {n}: it was saved by another model")
                v.copy_(state[f"{i}.{n}"])
        self.t = int(state["t"])


def _ema_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def snapshot_due(step: int, every: int) -> bool:
    """Whether step `step` saves snapshots, every `every` steps (0: never)."""
    return every > 0 and step % every == 0


def snapshot_path(folder: str | Path, step: int, sigma_rel: float) -> Path:
    return Path(folder) / f"{step:07d}-{sigma_rel:.3f}.safetensors"


def save_snapshots(ema: PowerEMA, folder: str | Path, step: int) -> list[Path]:
    """One file per profile, `<step>-<sigma_rel>.safetensors` (the weights, by "<module>.<parameter>";
    metadata: step, t, sigma_rel, gamma), each written atomically. Main process only."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sigma_rel, gamma, profile in zip(ema.sigma_rels, ema.gammas, ema.profiles):
        path = snapshot_path(folder, step, sigma_rel)
        tmp = path.with_name(path.name + ".tmp")
        meta = {"step": str(step), "t": str(ema.t), "sigma_rel": repr(sigma_rel), "gamma": repr(gamma)}
        try:
            save_file({n: v.detach().contiguous().cpu() for n, v in profile.items()}, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except Exception as err:  # safetensors reports a full disk as its own error type
            tmp.unlink(missing_ok=True)
            if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
                raise UsageError(f"no space left on the device of {folder} while writing the post-hoc EMA "
                                 f"snapshot {path.name}; free some space, then resume with "
                                 "--resume_from_checkpoint latest") from err
            raise
        paths.append(path)
    return paths


def prune_snapshots(folder: str | Path, after_step: int) -> list[Path]:
    """Remove the snapshots of steps after `after_step` (the step a run starts or resumes from:
    later ones belong to a run that is being redone or replaced). Main process only."""
    folder = Path(folder)
    found = sorted(folder.glob("*.safetensors*")) if folder.is_dir() else []  # .tmp: a write cut short
    doomed = [p for p in found if _step_of(p.name) > after_step]
    for p in doomed:
        p.unlink()
    return doomed


def _step_of(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


# --------------------------------------------------------------------------------------------
# After training: the reconstruction
# --------------------------------------------------------------------------------------------
def read_snapshots(folder: str | Path) -> list[dict]:
    """{"path", "step", "t", "sigma_rel", "gamma"} of every snapshot in `folder`, by step then sigma_rel."""
    found = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as err:  # safetensors' own error type for a damaged file
            raise UsageError(f"{path}: not a readable safetensors file ({err})") from None
        try:
            found.append({"path": path, "step": int(meta["step"]), "t": int(meta["t"]),
                          "sigma_rel": float(meta["sigma_rel"]), "gamma": float(meta["gamma"])})
        except (KeyError, ValueError):
            raise UsageError(f"{path}: not a post-hoc EMA snapshot (no step, t, sigma_rel, gamma metadata)") from None
    return sorted(found, key=lambda s: (s["step"], s["sigma_rel"]))


def reconstruct(snapshots: list[dict], sigma_rel: float, target_t: int | None = None
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA of length `sigma_rel` at step count `target_t` (default: the last snapshot's) as
    sum_i x_i * snapshot_i (float32), reading one snapshot file at a time; and what was done
    (sigma_rel, gamma, t, the snapshots used, the weights, the profile's relative fit error)."""
    if not snapshots:
        raise ValueError("no snapshots to reconstruct from")
    target_t = target_t or max(s["t"] for s in snapshots)
    gamma = sigma_rel_to_gamma(sigma_rel)
    x, fit_error = solve_weights(torch.tensor([s["t"] for s in snapshots], dtype=torch.float64),
                                 torch.tensor([s["gamma"] for s in snapshots]), target_t, gamma)
    total: dict[str, torch.Tensor] = {}
    for weight, snap in zip(x.tolist(), snapshots):
        for name, tensor in load_file(str(snap["path"])).items():
            acc = total.setdefault(name, torch.zeros_like(tensor, dtype=torch.float64))
            acc.add_(tensor.to(torch.float64), alpha=weight)  # float64 sum: the weights may cancel
    info = {"sigma_rel": sigma_rel, "gamma": gamma, "t": target_t, "snapshots": len(snapshots),
            "steps": sorted({s["step"] for s in snapshots}), "weights": [round(w, 6) for w in x.tolist()],
            "profile_fit_error": fit_error}
    return {n: v.float() for n, v in total.items()}, info


@torch.no_grad()
def load_into(modules: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor], source: str = "the snapshots"
              ) -> None:
    """Copy "<module>.<parameter>" weights into `modules` (name -> module), in place; a weight
    with no parameter of that name and shape is a UsageError naming it (snapshots of another model)."""
    for key, value in weights.items():
        module_name, _, name = key.partition(".")
        try:
            param = modules[module_name].get_parameter(name)
        except (KeyError, AttributeError):
            raise UsageError(f"{source}: the snapshots hold {key}, which this pipeline does not have") from None
        if param.shape != value.shape:
            raise UsageError(f"{source}: {key} is {tuple(value.shape)} in the snapshots, {tuple(param.shape)} "
                             "in the pipeline")
        param.copy_(value)
