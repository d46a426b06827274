"""Reliability of training runs (the README's "Reliability" section): config drift, SIGTERM,
kill -9 at random moments, non-finite losses, damaged checkpoints, and loading without pickles."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_ldm.py"
# The end-of-run validation grid at its defaults (8 images x 25 steps) was a third of each run's time.
BASE = ["--train_batch_size", "8", "--builtin_num_images", "48", "--validation_steps", "0",
        "--validation_inference_steps", "2", "--num_validation_images", "1",
        "--report_to", "none", "--eval_images_per_case", "0", "--lr_warmup_steps", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run(args: list[str], *, check: bool = True, prelude: str = "") -> subprocess.CompletedProcess:
    """The training script in a fresh interpreter (single process, as `accelerate launch` runs it);
    `prelude` is Python run first (to inject faults)."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{prelude}\nimport training.train_ldm as t\nt.main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    """Read the child's stderr until `text` appears; return what was read."""
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = proc.stderr.read(1)
        if not chunk:
            break
        seen += chunk
        if text in seen[-len(text) - 1 :]:
            return seen
    raise AssertionError(f"{text!r} never appeared; stderr so far:\n{seen[-3000:]}")


# ------------------------------------------------------------------------------- config drift
@pytest.mark.slow
def test_resuming_a_changed_run_is_refused_with_a_diff(tmp_path):
    out = tmp_path / "run"
    run(["--output_dir", str(out), *BASE, "--max_train_steps", "2", "--checkpointing_steps", "2"])
    proc = run(["--output_dir", str(out), *BASE, "--max_train_steps", "4", "--train_batch_size", "4",
                "--resume_from_checkpoint", "latest"], check=False)
    assert proc.returncode != 0
    refusal = proc.stderr.split("refusing to resume")[-1]  # the message, after the traceback
    assert "global_batch: 8 -> 4" in refusal
    assert "resolution" not in refusal and "max_train_steps" not in refusal  # only strict changes
    # the explicit override resumes (and says what changed)
    proc = run(["--output_dir", str(out), *BASE, "--max_train_steps", "4", "--train_batch_size", "4",
                "--resume_from_checkpoint", "latest", "--allow_config_drift"])
    assert "resuming with a changed setting: global_batch: 8 -> 4" in proc.stderr
    assert json.loads((out / "run_info.json").read_text())["global_step"] == 4
    # a longer run (more steps, same everything else) resumes with a warning
    proc = run(["--output_dir", str(out), *BASE, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    assert "resuming with a changed setting: max_train_steps: 2 -> 6" in proc.stderr
    assert json.loads((out / "run_info.json").read_text())["global_step"] == 6
    # other data is drift too
    proc = run(["--output_dir", str(out), *BASE, "--max_train_steps", "4", "--train_batch_size", "4",
                "--builtin_num_images", "40", "--resume_from_checkpoint", "latest"], check=False)
    assert proc.returncode != 0 and "data: '48 examples" in proc.stderr
    # so is training the token embedding table that the run kept frozen (other trainable weights)
    proc = run(["--output_dir", str(out), *BASE, "--max_train_steps", "6", "--train_token_embedding",
                "--resume_from_checkpoint", "latest"], check=False)
    assert proc.returncode != 0 and "model: " in proc.stderr.split("refusing to resume")[-1]


# ------------------------------------------------------------------------------- SIGTERM / SIGINT
@pytest.mark.slow
@pytest.mark.parametrize("sig, where", [(signal.SIGTERM, "training"), (signal.SIGINT, "training"),
                                        (signal.SIGTERM, "validation")])
def test_signal_commits_a_checkpoint_and_exits_0(tmp_path, sig, where):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), *BASE, "--max_train_steps", "100000", "--checkpointing_steps", "0"]
    if where == "validation":  # a long validation every 3 steps: the signal lands in it or near it
        args += ["--validation_steps", "3", "--validation_inference_steps", "400",
                 "--validation_prompts", "a red circle", "a blue square"]
    proc = start(args)
    try:
        wait_for(proc, "steps:")  # the progress bar: training has begun
        time.sleep(1.5)
        proc.send_signal(sig)
        sent = time.monotonic()
        # Two signals that arrive while Python is inside one C call are handled once: send the
        # second only after the first was seen.
        first = wait_for(proc, "stopping at the next step boundary", timeout=30)
        proc.send_signal(sig)  # a second signal must not break the save
        _, err = proc.communicate(timeout=30)
        err = first + err
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert took < 30
    assert "already stopping" in err and "stopped by a signal" in err
    found = ckpt.complete_checkpoints(out)
    assert len(found) == 1 and ckpt.verify(found[0][1]) is None
    step = found[0][0]
    assert step >= 1
    # and it resumes from there
    proc = run(["--output_dir", str(out), *BASE, "--max_train_steps", str(step + 2), "--checkpointing_steps", "0",
                "--resume_from_checkpoint", "latest", "--allow_config_drift"])
    assert f"(step {step})" in proc.stderr
    assert json.loads((out / "run_info.json").read_text())["global_step"] == step + 2


