"""The training script end to end (subprocesses, as a user runs it) and a tiny overfit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from ldm.diffusion import add_noise, gather, training_target
from ldm.models import build_components
from ldm.presets import model_preset
from ldm.synthetic import export_folder
from ldm.text import encode_tokens, tokenize
from pipelines import TextToImagePipeline

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_ldm.py"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
FAST = ["--max_train_steps", "4", "--train_batch_size", "8", "--builtin_num_images", "48",
        "--checkpointing_steps", "2", "--validation_steps", "0", "--validation_inference_steps", "2",
        "--num_validation_images", "1", "--validation_prompts", "a red circle", "a blue square",
        "--lr_warmup_steps", "1", "--report_to", "none", "--eval_images_per_case", "1"]


def launch(args: list[str], *, processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_config.yaml")]
    if processes > 1:
        # accelerate's --cpu launcher starts one process without mpirun; this forms a gloo group.
        env["ACCELERATE_USE_CPU"] = "true"
        import socket

        with socket.socket() as s:  # a free port: parallel test workers must not collide
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(port)]
    proc = subprocess.run(cmd + [str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def weights(folder: Path, component: str = "unet") -> dict[str, torch.Tensor]:
    name = "diffusion_pytorch_model.safetensors" if component in ("unet", "vae") else "model.safetensors"
    return load_file(str(folder / component / name))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def test_help_lists_the_diffusers_flag_names():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for flag in ("--pretrained_model_name_or_path", "--train_data_dir", "--dataset_name", "--image_column",
                 "--caption_column", "--resolution", "--train_batch_size", "--gradient_accumulation_steps",
                 "--max_train_steps", "--learning_rate", "--lr_scheduler", "--output_dir",
                 "--checkpointing_steps", "--checkpoints_total_limit", "--resume_from_checkpoint",
                 "--mixed_precision", "--gradient_checkpointing", "--use_ema", "--seed",
                 "--validation_prompts", "--prediction_type", "--preset", "--config"):
        assert flag in out.stdout, flag
    assert "(default: tiny)" in out.stdout


@pytest.mark.slow
def test_default_data_run_prints_and_saves_the_held_out_score(tmp_path):
    out = tmp_path / "default"
    proc = launch(["--output_dir", str(out), *FAST, "--eval_images_per_case", "2"])
    assert "held-out compositions: all attributes" in proc.stdout
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["images"] == 20 and len(report["cases"]) == 10
    assert 0.0 <= report["all"] <= min(report["color"], report["shape"], report["position"]) <= 1.0
    assert (out / "eval" / "eval_grid.png").exists()
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 1.0  # the shipped, pretrained first stage, not a random one


@pytest.mark.slow
def test_end_to_end_on_a_user_folder_gives_a_loadable_pipeline(tmp_path):
    data = export_folder(tmp_path / "data", n=40, resolution=32, seed=5)
    out = tmp_path / "run"
    launch(["--train_data_dir", str(data), "--output_dir", str(out), *FAST, "--validation_steps", "2",
            "--checkpoints_total_limit", "1", "--report_to", "tensorboard"])
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir(), sub
    assert json.loads((out / "run_info.json").read_text())["global_step"] == 4
    assert not (out / "eval").exists()  # the held-out score is for the built-in data only
    cfg = yaml.safe_load((out / "train_config.yaml").read_text())
    assert cfg["train_data_dir"] == str(data) and cfg["max_train_steps"] == 4
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-4"]  # rotated, limit 1
    assert (out / "checkpoints" / "checkpoint-4" / "COMPLETE").exists()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    pipe = TextToImagePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=3, num_images_per_prompt=2,
                  generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (32, 32)


@pytest.mark.slow
def test_lora_fine_tune_on_a_folder_with_bad_files(tmp_path, tiny_pipeline_dir):
    """LoRA (U-Net + text encoder) from a pretrained folder, on user data with a broken image and
    an uncaptioned one (both reported and skipped), with noise offset, input perturbation and
    zero-terminal SNR: only the small adapter file is written and it loads into our pipeline."""
    data = export_folder(tmp_path / "data", n=24, resolution=32, seed=5)
    (data / "broken.png").write_bytes(b"not a png")
    with open(data / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": "broken.png", "text": "a broken file"}) + "\n")
        fh.write(json.dumps({"file_name": "00000.png"}) + "\n")  # listed again, no caption
    out = tmp_path / "lora"
    proc = launch(["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(data),
                   "--output_dir", str(out), *FAST, "--lora_rank", "4", "--train_text_encoder",
                   "--noise_offset", "0.05", "--input_perturbation", "0.1", "--zero_terminal_snr",
                   "--learning_rate", "1e-2"])
    assert "broken.png: unreadable" in proc.stderr and "skipped: unreadable" in proc.stderr
    assert "data: 24 examples" in proc.stderr
    assert not (out / "unet").exists()  # adapters only
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in lora) and all("lora" in k for k in lora)
    info = json.loads((out / "lora_info.json").read_text())
    assert info["base_model"] == str(tiny_pipeline_dir) and info["rank"] == 4
    pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    before = pipe("a red circle", **kw).images
    pipe.load_lora_weights(out)
    kw["generator"] = torch.Generator().manual_seed(0)
    assert not torch.allclose(pipe("a red circle", **kw).images, before, atol=1e-4)


@pytest.mark.slow
def test_disk_caches_are_hit_on_the_second_run_and_change_nothing(tmp_path, tiny_pipeline_dir):
    """Fine-tuning a pretrained folder (text encoder frozen) with --cache_dir: the first run fills
    the latent and text caches, the second only reads them, and both end with the same weights
    as a run without the disk cache."""
    data = export_folder(tmp_path / "data", n=24, resolution=32, seed=5)
    base = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(data), *FAST]
    cache = ["--cache_dir", str(tmp_path / "cache")]
    first = launch([*base, *cache, "--output_dir", str(tmp_path / "first")])
    assert "latent cache: 24 entries, 24 checked here: 0 hits, 24 misses" in first.stderr, first.stderr[-3000:]
    assert "text cache:" in first.stderr
    second = launch([*base, *cache, "--output_dir", str(tmp_path / "second")])
    assert "latent cache: 24 entries, 24 checked here: 24 hits, 0 misses" in second.stderr, second.stderr[-3000:]
    launch([*base, "--output_dir", str(tmp_path / "plain")])
    assert_same(weights(tmp_path / "first"), weights(tmp_path / "plain"))
    assert_same(weights(tmp_path / "second"), weights(tmp_path / "plain"))


@pytest.mark.slow
def test_same_seed_same_weights_and_exact_resume(tmp_path):
    """Two runs with one seed end bit-identical. A run stopped after its step-2 checkpoint
    (mid-epoch: 6 batches per epoch) and resumed ends bit-identical to the uninterrupted one:
    U-Net, text encoder, EMA and optimizer state."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    launch(["--output_dir", str(a), *FAST])
    launch(["--output_dir", str(b), *FAST])
    for comp in ("unet", "text_encoder"):
        assert_same(weights(a, comp), weights(b, comp))
    # What an interrupted run leaves behind: its complete step-2 checkpoint (plus a half-written
    # one, which must be ignored).
    (c / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "checkpoint-2", c / "checkpoints" / "checkpoint-2")
    shutil.copytree(a / "checkpoints" / "checkpoint-4", c / "checkpoints" / "checkpoint-4.tmp")
    (c / "checkpoints" / "checkpoint-4.tmp" / "COMPLETE").unlink()
    proc = launch(["--output_dir", str(c), *FAST, "--resume_from_checkpoint", "latest"])
    assert "step 2" in proc.stderr and "checkpoint-2" in proc.stderr
    assert json.loads((c / "run_info.json").read_text())["global_step"] == 4
    for comp in ("unet", "text_encoder"):
        assert_same(weights(a, comp), weights(c, comp))
    for name in ("ema_unet.safetensors", "ema_text_encoder.safetensors", "model.safetensors"):
        assert_same(load_file(str(a / "checkpoints/checkpoint-4" / name)),
                    load_file(str(c / "checkpoints/checkpoint-4" / name)))
    opt_a = torch.load(a / "checkpoints/checkpoint-4/optimizer.bin", weights_only=True)
    opt_c = torch.load(c / "checkpoints/checkpoint-4/optimizer.bin", weights_only=True)
    assert all(torch.equal(opt_a["state"][i]["exp_avg"], opt_c["state"][i]["exp_avg"]) for i in opt_a["state"])


