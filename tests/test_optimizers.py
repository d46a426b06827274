"""--optimizer (ldm/optimizers.py): each optimizer built, a clear line when its package is missing,
Schedule-Free's train/eval weights around evaluation and saving, and exact resume for each."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
import yaml

from ldm.config import TrainConfig, resolve_optimizer
from ldm.errors import UsageError
from ldm.optimizers import (check_optimizer, evaluation_weights, in_train_mode, is_schedule_free, make_optimizer,
                            set_train_mode)

HAS = {name: importlib.util.find_spec(module) is not None
       for name, module in (("prodigy", "prodigyopt"), ("schedulefree", "schedulefree"),
                            ("adamw8bit", "bitsandbytes"))}


def needs(name: str):
    return pytest.mark.skipif(not HAS[name], reason=f"the optional package for --optimizer {name} is not installed")


def toy(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))]


def steps(optimizer, params, n: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def build(name: str, params, lr: float = 1e-2):
    return make_optimizer(name, [{"params": params, "lr": lr}], betas=(0.9, 0.999), weight_decay=0.01)


# ------------------------------------------------------------------------------- building
def test_each_optimizer_is_built_and_steps():
    expected = {"adamw": "AdamW", "prodigy": "Prodigy", "schedulefree": "AdamWScheduleFree"}
    for name, cls in expected.items():
        if name != "adamw" and not HAS[name]:
            continue
        params = toy()
        before = [p.detach().clone() for p in params]
        opt = build(name, params, lr=1.0 if name == "prodigy" else 1e-2)
        assert type(opt).__name__ == cls and is_schedule_free(opt) == (name == "schedulefree")
        steps(opt, params, 3)
        assert all(not torch.equal(a, b) for a, b in zip(before, params)), name
    adamw = build("adamw", toy())
    assert adamw.defaults["fused"] and adamw.defaults["weight_decay"] == 0.01  # ldm.runtime.make_adamw's


def test_a_missing_package_is_one_line_naming_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    for name, package in (("prodigy", "prodigyopt"), ("schedulefree", "schedulefree"), ("adamw8bit", "bitsandbytes")):
        with pytest.raises(UsageError) as err:
            check_optimizer(name)
        assert f"pip install {package}" in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(UsageError):
            build(name, toy())
    check_optimizer("adamw")  # torch's: nothing to install
    with pytest.raises(UsageError, match="--optimizer 'sgd': unknown; choose one of adamw, adamw8bit, prodigy"):
        check_optimizer("sgd")


def test_use_8bit_adam_is_an_alias_and_self_scheduled_optimizers_run_a_constant_schedule(caplog):
    cfg = resolve_optimizer(TrainConfig(use_8bit_adam=True))
    assert (cfg.optimizer, cfg.use_8bit_adam) == ("adamw8bit", False)
    assert "--use_8bit_adam is deprecated: use --optimizer adamw8bit" in caplog.text
    with pytest.raises(UsageError, match="--use_8bit_adam with --optimizer prodigy"):
        resolve_optimizer(TrainConfig(use_8bit_adam=True, optimizer="prodigy"))
    assert resolve_optimizer(TrainConfig()).lr_scheduler == "cosine"  # adamw keeps the schedule asked for
    for name in ("prodigy", "schedulefree"):
        assert resolve_optimizer(TrainConfig(optimizer=name, learning_rate=1.0)).lr_scheduler == "constant"
    caplog.clear()
    resolve_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1e-4))
    assert "--learning_rate 0.0001 multiplies the step size Prodigy estimates" in caplog.text
    caplog.clear()
    prodigy = resolve_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1.0, lr_scheduler="constant"))
    assert caplog.text == "" and prodigy.text_encoder_lr == 1.0  # one rate for every group (prodigyopt's rule)
    with pytest.raises(UsageError, match="--text_encoder_lr 0.1 differs from --learning_rate 1"):
        resolve_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1.0, text_encoder_lr=0.1))


def test_another_optimizer_is_another_run_on_resume():
    from ldm import checkpoint as ckpt
    from ldm.presets import model_preset

    def fingerprint(**kw):
        model = dataclasses.replace(model_preset("tiny"), pretrained_vae=None)  # not hashing the shipped VAE
        return ckpt.run_fingerprint(TrainConfig(**kw), model, world_size=1, zero_terminal_snr=None,
                                    pretrained_vae=None, prediction_type="v_prediction", trained=["unet"], data="d")

    assert "optimizer" not in fingerprint()  # checkpoints from before --optimizer resume as adamw
    changed = ckpt.drift(fingerprint(optimizer="prodigy"), fingerprint())
    assert [k for k, _ in changed] == ["optimizer"] and "optimizer" in ckpt.STRICT_KEYS


# ------------------------------------------------------------------------------- Schedule-Free's two weights
@needs("schedulefree")
def test_schedule_free_evaluates_x_and_training_continues_from_y():
    """In train mode the parameters hold y = (1 - beta1) z + beta1 x; inside `evaluation_weights`
    they hold x. After it: y to the bit (restore) or y computed again from x (what a resume from a
    checkpoint of x computes), and the optimizer steps again."""
    params = toy()
    opt = build("schedulefree", params)
    assert in_train_mode(opt)
    steps(opt, params, 4)
    y = [p.detach().clone() for p in params]
    z = [opt.state[p]["z"].clone() for p in params]
    with evaluation_weights(opt):
        assert not in_train_mode(opt)
        for p, y_i, z_i in zip(params, y, z):
            torch.testing.assert_close(p.detach(), (y_i - 0.1 * z_i) / 0.9, rtol=0, atol=1e-6)  # x
        with evaluation_weights(opt):  # nested: still x, and still x after
            pass
        assert not in_train_mode(opt)
    assert in_train_mode(opt) and all(torch.equal(p, y_i) for p, y_i in zip(params, y))

    with evaluation_weights(opt, restore=False):
        x = [p.detach().clone() for p in params]
    resumed = [(1 - 0.9) * z_i + 0.9 * x_i for x_i, z_i in zip(x, z)]  # y from x, as set_train_mode(True) does
    for p, r in zip(params, resumed):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-6)
    steps(opt, params, 1)  # in train mode: it steps

    set_train_mode(opt, False)  # the end of training: x from here on
    assert not in_train_mode(opt)
    with evaluation_weights(opt):
        pass
    assert not in_train_mode(opt)


def test_evaluation_weights_leave_other_optimizers_alone():
    params = toy()
    opt = build("adamw", params)
    steps(opt, params, 2)
    before = [p.detach().clone() for p in params]
    with evaluation_weights(opt):
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    set_train_mode(opt, False)
    assert in_train_mode(opt) and all(torch.equal(p, b) for p, b in zip(params, before))


# ------------------------------------------------------------------------------- exact resume
@pytest.mark.slow
@pytest.mark.parametrize("name", ["prodigy", "schedulefree", "adamw8bit"])
def test_resume_is_exact_for_each_optimizer(tmp_path, name):
    """4 steps with a checkpoint, the validation loss and (Schedule-Free) a validation grid at step
    2; resumed from step 2, weights, optimizer state, LR schedule and every step's loss and
    validation loss equal the uninterrupted run's. (adamw: tests/test_reliability.py.)"""
    if not HAS[name]:
        pytest.skip(f"the optional package for --optimizer {name} is not installed")
    if name == "adamw8bit" and not torch.cuda.is_available():
        pytest.skip("bitsandbytes' 8-bit AdamW needs a CUDA device")
    from safetensors.torch import load_file

    from test_reliability import BASE, resume_copy, run, same_state, trace

    args = [*BASE, "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "2",
            "--validation_split", "0.25", "--optimizer", name, "--learning_rate", "1.0" if name == "prodigy" else "1e-3",
            "--num_validation_images", "1" if name == "schedulefree" else "0", "--no-use_ema"]
    reference = tmp_path / "reference"
    run(["--output_dir", str(reference), *args])
    assert [r["step"] for r in trace(reference) if "val_loss" in r] == [2, 4]
    final = reference / "checkpoints" / "checkpoint-4"
    groups = torch.load(final / "optimizer.bin", weights_only=True)["param_groups"]
    if name == "prodigy":
        assert groups[0]["d"] > groups[0]["d0"]  # it estimated a step size
    if name == "schedulefree":
        assert groups[0]["train_mode"] is False  # saved in eval mode: the checkpoint holds x
        saved = load_file(str(reference / "unet" / "diffusion_pytorch_model.safetensors"))
        x = load_file(str(final / "model.safetensors"))
        # the pipeline is x (to rounding: the run moved to y and back after saving checkpoint-4); y is
        # (1 - beta1)(z - x) ~ 1e-4 away after 4 steps at 1e-3
        assert saved.keys() == x.keys() and max((saved[k] - x[k]).abs().max().item() for k in x) < 1e-6

    resumed = tmp_path / "resumed"
    resume_copy(reference, resumed, 2)
    proc = run(["--output_dir", str(resumed), *args, "--resume_from_checkpoint", "latest"])
    assert "(step 2)" in proc.stderr
    assert same_state(reference, resumed) == []
    recorded = yaml.safe_load((resumed / "train_config.yaml").read_text())  # the optimizer and its schedule
    assert recorded["optimizer"] == name
    assert recorded["lr_scheduler"] == ("cosine" if name == "adamw8bit" else "constant")
