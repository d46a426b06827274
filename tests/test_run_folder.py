"""One run per output folder: a new run refuses a folder holding another run's files."""

from __future__ import annotations

import pytest

from ldm.errors import UsageError
from ldm.run_folder import check_output_dir, clear_run_files, run_files


def old_run(tmp_path):
    out = tmp_path / "full"
    (out / "checkpoints" / "checkpoint-40").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-40" / "COMPLETE").write_text("{}")
    (out / "samples").mkdir()
    (out / "samples" / "step_000040.png").write_bytes(b"png")
    (out / "eval").mkdir()
    (out / "eval" / "eval.json").write_text("{}")
    (out / "run_info.json").write_text("{}")
    (out / "my_notes.txt").write_text("the user's")
    return out


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path):
    out = old_run(tmp_path)
    with pytest.raises(UsageError, match=r"holds another run \(checkpoints up to step 40\).*--resume_from_checkpoint"):
        check_output_dir(out, resuming=False, overwrite=False)
    assert (out / "checkpoints" / "checkpoint-40").is_dir()  # nothing touched


def test_resuming_or_a_fresh_folder_is_accepted(tmp_path):
    out = old_run(tmp_path)
    assert check_output_dir(out, resuming=True, overwrite=False) == []
    assert check_output_dir(tmp_path / "new", resuming=False, overwrite=False) == []
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)  # an empty checkpoints folder is no run
    assert check_output_dir(tmp_path / "empty", resuming=False, overwrite=False) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")  # the user's own files are no run either
    assert check_output_dir(tmp_path / "mine", resuming=False, overwrite=False) == []


def test_overwrite_clears_the_runs_files_and_keeps_the_users(tmp_path):
    out = old_run(tmp_path)
    doomed = check_output_dir(out, resuming=False, overwrite=True)
    assert sorted(p.name for p in doomed) == ["checkpoints", "eval", "run_info.json", "samples"]
    assert (out / "checkpoints").exists()  # checking removes nothing
    clear_run_files(doomed)
    assert run_files(out) == []
    assert (out / "my_notes.txt").read_text() == "the user's"


def test_an_output_path_that_is_a_file_or_resume_with_overwrite_is_refused(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_output_dir(f, resuming=False, overwrite=False)
    with pytest.raises(UsageError, match="pass one of them"):
        check_output_dir(tmp_path / "x", resuming=True, overwrite=True)


# ------------------------------------------------------------------ checkpoints of the folder
import dataclasses  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from ldm import checkpoint as ckpt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def complete(out: Path, step: int) -> Path:
    path = ckpt.checkpoint_dir(out, step)
    path.mkdir(parents=True)
    (path / ckpt.MARKER).write_text("{}")
    return path


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """An older run's checkpoint-40 outranks a new checkpoint-10 by number: rotation keeps the
    new one and deletes the others beyond the limit, oldest first."""
    old = [complete(tmp_path, s) for s in (30, 40)]
    new = complete(tmp_path, 10)
    removed = ckpt.rotate(tmp_path, keep=2, protect=new)
    assert removed == [old[0]] and new.is_dir() and old[1].is_dir()
    assert ckpt.rotate(tmp_path, keep=1, protect=new) == [old[1]] and new.is_dir()
    assert ckpt.rotate(tmp_path, keep=1) == []  # without protect: the newest stays


class FakeAccelerator:
    is_main_process = True
    process_index = 0

    def __init__(self, fail: BaseException | None):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, folder, safe_serialization=True):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"x" * 1000)  # a partial write
        if self.fail is not None:
            raise self.fail


@pytest.mark.parametrize("fail", [OSError(errno.ENOSPC, "No space left on device"),
                                  RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")])
def test_a_full_disk_while_saving_says_so_and_leaves_no_partial_folder(tmp_path, fail):
    model = torch.nn.Linear(100, 100)
    with pytest.raises(ckpt.NoSpaceError, match=r"no space left on the device of .*checkpoint-5 \(needed ~0 MB"):
        ckpt.save(FakeAccelerator(fail), tmp_path, 5, {}, {"unet": model}, {})
    assert not ckpt.temp_dir(ckpt.checkpoint_dir(tmp_path, 5)).exists()
    assert ckpt.complete_checkpoints(tmp_path) == []
    assert ckpt.expected_size({"unet": model}, {}) == 3 * 4 * (100 * 100 + 100)  # weights + Adam's 2 moments


def test_other_save_errors_keep_their_type_and_a_resume_removes_stale_temp_folders(tmp_path):
    with pytest.raises(RuntimeError, match="something else"):
        ckpt.save(FakeAccelerator(RuntimeError("something else")), tmp_path, 5, {}, {"unet": torch.nn.Linear(2, 2)}, {})
    stale = ckpt.temp_dir(ckpt.checkpoint_dir(tmp_path, 7))
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    assert ckpt.clean_stale_temps(tmp_path) == [stale] and not stale.exists()


def test_a_changed_learning_rate_is_applied_to_a_restored_schedule():
    from diffusers.optimization import get_scheduler

    def schedule(lrs):
        opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])
        return get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)

    old = schedule([1e-3, 1e-4])
    for _ in range(5):
        old.optimizer.step()
        old.step()
    restored = schedule([1e-3, 1e-4])
    restored.load_state_dict(old.state_dict())
    assert ckpt.set_base_learning_rates(restored, [5e-4, 1e-4]) == [1e-3, 1e-4]
    reference = schedule([5e-4, 1e-4])  # the same schedule run with the new rates from the start
    for _ in range(5):
        reference.optimizer.step()
        reference.step()
    assert restored.get_last_lr() == pytest.approx(reference.get_last_lr())
    assert [g["lr"] for g in restored.optimizer.param_groups] == pytest.approx(reference.get_last_lr())
    restored.optimizer.step()
    restored.step()
    reference.optimizer.step()
    reference.step()
    assert restored.get_last_lr() == pytest.approx(reference.get_last_lr())