@pytest.mark.slow
def test_signal_while_caching_latents_exits_0_without_training(tmp_path):
    out = tmp_path / "run"
    proc = start(["--output_dir", str(out), *BASE, "--builtin_num_images", "20000", "--max_train_steps", "5"])
    try:
        wait_for(proc, "data: 20000 examples")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopped while caching latents" in err
    assert not (out / "unet").exists()


# ------------------------------------------------------------------------------- kill -9
@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """SIGKILL the run at random moments (checkpoints every step, so many kills land in a save),
    resume each time; the final weights equal an uninterrupted run's, and after the first save
    there is always a usable checkpoint."""
    args = [*BASE, "--max_train_steps", "12", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    reference = tmp_path / "reference"
    run(["--output_dir", str(reference), *args])
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(40):
        proc = start(["--output_dir", str(out), *args, "--resume_from_checkpoint", "latest"])
        try:
            wait_for(proc, "training:")  # models built, data cached: the loop is about to start
            time.sleep(rng.uniform(0.0, 2.0))
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.communicate(timeout=60)
        finally:
            proc.kill()
        found = ckpt.complete_checkpoints(out)
        if found:  # once there was a save, a usable checkpoint always remains
            assert any(ckpt.verify(p) is None for _, p in found)
        if (out / "run_info.json").exists():
            break
        if kills >= 6:  # enough: let it finish
            run(["--output_dir", str(out), *args, "--resume_from_checkpoint", "latest"])
            break
    assert kills >= 3
    assert json.loads((out / "run_info.json").read_text())["global_step"] == 12
    a, b = unet(reference), unet(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- numerics
NAN_ON_CALLS = """
import ldm.diffusion as D, training.train_ldm as T
_calls = [0]
_orig = D.training_target
def target(*args, **kw):
    _calls[0] += 1
    out = _orig(*args, **kw)
    return out * float('nan') if _calls[0] in BAD else out
T.training_target = target
"""


@pytest.mark.slow
def test_non_finite_loss_skips_the_update(tmp_path):
    out = tmp_path / "run"
    proc = run(["--output_dir", str(out), *BASE, "--max_train_steps", "6", "--checkpointing_steps", "3"],
               prelude="BAD = {2, 3}" + NAN_ON_CALLS)
    assert proc.stderr.count("update skipped") == 2
    info = json.loads((out / "run_info.json").read_text())
    assert info["skipped_updates"] == 2 and info["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in unet(out).values())
    for _, path in ckpt.complete_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in load_file(str(path / "ema_unet.safetensors")).values())


@pytest.mark.slow
def test_repeated_non_finite_losses_stop_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    proc = run(["--output_dir", str(out), *BASE, "--max_train_steps", "20", "--checkpointing_steps", "2",
                "--max_nonfinite_steps", "3"],
               prelude="BAD = set(range(5, 100))" + NAN_ON_CALLS, check=False)
    assert proc.returncode != 0
    assert "3 updates in a row had a non-finite loss" in proc.stderr
    # the checkpoints written before are intact and finite
    found = ckpt.complete_checkpoints(out)
    assert found and all(ckpt.verify(p) is None for _, p in found)


def test_a_checkpoint_with_nan_is_never_written():
    model = torch.nn.Linear(2, 2)
    ckpt.check_finite({"unet": model, "ema_unet": [torch.zeros(2)]})
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="unet weight holds NaN or Inf"):
        ckpt.check_finite({"unet": model})
    with pytest.raises(RuntimeError, match="ema_unet 1"):
        ckpt.check_finite({"ema_unet": [torch.zeros(2), torch.tensor([float("nan")])]})


# ------------------------------------------------------------------------------- safe loading
class _Exploit:
    """Unpickling this runs code (creates a file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Exploit(str(marker))))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run(["--output_dir", str(out), *BASE, "--max_train_steps", "2", "--checkpointing_steps", "2"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["random_states_0.pkl", "optimizer.bin", "scheduler.bin"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused(tmp_path, finished_run, victim):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    path = ckpt.complete_checkpoints(out)[-1][1]
    marker = tmp_path / "pwned"
    _plant(path / victim, marker)
    # an attacker can also rewrite the manifest: the hash check is not what protects us
    manifest = ckpt.read_marker(path)
    manifest["files"][victim] = {"size": (path / victim).stat().st_size, "sha256": ckpt._sha256(path / victim)}
    (path / ckpt.MARKER).write_text(json.dumps(manifest))
    proc = run(["--output_dir", str(out), *BASE, "--max_train_steps", "2", "--checkpointing_steps", "2",
                "--resume_from_checkpoint", "latest"], check=False)
    assert not marker.exists(), "unpickling ran code"
    assert proc.returncode != 0
    assert f"{victim}: refused to load it" in proc.stderr


@pytest.mark.slow
def test_resuming_a_finished_run_saves_it_again(tmp_path, finished_run):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "run_info.json").unlink()
    proc = run(["--output_dir", str(out), *BASE, "--max_train_steps", "2", "--checkpointing_steps", "2",
                "--resume_from_checkpoint", "latest"])
    assert "(step 2)" in proc.stderr
    assert json.loads((out / "run_info.json").read_text())["global_step"] == 2


def test_a_pickle_renamed_safetensors_is_refused(tmp_path, tiny_pipeline_dir):
    import shutil

    from pipelines import TextToImagePipeline

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir, folder)
    marker = tmp_path / "pwned"
    _plant(folder / "unet" / "diffusion_pytorch_model.safetensors", marker)
    with pytest.raises(Exception) as err:
        TextToImagePipeline.from_pretrained(folder)
    assert not marker.exists(), "unpickling ran code"
    assert "safetensors" in repr(err.value).lower() or "header" in str(err.value).lower()
    # an EMA file too
    from diffusers.training_utils import EMAModel

    _plant(tmp_path / "ema.safetensors", marker)
    with pytest.raises(Exception):
        ckpt.load_ema(EMAModel(torch.nn.Linear(2, 2).parameters()), tmp_path / "ema.safetensors")
    assert not marker.exists()


# ------------------------------------------------------------------------------- exact resume
def trace(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def resume_copy(reference: Path, dest: Path, step: int) -> None:
    """What a run interrupted right after its step-`step` checkpoint leaves behind: the output
    folder with that checkpoint (later ones, the final pipeline and the rest of the log were
    never written... the log is cut by the resumed run itself)."""
    # Only the checkpoint resumed from is copied (the earlier ones are not read): the suite's
    # disk use stays small.
    keep = ckpt.checkpoint_dir(reference, step).name
    shutil.copytree(reference, dest, ignore=lambda d, names: [n for n in names if Path(d).name == "checkpoints"
                                                               and n != keep])
    for name in ("unet", "text_encoder", "vae", "tokenizer", "scheduler", "run_info.json", "model_index.json"):
        p = dest / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def prune(folder: Path, keep: tuple[int, ...]) -> None:
    """Delete the checkpoints a test no longer reads (each is ~150 MB at the tiny preset)."""
    for step, path in ckpt.complete_checkpoints(folder):
        if step not in keep:
            shutil.rmtree(path)


def same_state(a: Path, b: Path) -> list[str]:
    """Names of what differs between two finished runs' final checkpoints and pipelines."""
    diffs = []
    ca, cb = ckpt.complete_checkpoints(a)[-1][1], ckpt.complete_checkpoints(b)[-1][1]
    for name in ("model.safetensors", "model_1.safetensors", "ema_unet.safetensors", "ema_text_encoder.safetensors"):
        if (ca / name).exists():
            x, y = load_file(str(ca / name)), load_file(str(cb / name))
            if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
                diffs.append(name)
    for name in ("optimizer.bin", "scheduler.bin"):
        x, y = (torch.load(c / name, weights_only=True) for c in (ca, cb))
        plain = lambda t: t.tolist() if isinstance(t, torch.Tensor) else repr(t)  # noqa: E731
        if json.dumps(x, default=plain, sort_keys=True) != json.dumps(y, default=plain, sort_keys=True):
            diffs.append(name)
    if trace(a) != trace(b):
        diffs.append("train_log.jsonl")
    return diffs


EXACT = [*BASE, "--max_train_steps", "8", "--checkpointing_steps", "1", "--checkpoints_total_limit", "20"]


@pytest.mark.slow
@pytest.mark.parametrize("workers, points, augment", [(0, (3, 6), []), (2, (7,), []),
                                                     (2, (3,), ["--random_flip", "--no-cache_latents"])])
def test_resume_at_several_points_is_exact(tmp_path, workers, points, augment):
    """48 images at batch 8: 6 steps per epoch. Resume mid-epoch (3), at the epoch's last step (6)
    and after the boundary (7): weights, EMA, optimizer, LR schedule, the loss of every step and
    the samples of every step equal the uninterrupted run's; also with images flipped at random
    on the fly (each sample's flip keyed by seed, epoch and index)."""
    args = [*EXACT, "--dataloader_num_workers", str(workers), *augment]
    reference = tmp_path / "reference"
    run(["--output_dir", str(reference), *args])
    prune(reference, keep=(*points, 8))
    assert [r["step"] for r in trace(reference)] == list(range(1, 9))
    for step in points:
        resumed = tmp_path / f"from-{step}"
        resume_copy(reference, resumed, step)
        proc = run(["--output_dir", str(resumed), *args, "--resume_from_checkpoint", "latest"])
        assert f"(step {step})" in proc.stderr
        assert same_state(reference, resumed) == [], f"resumed at step {step}"
        shutil.rmtree(resumed)


@pytest.mark.slow
def test_resume_check_catches_a_data_loader_that_is_not_fast_forwarded(tmp_path):
    """Negative control: the same comparison fails when the resumed run restarts the epoch."""
    reference = tmp_path / "reference"
    run(["--output_dir", str(reference), *EXACT])
    prune(reference, keep=(3, 8))
    resumed = tmp_path / "resumed"
    resume_copy(reference, resumed, 3)
    run(["--output_dir", str(resumed), *EXACT, "--resume_from_checkpoint", "latest"],
        prelude="import accelerate; accelerate.Accelerator.skip_first_batches = lambda self, dl, n=0: dl")
    diffs = same_state(reference, resumed)
    assert "train_log.jsonl" in diffs and "model.safetensors" in diffs


# ------------------------------------------------------------------------------- distributed equivalence
def launch2(args: list[str], script: Path = SCRIPT) -> subprocess.CompletedProcess:
    """Two CPU processes in a gloo group (`accelerate launch --multi_gpu` with ACCELERATE_USE_CPU)."""
    import socket

    with socket.socket() as s:  # a free port, so that parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_config.yaml"), "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(port), str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def adam_moments(checkpoint: Path) -> list[torch.Tensor]:
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    return [t for k in sorted(state) for t in (state[k]["exp_avg"], state[k]["exp_avg_sq"])]


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one_and_resume_exactly(tmp_path):
    """Global batch 8 as 1 x 8 and as 2 x 4 over 8 steps (48 images: the run crosses an epoch).

    Every random draw is keyed by (seed, step, sample index), so both runs see the same samples
    at every step (each once per epoch) with the same noise, timesteps and caption dropout. The
    runs are in float64 (`--train_dtype float64`), so that what is compared is the algorithm, not
    the order of float sums: losses, the first step's Adam moments and the final weights agree
    within 1e-6. In float32 the weights drift apart by rounding only (measured
    2.1e-4 after 8 steps, as much as one process with 4 x 2 gradient accumulation differs by:
    Adam divides by sqrt(v), which magnifies the rounding of near-cancelling gradients). Finally a
    2-process run resumed from its step-3 checkpoint equals the uninterrupted one exactly."""
    steps = ["--max_train_steps", "8", "--checkpointing_steps", "1", "--checkpoints_total_limit", "10",
             "--caption_dropout", "0.25", "--noise_offset", "0.05", "--input_perturbation", "0.1",
             "--cpu_threads", "1", "--train_dtype", "float64"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(["--output_dir", str(one), *BASE, *steps])
    prune(one, keep=(1, 8))
    launch2(["--output_dir", str(two), *BASE, *steps, "--train_batch_size", "4"])
    prune(two, keep=(1, 3, 8))
    t1, t2 = trace(one), trace(two)
    assert [sorted(r["indices"]) for r in t1] == [sorted(r["indices"]) for r in t2]
    seen = [i for r in t2[:6] for i in r["indices"]]  # 6 steps of 8 = one epoch of 48 images
    assert sorted(seen) == list(range(48))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(t1, t2)) < 1e-6
    first = [ckpt.checkpoint_dir(folder, 1) for folder in (one, two)]
    assert max((a - b).abs().max().item() for a, b in zip(*map(adam_moments, first))) < 1e-6
    final = [unet(one), unet(two)]
    assert all(w.dtype == torch.float64 for w in final[0].values())
    drift = max((final[0][k] - final[1][k]).abs().max().item() for k in final[0])
    assert drift < 1e-6
    assert (two / "checkpoints" / "checkpoint-3" / "random_states_1.pkl").exists()  # every rank's RNG

    resumed = tmp_path / "resumed"
    resume_copy(two, resumed, 3)
    launch2(["--output_dir", str(resumed), *BASE, *steps, "--train_batch_size", "4",
             "--resume_from_checkpoint", "latest"])
    assert same_state(two, resumed) == []


@pytest.mark.slow
def test_a_nan_on_one_process_skips_the_update_on_both(tmp_path):
    """Rank 1's loss is NaN at its 2nd and 3rd micro-batches (rank 0's are finite): both processes
    skip those two updates, and the run ends with the weights of a one-process run whose loss is
    NaN at the same steps (float64, as in the test above: the same draws, so within 1e-6). Rank 0
    learns of it twice: from the gathered loss flags and from the all-reduced (NaN) gradients."""
    steps = ["--max_train_steps", "5", "--checkpointing_steps", "0", "--cpu_threads", "1", "--train_dtype", "float64"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(["--output_dir", str(one), *BASE, *steps], prelude="BAD = {2, 3}" + NAN_ON_CALLS)
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                      "BAD = {2, 3} if os.environ['RANK'] == '1' else set()\n" + NAN_ON_CALLS
                      + "T.main(sys.argv[1:])\n")
    proc = launch2(["--output_dir", str(two), *BASE, *steps, "--train_batch_size", "4"], script=script)
    assert proc.stderr.count("update skipped") == 2  # logged by the main process, whose own losses were finite
    infos = [json.loads((f / "run_info.json").read_text()) for f in (one, two)]
    assert [i["skipped_updates"] for i in infos] == [2, 2] and [i["global_step"] for i in infos] == [5, 5]
    assert [r["skipped_updates"] for r in trace(two)] == [0, 1, 2, 2, 2]
    a, b = unet(one), unet(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_resume_with_aspect_buckets_is_exact(tmp_path):
    """A folder of three aspect ratios at 64 px: buckets 64x64, 48x80 and 80x48 (batches of one
    shape each). Resumed in the second epoch, the run equals the uninterrupted one, sample order
    included; the first epoch sees every image once."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(40):
        w, h = [(64, 64), (100, 60), (60, 100)][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i % 5}"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    args = [*EXACT, "--train_data_dir", str(data), "--resolution", "64", "--aspect_buckets"]
    reference = tmp_path / "reference"
    proc = run(["--output_dir", str(reference), *args])
    assert "'64x64': 14" in proc.stderr and "'48x80': 13" in proc.stderr and "'80x48': 13" in proc.stderr
    prune(reference, keep=(7, 8))
    steps = trace(reference)
    assert len(steps) == 8
    per_epoch = 2 + 2 + 2  # ceil(14 / 8) + 2 x ceil(13 / 8) batches (of 8, 6, 8, 5, 8, 5 images)
    assert sorted(i for r in steps[:per_epoch] for i in r["indices"]) == list(range(40))
    for step in (per_epoch + 1,):  # mid-way through the second epoch (one resume: this test is slow)
        resumed = tmp_path / f"from-{step}"
        resume_copy(reference, resumed, step)
        run(["--output_dir", str(resumed), *args, "--resume_from_checkpoint", "latest"])
        assert same_state(reference, resumed) == [], f"resumed at step {step}"
