"""Post-hoc EMA (ldm/posthoc_ema.py, training/posthoc_ema.py): the maths against known answers,
the reconstruction against a directly tracked EMA, exact resume, and the CLI end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.errors import UsageError
from ldm.posthoc_ema import (MAX_SIGMA_REL, PowerEMA, gamma_to_sigma_rel, power_ema_beta, profile_inner_products,
                             prune_snapshots, read_snapshots, reconstruct, save_snapshots, sigma_rel_to_gamma,
                             solve_weights)

ROOT = Path(__file__).resolve().parents[1]


def test_sigma_rel_to_gamma_known_values():
    # EDM2 (Karras et al. 2024, Sec. 3): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> gamma 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-6)  # gamma 0: the plain average
    for s in (0.01, 0.05, 0.08, 0.15, 0.25):
        g = sigma_rel_to_gamma(s)
        assert gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-9)
        # the cubic of Eq. 3: (g + 2)^2 (g + 3) = (g + 1) / s^2
        assert (g + 2) ** 2 * (g + 3) == pytest.approx((g + 1) / s ** 2, rel=1e-9)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError):
            sigma_rel_to_gamma(bad)


def test_power_ema_weights_are_the_profile_integrated_over_each_step():
    """beta(t) = (1 - 1/t)^(gamma+1): at step T the weight of step tau is exactly
    (tau^(gamma+1) - (tau-1)^(gamma+1)) / T^(gamma+1). Parameters theta_tau = e_tau (one-hot) read
    the weights off the EMA."""
    assert power_ema_beta(1, 6.94) == 0.0
    assert power_ema_beta(10, 0.0) == pytest.approx(0.9)
    T = 40
    eye = torch.eye(T, dtype=torch.float64)
    ema = PowerEMA({"w": torch.zeros(T, dtype=torch.float64)}, (0.05, 0.10))
    for tau in range(1, T + 1):
        ema.step({"w": eye[tau - 1]})
    tau = torch.arange(1, T + 1, dtype=torch.float64)
    for gamma, profile in zip(ema.gammas, ema.profiles):
        expected = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1)
        torch.testing.assert_close(profile["w"], expected, rtol=1e-10, atol=1e-14)
        assert profile["w"].sum().item() == pytest.approx(1.0, abs=1e-12)


def test_profile_inner_products_against_quadrature():
    def density(t, g, x):  # (g + 1) x^g / t^(g + 1) on (0, t]
        return torch.where(x <= t, (g + 1) * x ** g / t ** (g + 1), torch.zeros_like(x))

    n = 400_000
    x = (torch.arange(n, dtype=torch.float64) + 0.5) * (1000.0 / n)  # midpoints on (0, 1000]
    for t_a, g_a, t_b, g_b in [(1000, 16.97, 1000, 6.94), (400, 6.94, 1000, 16.97), (1000, 3.0, 250, 9.45)]:
        numeric = (density(t_a, g_a, x) * density(t_b, g_b, x)).sum().item() * (1000.0 / n)
        assert profile_inner_products(t_a, g_a, t_b, g_b).item() == pytest.approx(numeric, rel=1e-4)
        assert profile_inner_products(t_b, g_b, t_a, g_a).item() == pytest.approx(numeric, rel=1e-4)
    # ||p||^2 = (g + 1)^2 / ((2g + 1) t)
    assert profile_inner_products(500, 6.0, 500, 6.0).item() == pytest.approx(49 / (13 * 500))


def test_solve_weights_picks_a_snapshot_that_is_the_target():
    t = torch.tensor([200.0, 200.0, 400.0, 400.0, 600.0, 600.0], dtype=torch.float64)
    g = torch.tensor([16.97, 6.94] * 3, dtype=torch.float64)
    x, err = solve_weights(t, g, 400.0, 6.94)
    torch.testing.assert_close(x, torch.tensor([0, 0, 0, 1.0, 0, 0], dtype=torch.float64), atol=1e-6, rtol=0)
    assert err < 1e-4
    _, err_between = solve_weights(t, g, 600.0, sigma_rel_to_gamma(0.08))
    assert 1e-4 < err_between < 0.1  # between the kept lengths: close, not exact


def random_walk_with_snapshots(folder: Path, steps: int = 1000, every: int = 50, dim: int = 500):
    """Parameters doing a random walk; 0.05 / 0.10 profiles snapshotted every `every` steps into
    `folder`, and a 0.08 profile (with 0.10 again) tracked directly alongside."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.zeros(dim)
    kept, direct = PowerEMA({"w": theta}), PowerEMA({"w": theta}, (0.08, 0.10))
    for step in range(1, steps + 1):
        theta += torch.randn(dim, generator=gen)
        kept.step({"w": theta})
        direct.step({"w": theta})
        if step % every == 0:
            save_snapshots(kept, folder, step)
    return direct.profiles[0]["w"], direct.profiles[1]["w"]


