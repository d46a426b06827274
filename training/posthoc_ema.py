"""Rebuild the EMA of any length from a `--posthoc_ema` run's snapshots (Karras et al. 2024, EDM2,
Appendix C.2) and write it as a pipeline, saved as the run saved its own.

    python training/posthoc_ema.py --run outputs/ldm --sigma_rel 0.08 --output_dir outputs/ldm-ema0.08

The run's saved pipeline is the base (VAE, tokenizer, scheduler, frozen parts); its trained
weights are replaced by the least-squares combination of the snapshots in <run>/posthoc_ema/.
The new folder gets the run's training log, run_info.json (with a "posthoc_ema" entry), the model
card and, for a run on the built-in data, the held-out score (eval/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python training/posthoc_ema.py` runs this as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.errors import UsageError, existing_folder, run_cli

logger = logging.getLogger("posthoc_ema")
FIT_WARNING = 0.05  # relative L2 error of the rebuilt profile above which the result is only approximate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", required=True, help="output folder of a finished run trained with --posthoc_ema")
    parser.add_argument("--sigma_rel", type=float, required=True,
                        help="EMA length as a fraction of training (the EMA profile's std / its step); the run "
                             "kept 0.05 and 0.10 by default")
    parser.add_argument("--output_dir", required=True, help="new folder for the pipeline")
    parser.add_argument("--eval_images_per_case", type=int, default=None,
                        help="held-out evaluation (built-in data only; 0: skip) (default: the run's)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[Path, list[dict], Path]:
    """The run folder, its snapshots and the output folder; a UsageError naming the flag otherwise."""
    from ldm.posthoc_ema import MAX_SIGMA_REL, SNAPSHOT_DIR, read_snapshots

    run = existing_folder("--run", args.run)
    if not 0 < args.sigma_rel <= MAX_SIGMA_REL:
        raise UsageError(f"--sigma_rel {args.sigma_rel}: must be in (0, {MAX_SIGMA_REL:.4f}] "
                         "(larger values would weigh early training most)")
    folder = run / SNAPSHOT_DIR
    snapshots = read_snapshots(folder) if folder.is_dir() else []
    if not snapshots:
        raise UsageError(f"--run {args.run}: no post-hoc EMA snapshots in {folder} (train with --posthoc_ema)")
    if not (run / "model_index.json").is_file() or not (run / "train_config.yaml").is_file():
        raise UsageError(f"--run {args.run}: no saved pipeline (model_index.json, train_config.yaml); finish the "
                         "run first (--resume_from_checkpoint latest)")
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--output_dir {args.output_dir}: {'not empty' if out.is_dir() else 'is a file'}; "
                         "give a new folder")
    if args.eval_images_per_case is not None and args.eval_images_per_case < 0:
        raise UsageError(f"--eval_images_per_case must be >= 0, got {args.eval_images_per_case}")
    return run, snapshots, out


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    run, snapshots, out = check_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from ldm.config import TrainConfig, resolve_config
    from ldm.posthoc_ema import load_into, reconstruct
    from pipelines import TextToImagePipeline
    from ldm.training_run import save_pipeline

    from accelerate import PartialState

    PartialState()  # save_pipeline logs through accelerate's logger
    weights, info = reconstruct(snapshots, args.sigma_rel)
    logger.info("sigma_rel %g (gamma %.3f) at step count %d from %d snapshots: profile fit error %.2f%%",
                args.sigma_rel, info["gamma"], info["t"], info["snapshots"], 100 * info["profile_fit_error"])
    if info["profile_fit_error"] > FIT_WARNING:
        logger.warning("the snapshots rebuild the sigma_rel %g profile only to %.0f%% (L2): more snapshots "
                       "(--posthoc_ema_snapshot_steps) or a sigma_rel nearer the kept ones fit better",
                       args.sigma_rel, 100 * info["profile_fit_error"])
    pipe = TextToImagePipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    # training names the denoiser "unet" whether it is a U-Net or a DiT
    load_into({"unet": pipe.denoiser, "text_encoder": pipe.text_encoder}, weights, source=str(run))
    cfg = resolve_config(TrainConfig, ["--config", str(run / "train_config.yaml")])
    cfg = dataclasses.replace(cfg, output_dir=str(out), **(
        {} if args.eval_images_per_case is None else {"eval_images_per_case": args.eval_images_per_case}))
    out.mkdir(parents=True, exist_ok=True)
    if (run / "train_log.jsonl").is_file():  # the training these weights come from (training_curves.png)
        shutil.copy2(run / "train_log.jsonl", out / "train_log.jsonl")
    run_info = json.loads((run / "run_info.json").read_text()) if (run / "run_info.json").is_file() else {}
    run_info["posthoc_ema"] = {**info, "run": str(run)}
    held_out_line = save_pipeline(pipe, cfg, train_te=any(n.startswith("text_encoder.") for n in weights),
                                  run_info=run_info, captions=[])
    if held_out_line:
        print(held_out_line)
    print(f"post-hoc EMA sigma_rel {args.sigma_rel:g} -> {out} (profile fit error "
          f"{100 * info['profile_fit_error']:.2f}%)")
    return out


if __name__ == "__main__":
    run_cli(main)