@pytest.mark.slow
def test_seed_changes_the_run(tmp_path):
    """Another seed, other weights. Also: the tiny preset trains its text encoder but not the token
    embedding table (it stays at its seeded initialisation), unless --train_token_embedding."""
    one_step = ["--max_train_steps", "1", "--checkpointing_steps", "0", "--lr_warmup_steps", "0"]  # lr > 0 at step 1
    launch(["--output_dir", str(tmp_path / "s0"), *FAST, *one_step])
    launch(["--output_dir", str(tmp_path / "s1"), *FAST, *one_step, "--seed", "1", "--num_validation_images", "0",
            "--train_token_embedding"])
    w0, w1 = weights(tmp_path / "s0"), weights(tmp_path / "s1")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert [p.name for p in (tmp_path / "s0" / "samples").iterdir()] == ["step_000001.png"]
    assert not (tmp_path / "s1" / "samples").exists()  # 0 validation images: no grids, no crash
    table, other = "embeddings.token_embedding.weight", "final_layer_norm.weight"
    for run, seed, trained in (("s0", 0, False), ("s1", 1, True)):
        init = build_components(model_preset("tiny"), seed=seed).text_encoder.state_dict()
        after = weights(tmp_path / run, "text_encoder")
        assert torch.equal(after[table], init[table]) is not trained, run
        assert not torch.equal(after[other], init[other]), run


