"""ldm/plots.py and training/plot_run.py: the smoothing against known values, the PNG written for
one run and for an overlay, and one-line errors for folders without a log."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from ldm.errors import run_cli
from ldm.plots import PLOT_NAME, ema_smooth, read_curves, write_training_curves
from training.plot_run import main


def write_log(folder, steps=40, val_every=10, lr=1e-4, nan_at=None):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        line = {"step": step, "loss": 1.0 / step, "lr": lr * min(1.0, step / 5), "skipped_updates": 0}
        if step == nan_at:
            line["loss"] = float("nan")
        lines.append(json.dumps(line))
        if val_every and step % val_every == 0:
            lines.append(json.dumps({"step": step, "val_loss": 1.5 / step}))
    (folder / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        im.verify()


def test_ema_smooth_known_values():
    assert ema_smooth([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])
    # w = 0.5 on [0, 1]: s = (0, 0.5), bias-corrected by (0.5, 0.75)
    assert ema_smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 2.0 / 3.0])
    assert ema_smooth([1.0, 5.0, 2.0], 0.0) == [1.0, 5.0, 2.0]
    with pytest.raises(ValueError):
        ema_smooth([1.0], 1.0)


def test_read_curves_keeps_finite_values_and_validation(tmp_path):
    run = write_log(tmp_path / "run", steps=20, val_every=10, nan_at=7)
    with open(run / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 21, "lo')  # torn last line of a killed run
    curves = read_curves(run)
    assert curves.name == "run"
    assert [s for s, _ in curves.loss] == [s for s in range(1, 21) if s != 7]
    assert curves.val_loss == [(10, 0.15), (20, 0.075)]
    assert curves.lr[0] == (1, pytest.approx(2e-5)) and all(math.isfinite(v) for _, v in curves.loss)


def test_one_run_writes_training_curves_png(tmp_path):
    run = write_log(tmp_path / "run")
    path = write_training_curves(run)
    assert path == run / PLOT_NAME
    assert_png(path)


def test_plot_run_overlays_two_runs(tmp_path, capsys):
    a = write_log(tmp_path / "a", val_every=0)
    b = write_log(tmp_path / "b", steps=25, lr=3e-4)
    out = main([str(a), str(b), "--out", str(tmp_path / "both.png")])
    assert out == tmp_path / "both.png" and "wrote" in capsys.readouterr().out
    assert_png(out)
    main([str(a)])  # one run: its own folder
    assert_png(a / PLOT_NAME)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "no train_log.jsonl"),
    (lambda p: None, "no such run folder"),
    (lambda p: (p.mkdir(), (p / "train_log.jsonl").write_text('{"step": 1, "loss": 0.5}\nnot json\n{"step": 2}\n')),
     "train_log.jsonl:2: not a JSON line"),
    (lambda p: (p.mkdir(), (p / "train_log.jsonl").write_text("")), "no loss values yet"),
])
def test_a_folder_without_a_usable_log_gets_one_line(tmp_path, capsys, make, message):
    run = tmp_path / "run"
    make(run)
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [str(run)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
