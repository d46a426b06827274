"""The pure helpers of benchmarks/peer_speed.py: pair order, medians and ratios, the loop time
read from a progress bar, and that both commands ask for the same work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import peer_speed  # noqa: E402


def test_run_order_alternates():
    assert peer_speed.run_order(3) == ["ours", "peer", "peer", "ours", "ours", "peer"]


def test_ratios():
    ours, peer = [10.0, 12.0, 30.0], [20.0, 18.0, 33.0]
    assert peer_speed.ratio_of_medians(ours, peer) == pytest.approx(20.0 / 12.0)
    assert peer_speed.median_pair_ratio(ours, peer) == pytest.approx(1.5)  # of 2.0, 1.5, 1.1
    with pytest.raises(ValueError, match="equally many"):
        peer_speed.median_pair_ratio([1.0], [1.0, 2.0])


def test_loop_seconds_from_progress_bar():
    log = ("steps:  50%|#####     | 40/80 [00:26<00:26,  1.53it/s]\n"
           "steps: 100%|##########| 80/80 [00:52<00:00,  1.53it/s]\n"
           "Steps: 100%|##########| 80/80 [1:02:03<00:00,  1.53it/s]\n"
           "Writing model shards: 100%|##########| 1/1 [00:00<00:00, 23.60it/s]\n")
    assert peer_speed.loop_seconds(log) == 3723.0
    assert peer_speed.loop_seconds(log.splitlines()[0]) is None  # unfinished bar


@pytest.mark.parametrize("workload", sorted(peer_speed.WORKLOADS))
def test_both_sides_do_the_same_work(tmp_path, workload):
    w = peer_speed.WORKLOADS[workload]
    ours = peer_speed.our_command(tmp_path / "m", tmp_path / "d", tmp_path / "o", w, 80, 2)
    peer = peer_speed.peer_command(tmp_path / "p.py", tmp_path / "m", tmp_path / "d", tmp_path / "o", w, 80)

    def value(cmd, flag):
        return cmd[cmd.index(flag) + 1]

    for flag in ("--pretrained_model_name_or_path", "--train_data_dir", "--resolution", "--train_batch_size",
                 "--max_train_steps", "--learning_rate", "--lr_scheduler", "--lr_warmup_steps", "--snr_gamma",
                 "--mixed_precision", "--dataloader_num_workers", "--report_to", "--seed"):
        assert value(ours, flag) == value(peer, flag), flag
    assert "--use_ema" in ours and "--use_ema" in peer
    assert "--center_crop" in ours and "--center_crop" in peer
    assert "--no-random_flip" in ours and "--random_flip" not in peer
    assert value(ours, "--num_validation_images") == "0" and "--validation_prompts" not in peer
    assert int(value(peer, "--checkpointing_steps")) > 80 and value(ours, "--checkpointing_steps") == "0"



def test_the_gpu_workload_trains_in_bf16_on_both_sides(tmp_path):
    w = peer_speed.WORKLOADS["sd15"]
    assert w.gpu and (w.resolution, w.batch) == (512, 16)
    for cmd in (peer_speed.our_command(tmp_path / "m", tmp_path / "d", tmp_path / "o", w, 60, 2),
                peer_speed.peer_command(tmp_path / "p.py", tmp_path / "m", tmp_path / "d", tmp_path / "o", w, 60)):
        assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"