def test_reconstruction_matches_the_directly_tracked_ema(tmp_path):
    direct_08, direct_10 = random_walk_with_snapshots(tmp_path)
    snapshots = read_snapshots(tmp_path)
    assert len(snapshots) == 40 and snapshots[-1]["step"] == snapshots[-1]["t"] == 1000
    assert {s["sigma_rel"] for s in snapshots} == {0.05, 0.10}
    weights, info = reconstruct(snapshots, 0.08)
    rebuilt = weights["w"]
    assert info["t"] == 1000 and info["profile_fit_error"] < 0.01
    # The 0.08 EMA differs from the kept 0.10 one; the rebuilt one is 100x closer to the truth.
    gap = (direct_10 - direct_08).norm()
    assert gap > 0.01 * direct_08.norm()
    assert (rebuilt - direct_08).norm() < 0.01 * gap
    # Fewer snapshots (every 200 steps): a worse, still useful fit.
    coarse = [s for s in snapshots if s["step"] % 200 == 0]
    rebuilt_coarse, info_coarse = reconstruct(coarse, 0.08)
    assert info_coarse["profile_fit_error"] > info["profile_fit_error"]
    assert (rebuilt - direct_08).norm() < (rebuilt_coarse["w"] - direct_08).norm() < 0.2 * gap


def test_state_dict_resume_is_exact():
    gen = torch.Generator().manual_seed(1)
    trajectory = [torch.randn(7, 3, generator=gen) for _ in range(30)]
    straight = PowerEMA({"a.w": trajectory[0]})
    for theta in trajectory:
        straight.step({"a.w": theta})
    first = PowerEMA({"a.w": trajectory[0]})
    for theta in trajectory[:12]:
        first.step({"a.w": theta})
    state = first.state_dict()
    resumed = PowerEMA({"a.w": torch.zeros(7, 3)})
    resumed.load_state_dict(state)
    assert resumed.t == 12
    for theta in trajectory[12:]:
        resumed.step({"a.w": theta})
    for p, q in zip(straight.profiles, resumed.profiles):
        assert torch.equal(p["a.w"], q["a.w"])
    with pytest.raises(UsageError, match="posthoc_ema_sigma_rels"):
        PowerEMA({"a.w": torch.zeros(7, 3)}, (0.05, 0.2)).load_state_dict(state)


def test_state_dict_round_trips_through_safetensors(tmp_path):
    ema = PowerEMA({"unet.w": torch.randn(4), "text_encoder.b": torch.randn(2)})
    ema.step({"unet.w": torch.randn(4), "text_encoder.b": torch.randn(2)})
    save_file(ema.state_dict(), str(tmp_path / "s.safetensors"))
    other = PowerEMA({"unet.w": torch.zeros(4), "text_encoder.b": torch.zeros(2)})
    other.load_state_dict(load_file(str(tmp_path / "s.safetensors")))
    assert other.t == 1 and all(torch.equal(a[k], b[k]) for a, b in zip(ema.profiles, other.profiles) for k in a)


