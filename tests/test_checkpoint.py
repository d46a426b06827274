"""ldm/checkpoint.py: atomic commit, completion marker with file hashes, fallback from a damaged
checkpoint, rotation, config drift."""

from __future__ import annotations

import json
import logging

import pytest

from ldm import checkpoint as ckpt


def write_checkpoint(out, step, fingerprint=None, files=None):
    """What the training loop does: fill the temp folder, then commit it."""
    final = ckpt.checkpoint_dir(out, step)
    tmp = ckpt.temp_dir(final)
    tmp.mkdir(parents=True)
    for name, data in (files or {"model.safetensors": b"w" * 100, "optimizer.bin": b"o" * 50,
                                 "sub/random_states_0.pkl": b"r" * 10}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    ckpt.commit(final, step, fingerprint)
    return final


def test_commit_renames_into_place_with_a_manifest_written_last(tmp_path):
    final = write_checkpoint(tmp_path, 10, {"global_batch": 32})
    assert final.is_dir() and not ckpt.temp_dir(final).exists()
    marker = ckpt.read_marker(final)
    assert marker["step"] == 10 and marker["fingerprint"] == {"global_batch": 32}
    assert set(marker["files"]) == {"model.safetensors", "optimizer.bin", "sub/random_states_0.pkl"}
    assert marker["files"]["model.safetensors"]["size"] == 100
    assert ckpt.verify(final) is None
    assert ckpt.resolve_resume(tmp_path, "latest") == (10, final)


def test_incomplete_folders_are_never_resumed(tmp_path):
    write_checkpoint(tmp_path, 2)
    half = ckpt.checkpoint_dir(tmp_path, 4)
    ckpt.temp_dir(half).mkdir()  # killed while writing
    (ckpt.temp_dir(half) / "model.safetensors").write_bytes(b"partial")
    assert ckpt.resolve_resume(tmp_path, "latest")[0] == 2
    assert ckpt.resolve_resume(tmp_path, None) is None
    assert ckpt.resolve_resume(tmp_path / "nothing-here", "latest") is None


@pytest.mark.parametrize("damage", ["truncate", "delete", "corrupt"])
@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "sub/random_states_0.pkl"])
def test_damaged_newest_falls_back_with_a_warning_naming_the_file(tmp_path, caplog, damage, victim):
    write_checkpoint(tmp_path, 2)
    newest = write_checkpoint(tmp_path, 4)
    f = newest / victim
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:3])
    elif damage == "delete":
        f.unlink()
    else:  # same size, other bytes
        f.write_bytes(b"x" * f.stat().st_size)
    assert victim in ckpt.verify(newest)
    with caplog.at_level(logging.WARNING, logger="ldm.checkpoint"):
        step, path = ckpt.resolve_resume(tmp_path, "latest")
    assert (step, path.name) == (2, "checkpoint-2")
    assert victim in caplog.text and "checkpoint-4" in caplog.text


def test_deleted_marker_means_incomplete(tmp_path):
    write_checkpoint(tmp_path, 2)
    (write_checkpoint(tmp_path, 4) / ckpt.MARKER).unlink()
    assert ckpt.resolve_resume(tmp_path, "latest")[0] == 2


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    only = write_checkpoint(tmp_path, 2)
    (only / "optimizer.bin").unlink()
    with pytest.raises(RuntimeError, match="optimizer.bin"):
        ckpt.resolve_resume(tmp_path, "latest")
    with pytest.raises(RuntimeError, match="optimizer.bin"):
        ckpt.resolve_resume(tmp_path, str(only))
    (only / ckpt.MARKER).write_text("{not json")
    with pytest.raises(RuntimeError, match=ckpt.MARKER):
        ckpt.resolve_resume(tmp_path, "latest")


def test_explicit_path_must_be_a_complete_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoint-3"))


def test_rotation_keeps_the_newest_and_deletes_only_complete_ones(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step)
    pending = ckpt.temp_dir(ckpt.checkpoint_dir(tmp_path, 4))
    pending.mkdir()
    removed = ckpt.rotate(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-1"]
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2, 3]
    assert pending.exists()  # an unfinished save is not rotation's business
    assert ckpt.rotate(tmp_path, 0) == [] and ckpt.rotate(tmp_path, None) == []
    ckpt.rotate(tmp_path, 1)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3]


def test_drift_lists_each_changed_key():
    saved = {"global_batch": 32, "resolution": 32, "data": "abc"}
    now = {"global_batch": 64, "resolution": 32, "data": "abd", "world_size": 2}
    changed = ckpt.drift(saved, now)
    assert changed == [("data", "data: 'abc' -> 'abd'"), ("global_batch", "global_batch: 32 -> 64"),
                       ("world_size", "world_size: '<absent>' -> 2")]
    assert ckpt.drift(saved, dict(saved)) == []
    assert json.dumps(changed)  # printable as is
    assert {"global_batch", "world_size", "gradient_accumulation_steps", "resolution", "model", "data"} <= set(
        ckpt.STRICT_KEYS)


def test_step_trace_keeps_the_steps_up_to_the_checkpoint_on_resume(tmp_path):
    from ldm.trace import StepTrace

    path = tmp_path / "train_log.jsonl"
    trace = StepTrace(path)
    for step in (1, 2, 3):
        trace.add(["a caption"])
        trace.add(["another"])  # a second micro-batch of the step
        trace.write(step, {"loss": 0.5}, [step, 10 + step, 20 + step])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["indices"], r["loss"]) for r in lines] == [(s, [s, 10 + s, 20 + s], 0.5) for s in (1, 2, 3)]
    assert lines[0]["samples"] == lines[1]["samples"] != StepTrace(tmp_path / "other").samples.hexdigest()[:16]
    StepTrace(path, resumed_step=2)  # resumed from checkpoint-2: step 3 is done again
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    StepTrace(path, enabled=False).write(9, {}, [])  # another process: leaves the file alone
    assert len(path.read_text().splitlines()) == 2
    StepTrace(path)  # a fresh run
    assert path.read_text() == ""
