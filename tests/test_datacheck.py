"""The data check: every kind of bad file reported by path and skipped (or failing fast), the
folder layouts, and images of every mode turned into upright 8-bit RGB."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data import load_captioned_dataset, to_rgb
from ldm.datacheck import check_rows, folder_rows

ROOT = Path(__file__).resolve().parents[1]


def png(path: Path, color=(200, 30, 30), size=(16, 12), mode="RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


def load(folder: Path, **kw):
    return load_captioned_dataset(train_data_dir=str(folder), dataset_name=None, image_column="image",
                                  caption_column="text", builtin_num_images=0, resolution=32, seed=0, **kw)


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """Two good images and one bad item per reason, in the imagefolder layout."""
    d = tmp_path / "data"
    d.mkdir()
    rows = []

    def add(name, caption="a thing", **extra):
        rows.append({"file_name": name, "text": caption, **extra})

    png(d / "good1.png"); add("good1.png", "a red box")
    (d / "sub").mkdir()
    png(d / "sub" / "good2.png", (0, 0, 255)); add("sub/good2.png", ["a blue box", "blue"])
    full = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(full, "PNG")
    (d / "truncated.png").write_bytes(full.getvalue()[: len(full.getvalue()) // 2]); add("truncated.png")
    jpg = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(jpg, "JPEG")
    (d / "truncated.jpg").write_bytes(jpg.getvalue()[:300]); add("truncated.jpg")
    (d / "text.png").write_text("not an image"); add("text.png")
    (d / "empty.png").write_bytes(b""); add("empty.png")
    png(d / "huge.png", size=(300, 300)); add("huge.png")
    png(d / "nocap.png"); rows.append({"file_name": "nocap.png"})
    png(d / "emptycap.png"); add("emptycap.png", "   ")
    add("../outside.png"); png(d.parent / "outside.png")
    add(str(d / "good1.png"))  # absolute path
    add("missing.png")
    add("good1.png", "listed twice")
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_every_bad_item_is_reported_by_path_and_the_rest_load(planted, caplog):
    caplog.set_level(logging.INFO)
    ds = load(planted, max_image_pixels=200 * 200)
    assert len(ds) == 2
    assert sorted(map(str, ds["text"])) == sorted(map(str, [["a red box"], ["a blue box", "blue"]]))
    assert all(len(h) == 64 for h in ds["image_hash"]) and sorted(ds["width"]) == [16, 16]
    _, report = check_rows(folder_rows(planted), max_pixels=200 * 200)
    reasons = {Path(label).name: reason.split(":")[0] for label, reason in report.problems}
    assert reasons["truncated.png"] in ("truncated", "unreadable")
    assert reasons["truncated.jpg"] in ("truncated", "unreadable")
    assert reasons["text.png"] == "unreadable" and reasons["empty.png"] == "unreadable"
    assert reasons["huge.png"] == "too many pixels"
    assert reasons["nocap.png"] == "missing caption" and reasons["emptycap.png"] == "empty caption"
    assert reasons["outside.png"] == "path outside the folder"
    assert reasons["missing.png"] == "missing file"
    about_good1 = sorted(reason.split(":")[0] for label, reason in report.problems if label.endswith("good1.png"))
    assert about_good1 == ["duplicate", "path outside the folder"]  # listed again; listed by absolute path
    assert report.kept == 2 and report.total == 13
    assert "kept" in caplog.text and "skipped: too many pixels" in caplog.text


def test_fail_mode_raises_naming_the_files(planted):
    with pytest.raises(ValueError) as err:
        load(planted, on_bad_data="fail", max_image_pixels=200 * 200)
    message = str(err.value)
    assert "11 bad items" in message and "text.png" in message and "huge.png" in message


def test_csv_metadata_and_caption_column(tmp_path):
    png(tmp_path / "a.png"); png(tmp_path / "b.png", (0, 255, 0))
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,a red square\nb.png,a green square\n")
    ds = load(tmp_path)  # no "text" column: the one "caption" column is used
    assert ds["text"] == ["a red square", "a green square"]


def test_sidecar_captions_one_per_line(tmp_path):
    png(tmp_path / "a.png"); (tmp_path / "a.txt").write_text("a red square\n")
    (tmp_path / "nested").mkdir()
    png(tmp_path / "nested" / "b.jpg", (0, 255, 0)); (tmp_path / "nested" / "b.caption").write_text("green\n\nlime\n")
    png(tmp_path / "c.png")  # no caption file
    rows = folder_rows(tmp_path)
    assert [r.caption for r in rows] == ["a red square", None, ["green", "lime"]]
    ds = load(tmp_path)
    assert len(ds) == 2 and ds["text"] == [["a red square"], ["green", "lime"]]


def test_a_hub_style_dataset_goes_through_the_same_check(tmp_path):
    from datasets import Dataset, Features, Image as ImageFeature, Value

    from ldm.data import _hub_rows

    good = io.BytesIO(); Image.new("RGB", (8, 8), (1, 2, 3)).save(good, "PNG")
    ds = Dataset.from_dict({"img": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"junk", "path": None}],
                            "caption": ["ok", "bad image"]},
                           features=Features({"img": ImageFeature(), "caption": Value("string")}))
    kept, report = check_rows(_hub_rows(ds, "img", "caption", "user/set"))
    assert len(kept) == 1 and report.problems[0][0].startswith("user/set[1]")
    with pytest.raises(ValueError, match="no column 'text'"):
        _hub_rows(ds, "img", "text", "user/set")


def test_long_captions_are_counted_and_warned_once(tmp_path, caplog):
    from ldm.text import build_clip_tokenizer

    rows = []
    for i in range(3):
        png(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": "a red square " * (40 if i else 1)})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    caplog.set_level(logging.WARNING)
    load(tmp_path, tokenizer=build_clip_tokenizer(32))
    warnings = [r for r in caplog.records if "longer than" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("2 captions")


# ------------------------------------------------------------------------------- image modes
def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # red strip on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = to_rgb(Image.open(tmp_path / "r.jpg"))
    assert out.size == (10, 20)
    top = np.asarray(out)[:4].mean(axis=(0, 1))  # the left strip is now on top
    assert top[0] > 200 and top[1] < 80


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    out = np.asarray(to_rgb(Image.open(tmp_path / "g16.png")))
    assert out.shape == (1, 3, 3) and out[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode, color, expected", [
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # transparent: white, not black
    ("LA", (0, 128), (128, 128, 128)),  # half-transparent black on white
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("F", 0.5, (128, 128, 128)),
])
def test_modes_become_rgb(mode, color, expected):
    out = to_rgb(Image.new(mode, (4, 4), color))
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out)[0, 0].astype(int) - np.array(expected)).max() <= 1


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [255, 255, 255]


# ------------------------------------------------------------------------------- the command
def test_check_command_prints_a_summary_and_exit_code(planted, tmp_path):
    report = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "training" / "check_data.py"), "--train_data_dir", str(planted),
           "--max_image_pixels", str(200 * 200), "--report", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert "kept" in proc.stdout and "skipped: unreadable" in proc.stdout
    data = json.loads(report.read_text())
    assert data["kept"] == 2 and any(p["item"].endswith("huge.png") for p in data["problems"])
    good = tmp_path / "good"
    good.mkdir()
    png(good / "a.png"); (good / "a.txt").write_text("red")
    assert subprocess.run(cmd[:2] + ["--train_data_dir", str(good)], capture_output=True, cwd=ROOT).returncode == 0