def test_prune_removes_later_snapshots_only(tmp_path):
    ema = PowerEMA({"w": torch.zeros(2)})
    for step in (5, 10, 15):
        save_snapshots(ema, tmp_path, step)
    (tmp_path / "0000020-0.050.safetensors.tmp").write_bytes(b"cut short")
    removed = prune_snapshots(tmp_path, 10)
    assert sorted(p.name for p in removed) == ["0000015-0.050.safetensors", "0000015-0.100.safetensors",
                                               "0000020-0.050.safetensors.tmp"]
    assert [s["step"] for s in read_snapshots(tmp_path)] == [5, 5, 10, 10]
    assert prune_snapshots(tmp_path / "absent", 0) == []


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "training" / "posthoc_ema.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_mistakes_are_one_line(tmp_path):
    from training.posthoc_ema import main

    (tmp_path / "run").mkdir()
    with pytest.raises(UsageError, match="--run .*no such folder"):
        main(["--run", str(tmp_path / "absent"), "--sigma_rel", "0.08", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="no post-hoc EMA snapshots .*--posthoc_ema"):
        main(["--run", str(tmp_path / "run"), "--sigma_rel", "0.08", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="--sigma_rel 0.5: must be in"):
        main(["--run", str(tmp_path / "run"), "--sigma_rel", "0.5", "--output_dir", str(tmp_path / "o")])
    save_snapshots(PowerEMA({"unet.w": torch.zeros(2)}), tmp_path / "run" / "posthoc_ema", 1)
    with pytest.raises(UsageError, match="no saved pipeline"):
        main(["--run", str(tmp_path / "run"), "--sigma_rel", "0.08", "--output_dir", str(tmp_path / "o")])
    proc = cli("--run", str(tmp_path / "absent"), "--sigma_rel", "0.08", "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --run {tmp_path / 'absent'}: no such folder"]


@pytest.mark.slow
def test_training_with_posthoc_ema_resumes_exactly_and_the_cli_writes_a_pipeline(tmp_path):
    """The tiny preset, 4 steps with a snapshot each step and checkpoints at 2 and 4. Resumed from
    step 2 (with the interrupted run's later snapshots present), the run rewrites snapshots 3 and 4
    bit-identical. The CLI then writes a pipeline whose U-Net is the least-squares combination."""
    from test_training import launch

    from pipelines import TextToImagePipeline

    fast = ["--max_train_steps", "4", "--train_batch_size", "8", "--builtin_num_images", "48", "--checkpointing_steps",
            "2", "--validation_steps", "0", "--num_validation_images", "0", "--lr_warmup_steps", "1",
            "--report_to", "none", "--eval_images_per_case", "0", "--posthoc_ema", "--posthoc_ema_snapshot_steps", "1"]
    a, c = tmp_path / "a", tmp_path / "c"
    launch(["--output_dir", str(a), *fast])
    names = sorted(p.name for p in (a / "posthoc_ema").iterdir())
    assert names == [f"{s:07d}-{r}.safetensors" for s in range(1, 5) for r in ("0.050", "0.100")]
    assert "posthoc_ema.safetensors" in json.loads((a / "checkpoints/checkpoint-4/COMPLETE").read_text())["files"]
    # An interrupted run: its step-2 checkpoint and every snapshot (3 and 4 are redone)
    (c / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "checkpoint-2", c / "checkpoints" / "checkpoint-2")
    shutil.copytree(a / "posthoc_ema", c / "posthoc_ema")
    proc = launch(["--output_dir", str(c), *fast, "--resume_from_checkpoint", "latest"])
    assert "removed 4 post-hoc EMA snapshots of steps after 2" in proc.stderr
    for name in [*names, "../checkpoints/checkpoint-4/posthoc_ema.safetensors"]:
        x, y = load_file(str(a / "posthoc_ema" / name)), load_file(str(c / "posthoc_ema" / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name

    proc = cli("--run", str(a), "--sigma_rel", "0.08", "--output_dir", str(tmp_path / "o8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "o8")
    expected, _ = reconstruct(read_snapshots(a / "posthoc_ema"), 0.08)
    params = {f"{m}.{n}": p for m in ("unet", "text_encoder") for n, p in getattr(pipe, m).named_parameters()}
    assert {k.split(".")[0] for k in expected} == {"unet", "text_encoder"}  # the tiny preset trains both
    assert all(torch.equal(params[k], v) for k, v in expected.items())
    info = json.loads((tmp_path / "o8" / "run_info.json").read_text())["posthoc_ema"]
    assert info["sigma_rel"] == 0.08 and info["t"] == 4 and info["snapshots"] == 8
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
    assert torch.isfinite(image).all()
    # sigma_rel 0.05 at the last step is the kept 0.05 profile there (weight 1 on that snapshot)
    kept = load_file(str(a / "posthoc_ema" / "0000004-0.050.safetensors"))
    rebuilt, _ = reconstruct(read_snapshots(a / "posthoc_ema"), 0.05)
    assert max((rebuilt[k] - v).abs().max().item() for k, v in kept.items()) < 1e-5


def test_cli_swaps_the_rebuilt_weights_into_the_runs_pipeline(tiny_pipeline_dir, tmp_path):
    """A finished run (the tiny pipeline, its config) with snapshots of a drifting U-Net: the new
    folder holds the run's pipeline with exactly the rebuilt U-Net weights."""
    from ldm.config import TrainConfig, save_config
    from pipelines import TextToImagePipeline
    from training.posthoc_ema import main

    run = tmp_path / "run"
    shutil.copytree(tiny_pipeline_dir, run)
    save_config(TrainConfig(output_dir=str(run), eval_images_per_case=0), run / "train_config.yaml")
    unet = TextToImagePipeline.from_pretrained(run).unet
    params = {f"unet.{n}": p.detach().clone() for n, p in unet.named_parameters()}
    ema, gen = PowerEMA(params), torch.Generator().manual_seed(0)
    for step in range(1, 9):
        for p in params.values():
            p += 0.01 * torch.randn(p.shape, generator=gen)
        ema.step(params)
        if step % 2 == 0:
            save_snapshots(ema, run / "posthoc_ema", step)
    main(["--run", str(run), "--sigma_rel", "0.15", "--output_dir", str(tmp_path / "out")])
    expected, _ = reconstruct(read_snapshots(run / "posthoc_ema"), 0.15)
    unet = dict(TextToImagePipeline.from_pretrained(tmp_path / "out").unet.named_parameters())
    assert all(torch.equal(unet[k.removeprefix("unet.")], v) for k, v in expected.items())
    assert json.loads((tmp_path / "out" / "run_info.json").read_text())["posthoc_ema"]["snapshots"] == 8
    with pytest.raises(UsageError, match="not empty"):
        main(["--run", str(run), "--sigma_rel", "0.15", "--output_dir", str(tmp_path / "out")])
