"""`python -m pipelines.generate`: files, PNG text chunks, same images as the pipeline, LoRA, errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import UsageError
from ldm.images import LABEL_WIDTH
from ldm.lora import add_lora, save_lora
from ldm.schedulers import SAMPLERS
from pipelines import TextToImagePipeline
from pipelines.generate import SAMPLER_NAMES_HINT, ImageSettings, main, slugify, unique_slugs
from test_lora import randomise_lora, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gen") / "base"
    tiny_pipeline().save_pretrained(folder)
    return folder


def generate_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipelines.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def direct_images(folder: Path, prompts: list[str], seeds: list[int], lora: Path | None = None) -> list[np.ndarray]:
    """The pipeline called by hand: one call per prompt, one generator per seed."""
    pipe = TextToImagePipeline.from_pretrained(folder).set_sampler("dpm++")
    if lora is not None:
        pipe.load_lora_weights(lora)
    out = []
    for prompt in prompts:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out += [np.asarray(im) for im in pipe(prompt, num_inference_steps=2, num_images_per_prompt=len(seeds),
                                              generator=gens).images]
    return out


def assert_same_image(path: Path, expected: np.ndarray) -> None:
    got = np.asarray(Image.open(path).convert("RGB")).astype(int)
    # PNGs hold uint8; another batch composition may round a pixel the other way, never more.
    assert np.abs(got - expected.astype(int)).max() <= 1, path


# ---------------------------------------------------------------------------- pure parts
def test_slugs_are_file_safe_and_unique():
    assert slugify("A red circle, on blue!") == "a-red-circle-on-blue"
    assert slugify("???") == "prompt"
    assert len(slugify("x" * 200)) == 60
    assert unique_slugs(["a cat", "A cat!", "a dog"]) == ["a-cat", "a-cat-2", "a-dog"]


def test_parameters_chunk_is_a1111s_layout():
    s = ImageSettings(prompt="a red circle", negative_prompt="blurry", seed=3, steps=30, guidance=5.0,
                      sampler="dpm++", width=48, height=32, model="out/ldm")
    assert s.parameters() == ("a red circle\nNegative prompt: blurry\n"
                              "Steps: 30, Sampler: dpm++, CFG scale: 5.0, Seed: 3, Size: 48x32, Model: out/ldm")
    # no negative prompt: no line for it (as A1111); a value with a comma is quoted so the line still parses
    s = ImageSettings(prompt="p", negative_prompt="", seed=0, steps=2, guidance=1.0, sampler="ddim", width=32,
                      height=32, model="a,b", lora="l")
    assert s.parameters() == 'p\nSteps: 2, Sampler: ddim, CFG scale: 1.0, Seed: 0, Size: 32x32, Model: "a,b", Lora: l'
    assert s.text_chunks()["size"] == "32x32" and s.text_chunks()["lora"] == "l"


def test_help_lists_the_samplers_ldm_knows_without_importing_torch():
    assert sorted(SAMPLER_NAMES_HINT.split(", ")) == sorted(SAMPLERS)
    code = ("import runpy, sys\n"
            "sys.argv = ['generate.py', '--help']\n"
            "try:\n    runpy.run_path('pipelines/generate.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "--lora" in run.stdout and "--prompt_file" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------- user mistakes, in process
def test_a_folder_that_is_not_a_pipeline_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"--model .* is not a pipeline folder: no model_index.json"):
        main(["--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="no such folder"):
        main(["--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o")])
    # a LoRA run's folder: say how to use it
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match=re.escape(f"--lora {tmp_path}")):
        main(["--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("extra, message", [
    (["--lora", "nowhere"], r"--lora nowhere: no such file or folder"),
    (["--sampler", "heun"], r"--sampler 'heun': unknown; choose one of ddim, ddpm, dpm\+\+"),
    (["--num_images", "0"], r"--num_images must be a positive integer, got 0"),
    (["--steps", "-1"], r"--steps must be a positive integer"),
    (["--height", "31"], r"--height 31: must be a multiple of \d+"),
])
def test_bad_flags_are_one_clear_error(base, tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        main(["--model", str(base), "--prompt", "x", "--steps", "1", "--num_images", "1",
              "--out", str(tmp_path / "o"), *extra])
    assert not (tmp_path / "o" / "grid.png").exists()


def test_an_empty_lora_folder_and_no_prompt(base, tmp_path):
    with pytest.raises(UsageError, match="no pytorch_lora_weights.safetensors in this folder"):
        main(["--model", str(base), "--prompt", "x", "--lora", str(tmp_path), "--out", str(tmp_path / "o")])
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match="no prompt"):
        main(["--model", str(base), "--prompt_file", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")])


def test_the_pipelines_own_checks_become_usage_errors(base, tmp_path):
    # 2 steps of a 1000-step schedule are fine; more steps than training timesteps are refused by diffusers
    with pytest.raises(UsageError):
        main(["--model", str(base), "--prompt", "x", "--steps", "5000", "--sampler", "ddim",
              "--num_images", "1", "--out", str(tmp_path / "o")])


# ---------------------------------------------------------------------------- end to end
def test_lora_images_are_the_pipeline_with_the_lora_loaded(base, tmp_path):
    pipe = tiny_pipeline()
    add_lora(pipe.unet, rank=4)
    randomise_lora(pipe.unet, 0)
    save_lora(tmp_path / "lora", pipe.unet)
    (tmp_path / "prompts.txt").write_text("a red circle\n\n")
    paths = main(["--model", str(base), "--prompt_file", str(tmp_path / "prompts.txt"), "--num_images", "2",
                  "--steps", "2", "--seed", "7", "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "o")])
    assert [p.name for p in paths] == ["a-red-circle-7.png", "a-red-circle-8.png", "grid.png"]
    expected = direct_images(base, ["a red circle"], [7, 8], lora=tmp_path / "lora")
    for path, image in zip(paths, expected):
        assert_same_image(path, image)
    without = direct_images(base, ["a red circle"], [7, 8])
    assert np.abs(expected[0].astype(int) - without[0].astype(int)).max() > 1  # the LoRA changed the images
    assert Image.open(paths[0]).text["lora"] == str(tmp_path / "lora")
    assert f"Lora: {tmp_path / 'lora'}" in Image.open(paths[0]).text["parameters"]


@pytest.mark.slow
def test_cli_writes_named_pngs_with_settings_and_a_grid(base, tmp_path):
    out = tmp_path / "samples"
    args = ["--model", str(base), "--num_images", "2", "--steps", "2", "--seed", "10", "--guidance", "4.0",
            "--negative_prompt", "blurry", "--out", str(out)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    run = generate_cli(*args)
    assert run.returncode == 0, run.stderr
    names = ["a-red-circle-10.png", "a-red-circle-11.png", "a-blue-square-10.png", "a-blue-square-11.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["grid.png"])
    assert "generating" in run.stderr and "4/4" in run.stderr  # the progress bar over images

    text = Image.open(out / "a-blue-square-11.png").text
    assert text["prompt"] == "a blue square" and text["seed"] == "11" and text["negative_prompt"] == "blurry"
    assert text["parameters"] == ("a blue square\nNegative prompt: blurry\nSteps: 2, Sampler: dpm++, "
                                  f"CFG scale: 4.0, Seed: 11, Size: 32x32, Model: {base}")

    # the same images as the pipeline called by hand with the same seeds (the default sampler is dpm++)
    pipe = TextToImagePipeline.from_pretrained(base).set_sampler("dpm++")
    for i, prompt in enumerate(PROMPTS):
        gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
        images = pipe(prompt, negative_prompt="blurry", num_inference_steps=2, guidance_scale=4.0,
                      num_images_per_prompt=2, generator=gens).images
        for j, image in enumerate(images):
            assert_same_image(out / names[2 * i + j], np.asarray(image))

    grid = Image.open(out / "grid.png")
    top = grid.height - 2 * 32  # the title band
    assert grid.size == (LABEL_WIDTH + 2 * 32, top + 2 * 32) and top > 0  # columns: images, rows: prompts
    top_right = np.asarray(grid.convert("RGB"))[top:top + 32, LABEL_WIDTH + 32:]
    assert np.array_equal(top_right, np.asarray(Image.open(out / "a-red-circle-11.png").convert("RGB")))


def test_cli_non_pipeline_folder_is_one_line_and_exit_2(tmp_path):
    # run as a file, the check answers before torch loads (`-m pipelines.generate` runs the same main)
    run = subprocess.run([sys.executable, "pipelines/generate.py", "--model", str(tmp_path), "--prompt", "x",
                          "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "model_index.json" in lines[0] and str(tmp_path) in lines[0], run.stderr


def test_sampling_dtype_table():
    from pipelines.generate import sampling_dtype

    assert sampling_dtype("auto", "cpu", False) == "float32"
    assert sampling_dtype("auto", "cuda", True) == "bfloat16"
    assert sampling_dtype("auto", "cuda", False) == "float16"
    assert sampling_dtype("float16", "cpu", False) == "float16"  # asked for: kept


def test_gpu_options_keep_the_images(base, tmp_path, caplog):
    """--channels_last and --compile (regional) change how the denoiser runs, not what it computes;
    --dtype bfloat16 loads the weights in bf16 (images within bf16's rounding)."""
    common = ["--model", str(base), "--prompt", "a red circle", "--num_images", "1", "--steps", "2", "--seed", "3"]
    plain = main([*common, "--out", str(tmp_path / "plain")])
    with caplog.at_level("INFO"):
        fast = main([*common, "--channels_last", "--compile", "--out", str(tmp_path / "fast")])
    assert re.search(r"channels_last on, torch.compile [1-9]\d* U-Net blocks", caplog.text)
    half = main([*common, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")])
    a, b, c = (np.asarray(Image.open(paths[0]).convert("RGB")).astype(int) for paths in (plain, fast, half))
    assert np.abs(a - b).max() <= 1
    assert 0 < np.abs(a - c).mean() < 8
