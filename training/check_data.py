"""Check a captioned image folder (or hub data set) before training.

    python training/check_data.py --train_data_dir DIR [--report report.json]

Opens every image once and prints a table: kept, skipped by reason (unreadable, truncated,
unsupported mode, too many pixels, missing file, path outside the folder, missing / empty caption,
duplicate) and captions longer than the tokenizer's limit. Exit code 0 when nothing is bad, 1 when
something would be skipped (training with --on_bad_data skip would go on without it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm import datacheck
from ldm.data import _hub_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_data_dir", help="image folder (metadata.jsonl / .csv or sidecar captions)")
    source.add_argument("--dataset_name", help="HF hub data set (needs network)")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--max_image_pixels", type=int, default=89_478_485)
    parser.add_argument("--max_length", type=int, default=77, help="token limit of the text encoder")
    parser.add_argument("--report", help="write every problem to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)

    if args.train_data_dir:
        rows = datacheck.folder_rows(args.train_data_dir, args.caption_column)
    else:
        from datasets import load_dataset

        ds = load_dataset(args.dataset_name, split="train")
        rows = _hub_rows(ds, args.image_column, args.caption_column, args.dataset_name)
    from ldm.text import build_clip_tokenizer

    _, report = datacheck.check_rows(rows, max_pixels=args.max_image_pixels, on_bad_data="skip",
                                     tokenizer=build_clip_tokenizer(args.max_length), max_tokens=args.max_length)
    print(report.table())
    for label, reason in report.problems:
        print(f"{label}: {reason}")
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