# ------------------------------------------------------------------ the training script
SHORT = ["--train_batch_size", "4", "--builtin_num_images", "16", "--validation_steps", "0",
         "--num_validation_images", "0", "--report_to", "none", "--eval_images_per_case", "0",
         "--lr_warmup_steps", "1", "--cpu_threads", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "training" / "train_ldm.py"), *SHORT, *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_second_run_in_a_used_folder_is_refused_and_overwrite_starts_afresh(tmp_path):
    out = tmp_path / "full"
    first = train("--output_dir", str(out), "--max_train_steps", "4", "--checkpointing_steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    again = train("--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "1")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "holds another run (checkpoints up to step 4)" in again.stderr.strip().splitlines()[-1]
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [4]  # untouched
    fresh = train("--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "1",
                  "--overwrite_output_dir", "--mixed_precision", "fp16")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [1, 2]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    # fp16 cannot run on a CPU: said, and recorded as what ran
    assert "fp16 mixed precision needs a GPU" in fresh.stderr
    assert "mixed_precision: 'no'" in (out / "train_config.yaml").read_text()
    info = json.loads((out / "run_info.json").read_text())
    assert info["mixed_precision"] == "no" and info["first_stage_psnr_db"] > 25
    assert (out / "README.md").read_text().startswith("---") and (out / "training_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_a_failed_start_writes_nothing_and_a_tiny_data_set_is_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):  # two images: fewer than the batch of 4
        from PIL import Image

        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i}")
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("broken")
    out = tmp_path / "out"
    failed = train("--output_dir", str(out), "--train_data_dir", str(data), "--on_bad_data", "fail",
                   "--max_train_steps", "1")
    assert failed.returncode != 0 and not out.exists()
    ok = train("--output_dir", str(out), "--train_data_dir", str(data), "--max_train_steps", "1",
               "--checkpointing_steps", "0")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "the data set has 2 examples, fewer than one batch (4 x 1 processes)" in ok.stderr


def test_the_run_fingerprint_knows_a_vae_folder_by_its_weights_not_its_path(tmp_path):
    import shutil

    from ldm.config import TrainConfig
    from ldm.presets import model_preset

    preset = model_preset("tiny")
    moved = tmp_path / "moved_vae"
    shutil.copytree(preset.pretrained_vae, moved)

    def fingerprint(vae_dir):
        cfg = TrainConfig()
        model_cfg = dataclasses.replace(preset, pretrained_vae=str(vae_dir))
        return ckpt.run_fingerprint(cfg, model_cfg, world_size=1, zero_terminal_snr=False, pretrained_vae=str(vae_dir),
                                    prediction_type="v_prediction", trained=["unet"], data="d")

    assert fingerprint(preset.pretrained_vae) == fingerprint(moved)  # a moved checkout resumes
    weights = moved / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert fingerprint(preset.pretrained_vae)["model"] != fingerprint(moved)["model"]  # other weights: another run


def test_tag_options_and_prior_preservation_are_in_the_run_fingerprint():
    from ldm.config import TrainConfig
    from ldm.presets import model_preset

    def fingerprint(**changes):
        cfg = dataclasses.replace(TrainConfig(), **changes)
        return ckpt.run_fingerprint(cfg, model_preset("tiny"), world_size=1, zero_terminal_snr=False,
                                    pretrained_vae=None, prediction_type="v_prediction", trained=["unet"], data="d")

    plain = fingerprint()
    assert "tags" not in plain and "prior" not in plain  # older checkpoints hold neither: they resume
    tags = fingerprint(shuffle_tags=True, keep_tokens=1)
    assert ckpt.drift(tags, fingerprint(shuffle_tags=True, keep_tokens=2)) == \
        [("tags", "tags: [True, 1, 0.0] -> [True, 2, 0.0]")]
    prior = dict(class_data_dir="c", class_prompt="a shape")
    assert [k for k, _ in ckpt.drift(fingerprint(**prior), fingerprint(**prior, prior_loss_weight=0.5))] == ["prior"]
    assert "prior" in ckpt.STRICT_KEYS and "tags" not in ckpt.STRICT_KEYS