@pytest.mark.slow
def test_two_process_cpu_launch(tmp_path):
    out = tmp_path / "ddp"
    proc = launch(["--output_dir", str(out), *FAST, "--train_batch_size", "4"], processes=2)
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 2, proc.stderr[-2000:]
    assert info["global_step"] == 4
    assert "global batch 8" in proc.stderr
    assert (out / "checkpoints" / "checkpoint-4" / "random_states_1.pkl").exists()  # rank 1's RNG too
    # The saved pipeline loads, and its U-Net is the EMA of the last step, as checkpointed there.
    unet = TextToImagePipeline.from_pretrained(out).unet
    ema = load_file(str(out / "checkpoints" / "checkpoint-4" / "ema_unet.safetensors"))
    params = list(unet.parameters())
    assert len(ema) == len(params) and all(torch.equal(ema[f"shadow.{i}"], p) for i, p in enumerate(params))


def test_importing_the_script_leaves_garbage_collection_alone():
    """Only a command-line run pauses collection while it imports and freezes what the imports made."""
    import gc

    import training.train_ldm  # noqa: F401

    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_tiny_model_overfits_one_batch():
    """The loss of the training objective on one fixed batch falls by an order of magnitude."""
    c = build_components(model_preset("tiny"), seed=0)
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 16, 16)
    ids = tokenize(c.tokenizer, ["a red circle", "a blue square", "a green triangle", "a yellow circle"])
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([50, 300, 600, 900])
    a_t = gather(c.noise_scheduler.alphas_cumprod, timesteps)
    noisy = add_noise(latents, noise, a_t)
    target = training_target("epsilon", latents, noise, a_t)
    params = list(c.unet.parameters()) + list(c.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for _ in range(150):
        pred = c.unet(noisy, timesteps, encoder_hidden_states=encode_tokens(c.text_encoder, ids)).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_prepare_for_training_trains_what_it_returns():
    from ldm.models import prepare_for_training, training_dtypes

    kw = dict(train_token_embedding=False, lora_alpha=None, train_dtype=torch.float32, gradient_checkpointing=False)
    c = build_components(model_preset("tiny"), seed=0)  # built from scratch: text encoder trained jointly
    trained = prepare_for_training(c, train_text_encoder=None, lora_rank=None, weight_dtype=torch.float32, **kw)
    assert list(trained) == ["unet", "text_encoder"] and trained["unet"] is c.unet
    assert not any(p.requires_grad for p in c.vae.parameters())
    assert [n for n, p in c.text_encoder.named_parameters() if not p.requires_grad] == [
        "embeddings.token_embedding.weight"]  # the table stays as initialised
    assert all(p.requires_grad for p in c.unet.parameters()) and c.unet.training and c.text_encoder.training

    c = build_components(model_preset("tiny"), seed=0)
    c.text_encoder_pretrained = True  # a pretrained encoder stays frozen; LoRA: adapters only, in float32
    trained = prepare_for_training(c, train_text_encoder=None, lora_rank=2, weight_dtype=torch.bfloat16, **kw)
    assert list(trained) == ["unet"] and not any(p.requires_grad for p in c.text_encoder.parameters())
    names = {n: p for n, p in c.unet.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n and p.dtype == torch.float32 for n, p in names.items())
    assert c.unet.conv_in.weight.dtype == torch.bfloat16
    assert training_dtypes("bf16", "float32") == (torch.bfloat16, torch.float32)
    assert training_dtypes("no", "float64") == (torch.float64, torch.float64)
    with pytest.raises(ValueError, match="--train_dtype float64 needs --mixed_precision no"):
        training_dtypes("fp16", "float64")


def test_adamw_is_fused_on_cpu_and_8bit_adam_says_how_to_install():
    import importlib.util

    from ldm.runtime import make_adamw

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_adamw([{"params": params}], lr=1e-3), torch.optim.AdamW)
    # fused on CPU, and the same updates as torch's per-tensor loop
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(5)]
    runs = []
    for build in (lambda ps: make_adamw([{"params": ps}], lr=1e-2, weight_decay=0.1),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False)):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = build(ps)
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
        runs.append((opt, ps))
    assert runs[0][0].defaults["fused"] and not runs[1][0].defaults["fused"]
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ImportError, match=r"\.\[bnb\]"):
        make_adamw([{"params": params}], eight_bit=True, lr=1e-3)


