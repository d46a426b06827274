"""The accelerate configs under configs/ and what accelerate does with FSDP on a CPU.

FSDP cannot be exercised on this project's CPU machines through accelerate: accelerate (1.16)
switches to FSDP only when the processes are on an accelerator (MULTI_GPU, MULTI_XPU, ... in
`AcceleratorState.__init__`); with `ACCELERATE_USE_CPU=true` the same config gives MULTI_CPU,
i.e. plain DDP over gloo, silently, and without it each process trains alone. The canary below
pins that down: when it fails, accelerate has learned FSDP on CPU, and the 2-process FSDP
train-and-resume test can be written here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.mark.parametrize("name, kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"),
                                        ("deepspeed_zero2.yaml", "DEEPSPEED")])
def test_configs_load_in_accelerate(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(CONFIGS / name)
    assert config.distributed_type.value == kind
    assert config.mixed_precision == "bf16" and config.num_processes > 1


def test_fsdp_config_shards_the_sd15_unet_by_its_blocks():
    import torch
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    from ldm.models import build_unet
    from ldm.presets import model_preset

    fsdp = load("fsdp.yaml")["fsdp_config"]
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] in ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
    wrapped = set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    cfg = model_preset("sd15")
    with torch.device("meta"):
        unet = build_unet(cfg.unet, in_channels=4, sample_size=64, cross_attention_dim=768)
    names = {type(m).__name__ for m in unet.modules()}
    assert {BasicTransformerBlock.__name__, ResnetBlock2D.__name__} <= wrapped & names
    blocks = [m for m in unet.modules() if type(m).__name__ in wrapped]
    share = sum(p.numel() for b in blocks for p in b.parameters()) / sum(p.numel() for p in unet.parameters())
    assert share > 0.9  # nearly every weight lives in a wrapped (sharded) unit


def test_deepspeed_config_is_zero2():
    ds = load("deepspeed_zero2.yaml")["deepspeed_config"]
    assert ds["zero_stage"] == 2 and ds["offload_optimizer_device"] == "none"


@pytest.mark.slow
def test_canary_accelerate_gives_ddp_not_fsdp_on_cpu(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import torch\nfrom accelerate import Accelerator\n"
        "acc = Accelerator()\nm = acc.prepare(torch.nn.Linear(8, 8))\n"
        "import pathlib, sys\n"
        "pathlib.Path(sys.argv[1], f'rank{acc.process_index}.txt').write_text("
        "f'{acc.process_index} {acc.distributed_type.value} {type(m).__name__}')\n"
        "acc.wait_for_everyone()\nacc.end_training()\n")
    with socket.socket() as s:  # a free port: another test may hold accelerate's default one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    proc = subprocess.run([accelerate, "launch", "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2",
                           "--main_process_port", str(port), "--mixed_precision", "no", "--fsdp_sync_module_states", "false", str(probe), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One file per process: two processes printing to one pipe can interleave their lines.
    rows = sorted(f.read_text().split() for f in tmp_path.glob("rank*.txt"))
    assert rows == [["0", "MULTI_CPU", "DistributedDataParallel"], ["1", "MULTI_CPU", "DistributedDataParallel"]]
