"""benchmarks/sampling_speed.py: our pipeline and diffusers' StableDiffusionPipeline on the same
folder, scheduler and seed give the same images, and the JSON holds both latencies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sampling_speed  # noqa: E402


def test_tiny_workload_same_images_and_both_latencies(tmp_path):
    out = tmp_path / "s.json"
    result = sampling_speed.main(["--workload", "tiny", "--steps", "3", "--repeats", "2", "--work_dir", str(tmp_path),
                                  "--out", str(out)])
    assert (tmp_path / "tiny" / "model" / "model_index.json").is_file()  # built with diffusers' own class
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["max_abs_pixel_diff"] == 0.0  # identical images
    assert len(saved["ours_s_all"]) == len(saved["diffusers_s_all"]) == 2
    assert saved["diffusers_over_ours"] == pytest.approx(saved["diffusers_latency_s"] / saved["ours_latency_s"])
    assert (saved["steps"], saved["resolution"], saved["threads"]) == (3, 32, 1)


def test_a_folder_that_is_not_a_pipeline_is_named(tmp_path):
    with pytest.raises(SystemExit, match=f"--model {tmp_path}: no model_index.json"):
        sampling_speed.main(["--model", str(tmp_path), "--resolution", "32"])
