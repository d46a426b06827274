"""benchmarks/dit_scaling.py: the variants it trains and its scaling plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.dit_scaling import DITS, main, merge_results, plot_scaling, variant_config  # noqa: E402


@pytest.mark.parametrize("name", sorted(DITS))
def test_variants_are_tiny_dit_with_their_width_depth_and_patch(name):
    width, blocks, heads, patch = DITS[name]
    dit = variant_config(name).dit
    assert (dit.patch_size, dit.num_layers, dit.num_attention_heads * dit.attention_head_dim) == (patch, blocks, width)
    assert 16 % patch == 0  # the shipped VAE's 16x16 latents tile into whole patches


def test_later_json_files_win_and_the_plot_is_written(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"tiny": {"gflops_per_image": 0.26, "all": 0.5},
                                 "dit-S/2": {"gflops_per_image": 0.07, "all": 0.1}}))
    second.write_text(json.dumps({"tiny": {"all": 0.7}, "dit-S/4": {"gflops_per_image": 0.02, "all": 0.05}}))
    merged = merge_results([str(first), str(second)])
    assert merged["tiny"] == {"gflops_per_image": 0.26, "all": 0.7} and set(merged) == {"tiny", "dit-S/2", "dit-S/4"}
    out = main(["--plot", str(tmp_path / "p.png"), "--from_json", str(first), str(second)])
    assert out == {} and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_needs_a_scored_variant(tmp_path):
    with pytest.raises(ValueError, match="no variant has both a held-out score and GFLOPs"):
        plot_scaling({"dit-S/2": {"gflops_per_image": 0.07}}, tmp_path / "p.png")
