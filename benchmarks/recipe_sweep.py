"""Seed sweep of training recipes on the built-in data: held-out accuracy per recipe and seed.

One recipe is a name and the flags it adds to `training/train_ldm.py` (none: the default run).
Every (recipe, seed) pair is trained and scored on the held-out compositions; runs go
`--parallel` at a time (on a GPU several tiny runs share it; on 2 CPU cores use 1). Prints a
table and the mean / min per recipe, and writes `sweep.json` beside the runs.

    python benchmarks/recipe_sweep.py --out outputs/sweep --seeds 0 1 2 \\
        --recipe default= --recipe lr5e-4="--learning_rate 5e-4"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_recipe(text: str) -> tuple[str, list[str]]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--recipe wants NAME=FLAGS, got {text!r}")
    name, flags = text.split("=", 1)
    return name, shlex.split(flags)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="outputs/sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", type=parse_recipe, action="append", default=None,
                        help="NAME=FLAGS (repeatable); default: the default run only")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--common", default="", help="flags added to every run")
    args = parser.parse_args(argv)
    recipes = args.recipe or [("default", [])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    jobs = [(name, flags, seed) for name, flags in recipes for seed in args.seeds]
    # Earlier sweeps into the same folder are kept: the summary covers every recipe run there.
    previous = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
    pending, running, results = list(jobs), [], dict(previous.get("runs", {}))
    flags_of = {name: f["flags"] for name, f in previous.get("summary", {}).items()}
    flags_of.update(dict(recipes))
    while pending or running:
        while pending and len(running) < args.parallel:
            name, flags, seed = pending.pop(0)
            run_dir = out / f"{name}-seed{seed}"
            cmd = [sys.executable, str(ROOT / "training" / "train_ldm.py"), "--output_dir", str(run_dir),
                   "--seed", str(seed), "--checkpointing_steps", "0", "--validation_steps", "0",
                   "--report_to", "none", *shlex.split(args.common), *flags]
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "sweep.log", "w")
            running.append((name, seed, run_dir, time.perf_counter(),
                            subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1.0)
        for job in list(running):
            name, seed, run_dir, start, proc, log = job
            if proc.poll() is None:
                continue
            running.remove(job)
            log.close()
            report_path = run_dir / "eval" / "eval.json"
            if proc.returncode != 0 or not report_path.exists():
                tail = (run_dir / "sweep.log").read_text()[-2000:]
                print(f"{name} seed {seed}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
                results[f"{name}/{seed}"] = {"recipe": name, "seed": seed, "failed": proc.returncode}
                continue
            report = json.loads(report_path.read_text())
            row = {"recipe": name, "seed": seed, "wall_s": round(time.perf_counter() - start, 1),
                   **{k: report[k] for k in ("color", "shape", "position", "all")}}
            results[f"{name}/{seed}"] = row
            print(f"{name:>16} seed {seed}: all {row['all']:.1%}  colour {row['color']:.1%}  shape {row['shape']:.1%}"
                  f"  position {row['position']:.1%}  ({row['wall_s']} s)", flush=True)

    print("\nrecipe            mean all   min all   colour   shape   position   seeds")
    summary = {}
    for name, flags in flags_of.items():
        rows = [r for r in results.values() if r["recipe"] == name and "all" in r]
        if not rows:
            continue
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("color", "shape", "position", "all")}
        summary[name] = {"flags": flags, **mean, "min_all": min(r["all"] for r in rows), "runs": len(rows)}
        print(f"{name:<16} {mean['all']:>8.1%} {summary[name]['min_all']:>9.1%} {mean['color']:>8.1%}"
              f" {mean['shape']:>7.1%} {mean['position']:>10.1%}   {len(rows)}")
    (out / "sweep.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