def test_cpu_threads_come_from_the_flag_then_the_environment_then_the_cores(monkeypatch):
    from ldm.runtime import THREADS_ENV, use_cpu_cores

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(THREADS_ENV, "3")
        assert use_cpu_cores(1, requested=2) == 2 == torch.get_num_threads()  # --cpu_threads wins
        assert use_cpu_cores(1) == 3 == torch.get_num_threads()
        monkeypatch.delenv(THREADS_ENV)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        monkeypatch.setattr(os, "cpu_count", lambda: 8)
        assert use_cpu_cores(4) == 8  # LOCAL_WORLD_SIZE (processes on this machine) over num_processes
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert use_cpu_cores(4) == 2
        for bad in ("0", "-1", "two"):
            monkeypatch.setenv(THREADS_ENV, bad)
            with pytest.raises(ValueError, match=f"{THREADS_ENV} must be a positive integer, got '{bad}'"):
                use_cpu_cores(1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("scale", [0.1, 1.0, 1.0 - 5e-7, 3.0, float("nan")])
def test_clip_gradients_gives_accelerates_norm_and_gradients_bit_for_bit(scale):
    """The CPU path that skips the multiply by 1 gives what `accelerator.clip_grad_norm_` gives:
    under, at (where torch's 1e-6 still scales by 0.999999), just under and over the limit, and NaN."""
    from accelerate import Accelerator

    from ldm.training_run import clip_gradients

    accelerator = Accelerator(cpu=True)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=g) for shape in [(7, 5), (5,), (3, 3, 2, 2)]]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
    grads = [x * (scale / total) for x in grads]  # total norm ~= scale

    def params() -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
        for p, x in zip(ps, grads):
            p.grad = x.clone()
        return ps

    ours, theirs = params(), params()
    norm = clip_gradients(accelerator, ours, 1.0)
    expected = accelerator.clip_grad_norm_(theirs, 1.0)
    assert torch.equal(norm, expected) or (norm.isnan() and expected.isnan())
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
    if scale == 3.0:
        assert abs(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours])).item() - 1.0) < 1e-5
    if scale == 0.1:
        assert all(torch.equal(p.grad, x) for p, x in zip(ours, grads))  # untouched
