"""Training curves from a run's `train_log.jsonl`: the loss (raw and smoothed), the validation loss
when the log has one, and the learning rate, drawn with matplotlib's Agg backend (no display).

Each log line is one optimizer step, `{"step": 1, "loss": 0.5, "lr": 1e-4, ...}`; a line may carry
`"val_loss"` (alone or beside the loss). Several runs overlay in one figure, one colour each.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ldm.errors import UsageError

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "training_curves.png"


@dataclass
class Curves:
    """One run's series, each a list of (step, value)."""

    name: str
    loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)


def ema_smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with TensorBoard's bias correction: s_t = w s_(t-1) + (1 - w) x_t
    from s_(-1) = 0, divided by 1 - w^(t+1), so the first point is x_0 itself and a constant stays
    constant. `weight` 0 returns the values."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, s = [], 0.0
    for t, x in enumerate(values):
        s = weight * s + (1.0 - weight) * x
        out.append(s / (1.0 - weight ** (t + 1)))
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def read_curves(run_dir: str | Path, name: str | None = None) -> Curves:
    """The loss, validation-loss and learning-rate series of `run_dir/train_log.jsonl`. Non-finite
    values (a skipped update's loss) are left out; a torn last line (a run killed while writing)
    is ignored."""
    run_dir = Path(run_dir)
    path = run_dir / LOG_NAME
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise UsageError(f"{run_dir}: no {LOG_NAME} (not a training run's output folder?)")
    curves = Curves(name or run_dir.name or str(run_dir))
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UsageError(f"{path}:{number}: not a JSON line") from None
        step = record.get("step")
        if not isinstance(step, int):
            raise UsageError(f"{path}:{number}: no integer 'step'")
        for key, series in (("loss", curves.loss), ("val_loss", curves.val_loss), ("lr", curves.lr)):
            if _finite(record.get(key)):
                series.append((step, float(record[key])))
    if not curves.loss and not curves.val_loss:
        raise UsageError(f"{path}: no loss values yet")
    return curves


def plot_curves(runs: list[Curves], out: str | Path, smoothing: float = 0.9) -> Path:
    """Draw `runs` into one PNG at `out`: losses on top (raw faint, smoothed solid, validation
    dashed with markers), the learning rate below on the same steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        if run.loss:
            steps, values = zip(*run.loss)
            loss_ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            loss_ax.plot(steps, ema_smooth(list(values), smoothing), color=colour, linewidth=1.6,
                         label=f"{run.name} (smoothed {smoothing:g})")
        if run.val_loss:
            steps, values = zip(*run.val_loss)
            loss_ax.plot(steps, values, color=colour, linestyle="--", marker="o", markersize=3,
                         label=f"{run.name} validation")
        if run.lr:
            steps, values = zip(*run.lr)
            lr_ax.plot(steps, values, color=colour, linewidth=1.2)
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.grid(alpha=0.3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_runs(run_dirs: list[str | Path], out: str | Path, smoothing: float = 0.9) -> Path:
    """Overlay the curves of several runs in `out`. Runs with the same folder name are labelled
    by their full path."""
    names = [Path(d).name for d in run_dirs]
    labels = [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]
    return plot_curves([read_curves(d, label) for d, label in zip(run_dirs, labels)], out, smoothing)


def write_training_curves(run_dir: str | Path, smoothing: float = 0.9) -> Path:
    """`run_dir/training_curves.png` from `run_dir/train_log.jsonl` (what training calls at every
    validation and at the end)."""
    return plot_runs([run_dir], Path(run_dir) / PLOT_NAME, smoothing)
