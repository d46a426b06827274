"""Plot training curves (loss smoothed, validation loss, learning rate) of one run or several overlaid.

    python training/plot_run.py outputs/ldm                       # -> outputs/ldm/training_curves.png
    python training/plot_run.py outputs/ldm outputs/ldm-lora --out compare.png

Reads each RUN_DIR/train_log.jsonl (one line per optimizer step, written by train_ldm.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.errors import UsageError, run_cli
from ldm.plots import PLOT_NAME, plot_runs


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training output folder(s)")
    parser.add_argument("--out", default=None,
                        help=f"PNG to write (default: RUN_DIR/{PLOT_NAME} for one run, ./{PLOT_NAME} for several)")
    parser.add_argument("--smoothing", type=float, default=0.9, help="EMA weight of the smoothed loss, in [0, 1)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.smoothing < 1.0:
        raise UsageError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    out = args.out or (Path(args.run_dirs[0]) / PLOT_NAME if len(args.run_dirs) == 1 else Path(PLOT_NAME))
    if Path(out).suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the plot is a PNG; name it *.png")
    path = plot_runs(args.run_dirs, out, args.smoothing)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(main)
