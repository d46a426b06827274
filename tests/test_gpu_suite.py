"""benchmarks/gpu_suite.py --smoke runs every section end to end on CPU and writes the JSON the
GPU run will write, so that its first run on a GPU does not fail on a typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def test_peak_table_and_mfu():
    assert gpu_suite.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_suite.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_suite.peak_tflops("NVIDIA H100 PCIe") == 756.0  # the longest matching name wins
    assert gpu_suite.peak_tflops("some cpu") is None
    # 989 TFLOP in one second on a 989 TFLOP/s GPU is 100%
    assert gpu_suite.mfu(989e12, 1.0, 989.0) == pytest.approx(1.0)
    assert gpu_suite.mfu(100e12, 0.5, 400.0) == pytest.approx(0.5)
    assert gpu_suite.mfu(1e12, 1.0, None) is None


@pytest.mark.slow
def test_smoke_writes_every_section(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert result["smoke"] is True and result["device"]["type"] == "cpu"
    assert {"torch", "diffusers", "transformers", "accelerate"} <= set(result["versions"])
    assert result["date"] and result["command"]
    bench = result["benchmarks"]
    assert bench["attention"]["head_dims"] == [16, 32]  # the tiny preset's 64 / 4 and 128 / 4
    train = bench["train_step"]
    assert train["batch"] == 4 and train["flops_per_step"] > 1e9
    for variant in ("eager", "channels_last"):
        row = train["variants"][variant]
        assert row["step_s"] > 0 and row["images_per_s"] == pytest.approx(4 / row["step_s"])
        assert row["mfu"] is None  # no peak for a CPU
        assert row["final_loss"] == row["final_loss"]  # finite, not NaN
    sampling = bench["sampling"]
    assert sampling["ours_latency_s"] > 0 and sampling["diffusers_latency_s"] > 0
    assert sampling["max_abs_pixel_diff"] == 0.0  # same weights, scheduler and seed: identical images
    lora = bench["lora"]
    assert lora["trainable_parameters"] > 0 and lora["step_s"] > 0
    loop = bench["loop_syncs"]  # the training script's loop ran (its syncs are counted on a GPU only)
    assert loop["steps"] == 4 and loop["counted"] is False and loop["syncs_per_step"] == [0, 0]
    loading = bench["data_loading"]  # the uncached loader alone: 32 JPEGs, batch 4, 7 batches after the first
    assert set(loading["workers"]) == {"0", "2"} and all(w["images"] == 28 for w in loading["workers"].values())
    assert all(w["images_per_s"] > 0 for w in loading["workers"].values()) and loading["loader_over_step"] > 0
    fast = sampling["gpu_settings"]  # channels_last only in the smoke run (no compile on CPU there)
    assert fast["applied"]["channels_last"] is True and fast["applied"]["compiled_blocks"] == 0
    assert fast["latency_s"] > 0 and fast["max_abs_pixel_diff_vs_plain"] < 1e-3
