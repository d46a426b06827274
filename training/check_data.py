"""Check a captioned image folder (or hub data set) before training.

    python training/check_data.py --train_data_dir DIR [--on_bad_data skip|fail]
                                  [--max_image_pixels N] [--report report.json]
                                  [--preset tiny | --pretrained_model_name_or_path DIR]

Every image is opened and decoded once (`ldm.datacheck`, the same check training runs). Prints a
table (kept; skipped by reason: unreadable, truncated, unsupported mode, too many pixels, missing
file, path outside the folder, duplicate, bad metadata, missing / empty / bad caption, bad loss mask:
unreadable, or not its image's size, named by file; captions over the model's token limit, which it
cuts; byte-identical images; images no metadata file lists; images with a loss mask) and every bad
item by path.

Exit status: 0 when nothing is bad; 1 when something is (training with --on_bad_data skip would
go on without it, with fail it would stop: --on_bad_data fail prints that error); 2 when there is
nothing to check (no such folder, no images, a broken metadata file). Long captions, identical
images and unlisted images are reported but do not change the status.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # `python training/check_data.py` runs this as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm import datacheck
from ldm.errors import run_cli
from ldm.presets import PRESETS


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the epilog's paragraphs kept as written."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=_Help)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_data_dir", help="image folder (metadata.jsonl / .csv, or sidecar .txt / .caption)")
    source.add_argument("--dataset_name", help="HF hub data set (needs network)")
    parser.add_argument("--image_column", default="image", help="image column of a hub data set")
    parser.add_argument("--caption_column", default=datacheck.DEFAULT_CAPTION_COLUMN,
                        help="caption column (metadata or hub data set); with no 'text' column, a lone "
                             "caption / captions / prompt column is used")
    parser.add_argument("--cache_dir", default=None, help="datasets cache for --dataset_name")
    parser.add_argument("--on_bad_data", choices=datacheck.BAD_DATA_POLICIES, default="skip",
                        help="skip: list every bad item; fail: print the error training would stop with")
    parser.add_argument("--max_image_pixels", type=int, default=datacheck.DEFAULT_MAX_IMAGE_PIXELS,
                        help="larger images are bad (decompression bombs)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="the model to train: its text encoder's token limit is what captions are counted against")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="a pretrained model folder instead: its tokenizer's model_max_length")
    parser.add_argument("--max_length", type=int, default=None,
                        help="token limit to count captions against (default: the model's own, see --preset); "
                             "0: do not count")
    parser.add_argument("--report", type=Path, help="write the full report to this JSON file")
    return parser.parse_args(argv)


def read_rows(args: argparse.Namespace) -> tuple[list[datacheck.Row], list[str], str]:
    """(rows, unlisted images, source name) of the folder or hub data set the arguments name."""
    if args.train_data_dir:
        scan = datacheck.folder_rows(args.train_data_dir, args.caption_column)
        return scan.rows, scan.unlisted, args.train_data_dir
    from datasets import load_dataset

    ds = load_dataset(args.dataset_name, cache_dir=args.cache_dir, split="train")
    return datacheck.dataset_rows(ds, args.image_column, args.caption_column, args.dataset_name), [], args.dataset_name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)  # progress on stderr
    try:
        datacheck.validate_settings(args.on_bad_data, args.max_image_pixels)
        rows, unlisted, source = read_rows(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {source}: no images found", file=sys.stderr)
        return 2
    limit = args.max_length
    if limit is None:
        limit = datacheck.model_token_limit(args.preset, args.pretrained_model_name_or_path)
    tokenizer = None
    if limit:
        from ldm.text import build_clip_tokenizer

        tokenizer = build_clip_tokenizer(limit)
    _, report = datacheck.check_rows(rows, source=source, max_image_pixels=args.max_image_pixels,
                                     tokenizer=tokenizer, max_length=limit or None)
    report = replace(report, unlisted=unlisted)
    print(f"data check of {source}:\n{report.table()}")
    for line in datacheck.notes(report):
        print(f"note: {line}")
    if args.report:
        args.report.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"full report: {args.report}")
    if args.on_bad_data == "fail":
        try:
            datacheck.apply_policy(report, "fail")
        except ValueError as e:
            print(e, file=sys.stderr)
    elif report.problems:
        print(f"bad items ({len(report.problems)}):\n{report.problem_list(limit=None)}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
