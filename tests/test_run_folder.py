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
