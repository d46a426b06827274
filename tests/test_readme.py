"""Every command and code block of README.md and docs/*.md runs (training commands shortened with
flags appended, which win over earlier ones; GPU-only launches are checked only for being listed).
A command that appears in several files runs once, where it first appears (README, then docs/ by name)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Guides run in this order, since later ones use what earlier ones wrote (data/shapes, outputs/ldm-lora);
# any other guide runs after them.
ORDER = ["builtin-data.md", "fine-tuning.md", "configuration.md", "exports.md", "multi-gpu.md", "reliability.md"]
DOCS = sorted((ROOT / "docs").glob("*.md"), key=lambda p: (ORDER.index(p.name) if p.name in ORDER else len(ORDER), p.name))
TEXTS = {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in DOCS}}
BIN = Path(sys.executable).parent
SHORT = ["--max_train_steps", "3", "--train_batch_size", "4", "--builtin_num_images", "24",
         "--checkpointing_steps", "3", "--validation_steps", "0", "--validation_inference_steps", "2",
         "--num_validation_images", "1", "--report_to", "none", "--lr_warmup_steps", "1",
         "--eval_images_per_case", "1"]
# Real-world values that a 2-core CPU test cannot use, and what stands in for them.
STAND_INS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "outputs/ldm",
    "data/my_images": "data/shapes",
    "--resolution 512": "--resolution 32",
    "--mixed_precision fp16": "--mixed_precision no",
    "--max_train_steps 10000": "",
}
SELF = ('pip install -e ".[dev]" && pytest', "pytest", 'pytest -m "not slow"')


def blocks(lang: str, text: str | None = None) -> list[str]:
    """The `lang` code blocks of one text, or of README and docs/ in order without repeats."""
    texts = [text] if text is not None else list(TEXTS.values())
    found = [b for t in texts for b in re.findall(rf"```{lang}\n(.*?)```", t, flags=re.S)]
    return list(dict.fromkeys(found))


def commands(text: str | None = None) -> list[str]:
    out = []
    for block in blocks("bash", text):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return list(dict.fromkeys(out))


def needs_gpus(cmd: str) -> bool:
    return ("--multi_gpu" in cmd or "--config_file configs/" in cmd) and "ACCELERATE_USE_CPU=true" not in cmd


def test_readme_lists_the_quick_start_and_launches():
    cmds = commands(README)
    assert cmds[0] == ('pip install -e ".[dev]" && accelerate launch --config_file accelerate_config.yaml '
                       "training/train_ldm.py")
    assert cmds[1] == 'pip install -e ".[dev]" && pytest'
    gpu_only = [c for c in commands() if needs_gpus(c)]
    assert len(gpu_only) == 5  # multi-GPU, multi-node, DDP / FSDP / ZeRO-2 configs: not runnable here
    for cmd in gpu_only:  # listed, so at least their accelerate config must exist
        assert (ROOT / re.search(r"--config_file (\S+)", cmd).group(1)).exists(), cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in ci and "\npytest\n" in ci


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's working directory: the repo's entry points, configs and package (for its shipped VAE,
    ldm/assets/tiny_vae). The quick start, run first, writes outputs/ldm (a run refuses a folder
    holding another run, so nothing may be there before it)."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("training", "benchmarks", "configs", "ldm", "accelerate_config.yaml"):
        (work / name).symlink_to(ROOT / name)
    return work


def run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_every_readme_command_runs(workdir):
    ran = 0
    for cmd in commands():
        if cmd in SELF or needs_gpus(cmd):
            continue
        cmd = cmd.replace('pip install -e ".[dev]" && ', "")  # installed already, as CI does
        for real, stand_in in STAND_INS.items():
            cmd = cmd.replace(real, stand_in)
        if cmd.startswith("python -m ldm.synthetic") or cmd.startswith("python benchmarks/custom_shapes.py"):
            cmd += " --num_images 24"
        elif cmd.startswith("python training/check_data.py"):
            pass  # exits 1 if the exported folder had a bad file
        elif cmd == "python benchmarks/latent_contrast.py":
            pass  # the shipped VAE, a few seconds
        elif cmd.startswith(("python training/export.py", "python training/plot_run.py",
                             "python training/posthoc_ema.py")):
            pass  # a few seconds on the runs above
        elif cmd.startswith("python benchmarks/word_probe.py"):
            cmd += " --noises 2"
        elif cmd.startswith("python training/evaluate.py"):
            cmd += " --images_per_case 1 --num_inference_steps 2"
        elif cmd.startswith("python training/evaluate_vae.py"):
            cmd += " --num_images 16"
        elif "training/train_vae.py" in cmd:
            cmd += " --max_train_steps 2 --builtin_num_images 32 --diverse_num_images 32 --train_batch_size 8"
        elif "accelerate launch" in cmd:
            cmd += " " + " ".join(SHORT)
            if "--resume_from_checkpoint" in cmd:
                cmd += " --max_train_steps 5"  # continue past the earlier run's last step
            if "ACCELERATE_USE_CPU=true" in cmd:
                cmd += " --train_batch_size 2"
        else:
            raise AssertionError(f"README / docs command with no test: {cmd}")
        proc = run(cmd, workdir)
        ran += 1
        if "--resume_from_checkpoint" in cmd:
            assert "resumed from" in proc.stderr
    assert ran == 35
    assert (workdir / "data" / "shapes" / "metadata.jsonl").exists()
    for out in ("ldm", "shapes", "ldm-finetuned", "sd15-finetuned", "shapes-again", "ddp-cpu", "custom_ldm",
                "ldm-phema-0.08", "shapes-tags", "ldm-dreambooth"):
        assert (workdir / "outputs" / out / "model_index.json").exists(), out
    assert len(list((workdir / "data" / "class_shapes").glob("class_*.png"))) == 8  # generated before training
    for out in ("tiny_vae", "my_vae", "diverse_vae", "my_vae_ft", "tiny_vae_diverse", "tiny_vae_kl"):
        assert (workdir / "outputs" / out / "config.json").exists(), out
    assert len(list((workdir / "outputs" / "eval_vae").glob("*/metrics.json"))) == 2
    assert (workdir / "outputs" / "ldm-lora" / "pytorch_lora_weights.safetensors").exists()
    assert (workdir / "outputs" / "ldm" / "eval" / "eval.json").exists()
    assert (workdir / "outputs" / "custom_ldm" / "eval" / "eval.json").exists()
    for out in ("ldm.safetensors", "ldm-lora-kohya.safetensors", "ldm/training_curves.png", "ldm-vs-lora.png"):
        assert (workdir / "outputs" / out).exists(), out


def test_readme_python_blocks_run(tiny_pipeline_dir, tmp_path):
    """Every python block, in a folder holding the quick start's model and a LoRA trained on it."""
    from ldm.lora import add_lora, save_lora
    from pipelines import TextToImagePipeline

    (tmp_path / "outputs").mkdir()
    shutil.copytree(tiny_pipeline_dir, tmp_path / "outputs" / "ldm")
    pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    add_lora(pipe.unet, rank=4)  # an adapter file written the way training writes it
    save_lora(tmp_path / "outputs" / "ldm-lora", pipe.unet)
    codes = blocks("python")
    assert len(codes) == 3 and "callback_on_step_end" in codes[0] and "load_lora_weights" in codes[1]
    assert "prompt_embeds" in codes[2]  # docs/exports.md: diffusers' pipeline arguments
    for code in codes:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        if code is codes[0]:
            assert len(proc.stdout.splitlines()) == 10  # the callback printed once per step
    assert (tmp_path / "red_circle.png").exists()
    assert (tmp_path / "outputs" / "ldm-copy" / "model_index.json").exists()
    assert (tmp_path / "red_circle_lora.png").exists()
    assert (tmp_path / "red_circle_weighted.png").exists()


def test_readme_is_short_and_links_every_guide():
    assert len(README.splitlines()) <= 250
    linked = set(re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", README))
    assert {f"docs/{p.name}" for p in DOCS} | {"benchmarks/results/README.md"} <= linked


def test_relative_links_resolve():
    files = {**TEXTS, "benchmarks/results/README.md": (ROOT / "benchmarks/results/README.md").read_text()}
    for name, text in files.items():
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert ((ROOT / name).parent / target).resolve().exists(), f"{name}: broken link {target}"
