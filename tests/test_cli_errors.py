"""A user mistake at the command line: one line on stderr naming the value or file, exit code 2
(as argparse does), no traceback, and nothing written to the output folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm import hub
from ldm.errors import UsageError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"training/{script}", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def assert_one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert expected in lines[0], lines[0]


def test_run_cli_turns_a_usage_error_into_one_line_and_exit_2(capsys):
    def main(value):
        raise UsageError(f"--flag {value}: wrong")

    with pytest.raises(SystemExit) as exit_:
        run_cli(main, "x")
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: --flag x: wrong\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli(lambda: {}["missing"])


# ------------------------------------------------------------------------------- pretrained values
def pipeline_folder(path: Path, without: str | None = None) -> Path:
    for part in hub.PIPELINE_PARTS:
        if part != without:
            (path / part).mkdir(parents=True)
    return path


def test_pretrained_values_are_checked_in_well_under_a_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    start = time.monotonic()
    with pytest.raises(UsageError, match=r"\./outputs/nope: no such folder$"):
        hub.check_pipeline_source("./outputs/nope")
    with pytest.raises(UsageError, match="outputs/nope: no such folder or file here"):  # could be a hub id
        hub.check_pipeline_source("outputs/nope")
    with pytest.raises(UsageError, match=r"no unet/ in this folder"):
        hub.check_pipeline_source(str(pipeline_folder(tmp_path / "p", without="unet")))
    assert hub.check_pipeline_source(str(pipeline_folder(tmp_path / "q"))) == "folder"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="notes.txt: a file, but not a single-file checkpoint"):
        hub.check_pipeline_source("notes.txt")
    with pytest.raises(UsageError, match="--pretrained_vae_name_or_path nope/vae: no such folder or file"):
        hub.check_vae_source("nope/vae")
    with pytest.raises(UsageError, match="neither a VAE folder"):
        hub.check_vae_source(str(tmp_path / "q"))
    # a hub id: offline, not cached
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="some/hub-id: no such folder or file here, and not in the hub cache "
                                         r"\(HF_HUB_OFFLINE is set\)"):
        hub.check_pipeline_source("some/hub-id")
    # online but no network: one quick attempt, no retries
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def unreachable(repo_id, timeout):
        assert timeout <= hub.HUB_TIMEOUT_S
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.model_info", unreachable)
    with pytest.raises(UsageError, match="some/hub-id: no such folder or file here, and the hub is unreachable"):
        hub.check_pipeline_source("some/hub-id")
    from huggingface_hub.errors import RepositoryNotFoundError

    class NotFound(RepositoryNotFoundError):
        def __init__(self):  # what the hub answers for an unknown id, without an HTTP response
            Exception.__init__(self, "404 Repository Not Found")

    def missing(repo_id, timeout):
        raise NotFound()

    monkeypatch.setattr("huggingface_hub.model_info", missing)
    with pytest.raises(UsageError, match="and no model 'some/hub-id' on the hub"):
        hub.check_pipeline_source("some/hub-id")
    assert time.monotonic() - start < 1.0


# ------------------------------------------------------------------------------- train_ldm.py
def _data(tmp_path: Path, files: dict[str, str]) -> str:
    folder = tmp_path / "data"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return str(folder)


def _yaml(tmp_path: Path, text: str) -> str:
    (tmp_path / "c.yaml").write_text(text)
    return str(tmp_path / "c.yaml")


LDM_CASES = {
    "resolution 33": (lambda t: ["--resolution", "33"], "--resolution 33: must be a multiple of 8"),
    "resolution -32": (lambda t: ["--resolution", "-32"], "--resolution -32"),
    "max_train_steps 0": (lambda t: ["--max_train_steps", "0"], "--max_train_steps must be >= 1, got 0"),
    "missing data": (lambda t: ["--train_data_dir", str(t / "nope")], "nope: no such folder"),
    "empty data": (lambda t: ["--train_data_dir", _data(t, {})], "data: no images found"),
    "no images": (lambda t: ["--train_data_dir", _data(t, {"a.md": "x"})], "data: no images found"),
    "caption column": (lambda t: ["--train_data_dir", _data(t, {"a.png": "x", "metadata.jsonl":
                                                                '{"file_name": "a.png", "text": "c"}'}),
                                  "--caption_column", "words"], "no caption column 'words'"),
    "config missing": (lambda t: ["--config", str(t / "nope.yaml")], "nope.yaml: no such file"),
    "config malformed": (lambda t: ["--config", _yaml(t, "seed: [1\n")], "c.yaml: not valid YAML at line 2"),
    "config key": (lambda t: ["--config", _yaml(t, "learning_rat: 1\n")], "unknown config keys ['learning_rat']"),
    "resume name": (lambda t: ["--resume_from_checkpoint", "checkpoint-9"],
                    "--resume_from_checkpoint checkpoint-9: no such checkpoint folder"),
    "hub id": (lambda t: ["--pretrained_model_name_or_path", "some/hub-id"],
               "some/hub-id: no such folder or file here, and not in the hub cache"),
    "relative path": (lambda t: ["--pretrained_model_name_or_path", "./outputs/nope"], "./outputs/nope: no such folder"),
    "no unet": (lambda t: ["--pretrained_model_name_or_path", str(pipeline_folder(t / "p", without="unet"))],
                "no unet/ in this folder"),
    "vae path": (lambda t: ["--pretrained_vae_name_or_path", "./nope"], "./nope: no such folder"),
}


@pytest.mark.slow
def test_train_ldm_refuses_an_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    assert_one_line_error(run("train_ldm.py", ["--output_dir", str(tmp_path / "out")]), "out: not a folder")


# ------------------------------------------------------------------------------- train_vae.py
VAE_CASES = {
    "resolution 33": (lambda t: ["--resolution", "33"], "--resolution 33: must be a multiple of the VAE's "
                                                        "downsampling x2; nearest: 32 or 34"),
    "max_train_steps 0": (lambda t: ["--max_train_steps", "0"], "--max_train_steps must be >= 1, got 0"),
    "missing data": (lambda t: ["--train_data_dir", str(t / "nope")], "nope: no such folder"),
    "no images": (lambda t: ["--train_data_dir", _data(t, {"a.md": "x"})], "data: no images found"),
    "config malformed": (lambda t: ["--config", _yaml(t, "seed: [1\n")], "c.yaml: not valid YAML at line 2"),
    "config key": (lambda t: ["--config", _yaml(t, "kl_weigth: 1\n")], "unknown config keys ['kl_weigth']"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script, case", [("train_ldm.py", c) for c in LDM_CASES] + [("train_vae.py", c) for c in VAE_CASES])
def test_a_training_script_refuses_a_mistake_in_one_line(tmp_path, script, case):
    args, expected = {"train_ldm.py": LDM_CASES, "train_vae.py": VAE_CASES}[script][case]
    out = tmp_path / "out"
    proc = run(script, ["--output_dir", str(out), *args(tmp_path)])
    assert_one_line_error(proc, expected)
    assert not out.exists()  # nothing written


# ------------------------------------------------------------------------------- evaluate.py, check_data.py
def _fake_pipeline(tmp_path: Path) -> str:
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    return str(tmp_path / "pipe")


EVAL_CASES = {
    "missing pipeline": (lambda t: ["--pipeline", str(t / "nope")], "--pipeline " + "{t}/nope: no such folder"),
    "not a pipeline": (lambda t: ["--pipeline", str(t)], "not a pipeline folder (no model_index.json)"),
    "cases malformed": (lambda t: ["--pipeline", _fake_pipeline(t), "--cases", _yaml(t, '[{"prompt": "a"')],
                        "c.yaml: not valid JSON at line 1"),
    "cases fields": (lambda t: ["--pipeline", _fake_pipeline(t), "--cases", _yaml(t, '[{"prompt": "a"}]')],
                     "entry 0 must be an object with the strings prompt, color, shape, position"),
    "colors": (lambda t: ["--pipeline", _fake_pipeline(t), "--colors", _yaml(t, '{"red": [255, 0]}')],
               "expected a JSON object of colour name -> [r, g, b]"),
    "sampler": (lambda t: ["--pipeline", _fake_pipeline(t), "--sampler", "eulr"], "--sampler eulr: unknown"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_evaluate_refuses_a_mistake_in_one_line(tmp_path, case):
    args, expected = EVAL_CASES[case]
    proc = run("evaluate.py", args(tmp_path))
    assert_one_line_error(proc, expected.format(t=tmp_path))
    assert not (tmp_path / "pipe" / "eval").exists()


def test_check_data_refuses_a_missing_folder_in_one_line(tmp_path):
    assert_one_line_error(run("check_data.py", ["--train_data_dir", str(tmp_path / "nope")]), "nope: no such folder")
