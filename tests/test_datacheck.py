"""The data check and image normalisation: every kind of bad item reported by path with its reason
and skipped (or failing with one error), the folder layouts and hub-style data going through the
same check, and images of every mode turned into upright 8-bit RGB with the right pixel values."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ldm import datacheck
from ldm.data import (checked_dataset, checked_folder, load_captioned_dataset, make_batch_transform, pick_caption,
                      to_rgb)
from ldm.datacheck import SUPPORTED_MODES, check_image, check_rows, folder_rows
from training import check_data

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE = (200, 30, 30), (0, 0, 255)


def png(path: Path, color=RED, size=(16, 12), mode="RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


def noise_bytes(fmt: str, size=(64, 64)) -> bytes:
    """An incompressible image, so that cutting its file in half cuts into the pixel data."""
    out = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(out, fmt)
    return out.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def load(folder: Path, **kw):
    return load_captioned_dataset(train_data_dir=str(folder), dataset_name=None, image_column="image",
                                  caption_column="text", builtin_num_images=0, resolution=32, seed=0, **kw)


def rgb_at(img: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(to_rgb(img))[xy[1], xy[0]])


LIMIT = 200 * 200  # the planted folder's pixel limit


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """metadata.jsonl with good images (some in odd modes) and one bad item per reason."""
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    rows = []

    def add(name, caption="a thing"):
        rows.append({"file_name": name, "text": caption})

    png(d / "good.png"); add("good.png", "a red box")
    png(d / "sub" / "blue.png", BLUE); add("sub/blue.png", ["a blue box", "", "blue"])
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(d / "gray16.png"); add("gray16.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95); add("cmyk.jpg")
    Image.new("LA", (8, 8), (0, 128)).save(d / "la.png"); add("la.png")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(d / "palette.png", transparency=0); add("palette.png")
    png(d / "bits.png", 1, mode="1"); add("bits.png")

    data = noise_bytes("PNG")
    (d / "cut.png").write_bytes(data[: len(data) // 2]); add("cut.png")
    data = noise_bytes("JPEG")
    (d / "cut.jpg").write_bytes(data[: len(data) // 2]); add("cut.jpg")
    (d / "text.png").write_text("not an image"); add("text.png")
    (d / "empty.png").write_bytes(b""); add("empty.png")
    png(d / "huge.png", size=(300, 300)); add("huge.png")
    png(d / "nocap.png"); rows.append({"file_name": "nocap.png"})
    png(d / "blank.png"); add("blank.png", "   ")
    png(d / "numcap.png"); add("numcap.png", 42)
    png(tmp_path / "outside.png"); add("../outside.png")
    add(str(d / "good.png"))  # absolute
    (d / "link.png").symlink_to(tmp_path / "outside.png"); add("link.png")
    add("missing.png")
    add("good.png", "listed again")
    write_jsonl(d / "metadata.jsonl", rows)
    with open(d / "metadata.jsonl", "a") as fh:
        fh.write('{not json\n"a JSON string, not an object"\n')
    png(d / "unlisted.png")
    (d / "._good.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: ignored
    return d


EXPECTED = {  # label (relative to the folder) -> reason
    "cut.png": "truncated", "cut.jpg": "truncated", "text.png": "unreadable", "empty.png": "unreadable",
    "huge.png": "too many pixels", "nocap.png": "missing caption", "blank.png": "empty caption",
    "numcap.png": "bad caption", "../outside.png": "path outside the folder", "link.png": "path outside the folder",
    "missing.png": "missing file", "metadata.jsonl:21": "bad metadata", "metadata.jsonl:22": "bad metadata",
}


def reasons_by_label(report, root: Path) -> list[tuple[str, str]]:
    return [(os.path.relpath(label, root) if label.startswith(str(root)) else label, datacheck.reason_of(p))
            for label, p in report.problems]


def test_every_bad_item_is_reported_by_path_with_its_reason(planted):
    scan = folder_rows(planted)
    kept, report = check_rows(scan.rows, source=str(planted), max_image_pixels=LIMIT)
    found = reasons_by_label(report, planted)
    for name, reason in EXPECTED.items():
        assert (name, reason) in found, (name, found)
    # good.png listed a second time and by absolute path: both reported against its own path
    assert sorted(r for label, r in found if label == "good.png") == ["duplicate", "path outside the folder"]
    assert len(found) == len(EXPECTED) + 2
    assert [Path(k.row.label).name for k in kept] == ["good.png", "blue.png", "gray16.png", "cmyk.jpg", "la.png",
                                                      "palette.png", "bits.png"]
    assert report.total == len(kept) + len(found) and report.kept == 7
    assert scan.unlisted == [str(planted / "unlisted.png")]  # counted, not a row; ._good.png is ignored
    details = dict(report.problems)
    assert details[str(planted / "huge.png")] == f"too many pixels: 90000 > {LIMIT}"
    assert "a symlink to" in details[str(planted / "link.png")]


def test_skip_keeps_the_good_rows_with_hash_size_and_cleaned_captions(planted, caplog):
    caplog.set_level(logging.INFO)
    ds = load(planted, max_image_pixels=LIMIT)
    assert len(ds) == 7 and ds.column_names == ["image", "text", "image_hash", "width", "height"]
    assert ds["text"][:2] == [["a red box"], ["a blue box", "blue"]]  # blank entry of the list dropped
    assert ds["image_hash"][0] == hashlib.sha256((planted / "good.png").read_bytes()).hexdigest()
    assert (ds["width"][0], ds["height"][0]) == (16, 12) and ds[2]["image"].size == (3, 1)
    log = caplog.text
    assert "skipped: truncated" in log and "skipped: path outside the folder" in log
    assert "images in no metadata file (ignored)" in log and "data: 7 examples" in log
    assert "skipping 15 bad items" in log and "cut.png" in log


def test_odd_modes_in_the_folder_become_the_right_rgb(planted):
    ds = load(planted, max_image_pixels=LIMIT)
    images = {Path(img.filename).name: img for img in ds["image"]}
    assert images["gray16.png"].mode == "I;16"  # how Pillow opens a 16-bit grayscale PNG
    assert np.asarray(to_rgb(images["gray16.png"]))[0, :, 0].tolist() == [0, 128, 255]
    assert np.abs(np.array(rgb_at(images["cmyk.jpg"])) - (255, 0, 0)).max() <= 3
    assert images["la.png"].mode == "LA" and rgb_at(images["la.png"]) == (127, 127, 127)  # 50% black on white
    assert rgb_at(images["palette.png"]) == (255, 255, 255)  # transparent palette entry
    assert rgb_at(images["bits.png"]) == (255, 255, 255)


def test_fail_raises_one_error_naming_the_files(planted):
    with pytest.raises(ValueError) as err:
        load(planted, on_bad_data="fail", max_image_pixels=LIMIT)
    message = str(err.value)
    assert "15 bad items of 22" in message and "truncated: 2" in message and "cut.png" in message
    assert "text.png: unreadable" in message
    with pytest.raises(ValueError, match="on_bad_data must be one of"):
        load(planted, on_bad_data="ignore")
    with pytest.raises(ValueError, match="max_image_pixels must be >= 1"):
        load(planted, max_image_pixels=0)


def test_unsupported_mode_is_reported(tmp_path, monkeypatch):
    # Pillow 13 has no mode to_rgb cannot convert (test_the_mode_list_covers_pillow): take CMYK off the list
    monkeypatch.setattr(datacheck, "SUPPORTED_MODES", SUPPORTED_MODES - {"CMYK"})
    out = io.BytesIO()
    Image.new("CMYK", (4, 4)).save(out, "JPEG")
    assert check_image(out.getvalue(), 100)[0] == "unsupported mode: CMYK"


def test_pillow_limits_are_set_for_the_check_and_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a process-wide limit far below ours
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # and truncated files accepted
    png(tmp_path / "big.png", size=(50, 50)); (tmp_path / "big.txt").write_text("big")
    data = noise_bytes("PNG", size=(40, 40))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2]); (tmp_path / "cut.txt").write_text("cut")
    kept, report = check_rows(folder_rows(tmp_path).rows, source="t", max_image_pixels=50 * 50)
    assert [Path(k.row.label).name for k in kept] == ["big.png"]
    assert reasons_by_label(report, tmp_path) == [("cut.png", "truncated")]
    assert Image.MAX_IMAGE_PIXELS == 100 and ImageFile.LOAD_TRUNCATED_IMAGES is True


# ------------------------------------------------------------------------------- layouts
def test_csv_metadata_with_a_byte_order_mark_and_a_caption_column(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    png(tmp_path / "a.png"); png(tmp_path / "b.png", BLUE)
    (tmp_path / "metadata.csv").write_text("\ufefffile_name,caption\na.png,a red square\nb.png,\"blue, square\"\n")
    ds = load(tmp_path)  # no "text" column: the lone "caption" column is used, and said so
    assert ds["text"] == ["a red square", "blue, square"]
    assert "using 'caption' for captions" in caplog.text
    with pytest.raises(ValueError, match="no caption column 'prompt'"):
        folder_rows(tmp_path, caption_column="prompt")  # asked for by name: never replaced
    (tmp_path / "metadata.csv").write_text("file_name,caption,prompt\na.png,x,y\n")
    with pytest.raises(ValueError, match="no caption column 'text'"):
        folder_rows(tmp_path)  # two candidates: no guess


def test_metadata_in_subfolders_is_relative_to_its_own_folder(tmp_path):
    (tmp_path / "cats").mkdir()
    png(tmp_path / "cats" / "c.png"); png(tmp_path / "top.png", BLUE)
    write_jsonl(tmp_path / "cats" / "metadata.jsonl", [{"file_name": "c.png", "text": "a cat"}])
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "top.png", "text": "top"},
                                              {"file_name": "cats/c.png", "text": "again"}])
    kept, report = check_rows(folder_rows(tmp_path).rows, source="t")
    assert [k.row.caption for k in kept] == ["top", "again"]  # the top folder's metadata is read first
    assert reasons_by_label(report, tmp_path) == [("cats/c.png", "duplicate")]  # its second listing
    (tmp_path / "metadata.csv").write_text("file_name,text\ntop.png,x\n")
    with pytest.raises(ValueError, match="both metadata.jsonl and metadata.csv"):
        folder_rows(tmp_path)


def test_sidecar_captions_one_per_line(tmp_path):
    png(tmp_path / "a.png"); (tmp_path / "a.txt").write_text("a red square\n")
    (tmp_path / "nested").mkdir()
    png(tmp_path / "nested" / "b.jpg", BLUE); (tmp_path / "nested" / "b.caption").write_text("blue\n\n  navy \n")
    png(tmp_path / "c.png")  # no caption file
    png(tmp_path / "d.png"); (tmp_path / "d.txt").write_text("\n \n")
    png(tmp_path / "e.PNG"); (tmp_path / "e.txt").write_text("upper-case extension")
    (tmp_path / "e.caption").write_text("loses to .txt")
    (tmp_path / ".hidden").mkdir()
    png(tmp_path / ".hidden" / "x.png"); (tmp_path / ".hidden" / "x.txt").write_text("a hidden folder is ignored")
    (tmp_path / "f.png").symlink_to(tmp_path.parent / "elsewhere.png"); png(tmp_path.parent / "elsewhere.png")
    (tmp_path / "f.txt").write_text("a symlink out")
    rows = folder_rows(tmp_path).rows
    assert [Path(r.label).name for r in rows] == ["a.png", "c.png", "d.png", "e.PNG", "f.png", "b.jpg"]
    assert [r.caption for r in rows] == ["a red square", None, "", "upper-case extension", None, ["blue", "navy"]]
    kept, report = check_rows(rows, source="t")
    assert reasons_by_label(report, tmp_path) == [("c.png", "missing caption"), ("d.png", "empty caption"),
                                                  ("f.png", "path outside the folder")]
    ds = load(tmp_path)
    assert ds["text"] == [["a red square"], ["upper-case extension"], ["blue", "navy"]]


def test_several_captions_are_picked_among(tmp_path):
    png(tmp_path / "a.png")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": ["red", "crimson", "scarlet"]}])
    cell = load(tmp_path)["text"][0]
    rng = torch.Generator().manual_seed(0)
    assert {pick_caption(cell, rng) for _ in range(50)} == {"red", "crimson", "scarlet"}


# ------------------------------------------------------------------------------- hub-style data
def good_png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(out, "PNG")
    return out.getvalue()


def hub_style_dataset():
    """Images held as encoded bytes, as a hub data set's parquet files hold them."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    good = {"bytes": good_png_bytes(), "path": None}
    return Dataset.from_dict(
        {"img": [good, {"bytes": b"junk", "path": None}, good, good],
         "caption": ["ok", "bad image", None, "ok again"], "other": [1, 2, 3, 4]},
        features=Features({"img": ImageFeature(), "caption": Value("string"), "other": Value("int32")}))


def test_a_datasets_dataset_goes_through_the_same_check(caplog):
    caplog.set_level(logging.INFO)
    ds = checked_dataset(hub_style_dataset(), image_column="img", caption_column="text", name="user/set")
    assert ds.column_names == ["image", "text", "image_hash", "width", "height"]
    assert ds["text"] == ["ok", "ok again"] and ds[1]["image"].size == (8, 6) and ds["width"] == [8, 8]
    assert ds["image_hash"][0] == ds["image_hash"][1]  # same bytes
    assert "user/set[1]: unreadable" in caplog.text and "user/set[2]: missing caption" in caplog.text
    assert "byte-identical" in caplog.text
    with pytest.raises(ValueError, match="no image column 'image'"):
        checked_dataset(hub_style_dataset(), name="user/set")


def test_dataset_name_goes_through_load_dataset_and_the_check(tmp_path):
    """The hub branch of load_captioned_dataset, offline: `load_dataset` on a local parquet folder."""
    hub_style_dataset().to_parquet(str(tmp_path / "repo" / "train.parquet"))
    ds = load_captioned_dataset(train_data_dir=None, dataset_name=str(tmp_path / "repo"), image_column="img",
                                caption_column="caption", builtin_num_images=0, resolution=32, seed=0,
                                cache_dir=str(tmp_path / "cache"))
    assert ds["text"] == ["ok", "ok again"] and ds[0]["image"].size == (8, 6)
    assert ds["image_hash"] == [hashlib.sha256(good_png_bytes()).hexdigest()] * 2


# ------------------------------------------------------------------------------- captions
def test_long_captions_are_counted_and_warned_once(tmp_path, caplog):
    from ldm.text import build_clip_tokenizer

    rows = []
    for i in range(4):
        png(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": ["short", "a red square " * 20] if i == 3
                     else "a red square " * (20 if i else 1)})
    write_jsonl(tmp_path / "metadata.jsonl", rows)
    caplog.set_level(logging.WARNING)
    load(tmp_path, tokenizer=build_clip_tokenizer(32))  # limit: the tokenizer's own 32 tokens
    warnings = [r.getMessage() for r in caplog.records if "tokens" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("3 captions are longer than 32 tokens")
    caplog.clear()
    load(tmp_path, tokenizer=build_clip_tokenizer(32), max_length=100)  # 3 * 20 + 2 = 62 tokens
    assert "tokens" not in caplog.text


# ------------------------------------------------------------------------------- image modes
def test_exif_orientation_is_applied_to_pixels_and_recorded_size(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # the left half of the stored pixels is red
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the left half ends up on top
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    (tmp_path / "r.txt").write_text("rotated")
    ds = load(tmp_path)
    assert (ds["width"][0], ds["height"][0]) == (10, 20)
    out = np.asarray(to_rgb(ds[0]["image"]))
    assert out.shape == (20, 10, 3)
    assert out[:8].mean(axis=(0, 1))[1] < 30 and out[-8:].mean(axis=(0, 1)).min() > 225  # red top, white bottom
    # the training transform starts from the same upright image (unturned, the crop would be red | white)
    pixels = make_batch_transform(10, center_crop=True, random_flip=False)(ds[:1])["pixel_values"][0]
    assert pixels.shape == (3, 10, 10) and pixels[1, :3].mean() < -0.8 and pixels[1, -3:].mean() > 0.8


@pytest.mark.parametrize("values, expected", [
    ([0, 32768, 65535], [0, 128, 255]),  # full 16-bit range onto 0..255
    ([0, 255, 257], [0, 1, 1]),  # a dark 16-bit image stays dark (not read as 8-bit)
])
def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path, values, expected):
    Image.fromarray(np.array([values], dtype=np.uint16)).save(tmp_path / "g16.png")
    out = np.asarray(to_rgb(Image.open(tmp_path / "g16.png")))
    assert out.shape == (1, 3, 3) and out[0, :, 0].tolist() == expected and (out[..., 0] == out[..., 2]).all()


def test_deep_tiff_modes_are_scaled(tmp_path):
    Image.fromarray(np.array([[0, 32768, 70000]], dtype=np.int32)).save(tmp_path / "i.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.array([[0.0, 127.0, 300.0]], dtype=np.float32)).save(tmp_path / "f255.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I" and Image.open(tmp_path / "f.tif").mode == "F"
    for name, expected in [("i.tif", [0, 128, 255]), ("f.tif", [0, 128, 255]), ("f255.tif", [0, 127, 255])]:
        assert np.asarray(to_rgb(Image.open(tmp_path / name)))[0, :, 1].tolist() == expected, name


MODE_CASES = [  # (mode, fill, RGB expected): one per Pillow mode
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent red: white, not red or black
    ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
    ("RGBa", (0, 0, 0, 0), (255, 255, 255)),
    ("LA", (0, 128), (127, 127, 127)),  # half-transparent black on white
    ("La", (0, 0), (255, 255, 255)),
    ("PA", (0, 0), (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("YCbCr", (76, 85, 255), (254, 0, 0)),
    ("HSV", (0, 255, 255), (255, 0, 0)),
    ("LAB", (128, 128, 128), (119, 119, 119)),  # L* = 50 grey
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("P", 3, (3, 0, 252)),  # the test's palette: index i -> (i, 0, 255 - i)
    ("RGBX", (1, 2, 3, 0), (1, 2, 3)),
    ("RGB", (1, 2, 3), (1, 2, 3)),
    ("I", 65535, (255, 255, 255)),
    ("I;16", 32768, (128, 128, 128)),
    ("I;16B", 65535, (255, 255, 255)),
    ("I;16L", 257, (1, 1, 1)),
    ("I;16N", 0, (0, 0, 0)),
    ("F", 0.5, (128, 128, 128)),
]


@pytest.mark.parametrize("mode, color, expected", MODE_CASES)
def test_every_pillow_mode_becomes_rgb(mode, color, expected):
    img = Image.new(mode, (4, 4), color)
    if mode in ("P", "PA"):
        img.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (4, 4)
    assert np.abs(np.asarray(out)[0, 0].astype(int) - np.array(expected)).max() <= 1


def test_the_mode_list_covers_pillow():
    assert set(Image.MODES) <= SUPPORTED_MODES  # a new Pillow mode must be added (and tested) here
    assert {mode for mode, _, _ in MODE_CASES} == SUPPORTED_MODES


def test_transparent_colour_of_an_rgb_png_is_composited_on_white(tmp_path):
    img = Image.new("RGB", (2, 1), (10, 20, 30))
    img.putpixel((1, 0), (200, 0, 0))
    img.save(tmp_path / "t.png", transparency=(10, 20, 30))  # a tRNS chunk: no alpha channel
    opened = Image.open(tmp_path / "t.png")
    assert opened.mode == "RGB" and rgb_at(opened) == (255, 255, 255) and rgb_at(opened, (1, 0)) == (200, 0, 0)


# ------------------------------------------------------------------------------- the command
def test_check_command_summary_report_and_exit_codes(planted, tmp_path, capsys):
    report = tmp_path / "report.json"
    args = ["--train_data_dir", str(planted), "--max_image_pixels", str(LIMIT), "--max_length", "0"]
    assert check_data.main([*args, "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "kept" in out and "skipped: truncated" in out and "bad items (15)" in out
    assert f"{planted / 'missing.png'}: missing file" in out and "note: 1 images are in no metadata file" in out
    data = json.loads(report.read_text())
    assert data["kept"] == 7 and data["total"] == 22 and data["skipped"]["truncated"] == 2
    assert {p["item"] for p in data["problems"] if p["reason"] == "too many pixels"} == {str(planted / "huge.png")}
    assert data["unlisted"] == [str(planted / "unlisted.png")]

    assert check_data.main([*args, "--on_bad_data", "fail"]) == 1
    assert "15 bad items of 22" in capsys.readouterr().err

    good = tmp_path / "good"
    good.mkdir()
    png(good / "a.png"); (good / "a.txt").write_text("a red box " * 30)
    assert check_data.main(["--train_data_dir", str(good)]) == 0  # a long caption is a note, not a failure
    out = capsys.readouterr().out
    # counted against the model's own limit: the tiny preset cuts at 32 tokens, sd15 at 77
    assert re.search(r"captions over 32 tokens \(kept, truncated\) +1\n", out) and "92 tokens" in out
    assert check_data.main(["--train_data_dir", str(good), "--preset", "sd15"]) == 0
    assert re.search(r"captions over 77 tokens \(kept, truncated\) +1\n", capsys.readouterr().out)
    (tmp_path / "sd" / "tokenizer").mkdir(parents=True)  # a pretrained model: its tokenizer's limit
    (tmp_path / "sd" / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 100}')
    assert check_data.main(["--train_data_dir", str(good), "--pretrained_model_name_or_path", str(tmp_path / "sd")]) == 0
    assert re.search(r"captions over 100 tokens \(kept, truncated\) +0\n", capsys.readouterr().out)
    assert check_data.main(["--train_data_dir", str(tmp_path / "nope")]) == 2
    assert check_data.main(["--train_data_dir", str(good), "--max_image_pixels", "0"]) == 2
    assert check_data.main(["--train_data_dir", str(tmp_path / "good"), "--caption_column", "x"]) == 0  # sidecars


def test_check_command_runs_as_a_script(tmp_path):
    png(tmp_path / "a.png"); (tmp_path / "a.txt").write_text("red")
    (tmp_path / "b.png").write_bytes(b"junk"); (tmp_path / "b.txt").write_text("junk")
    proc = subprocess.run([sys.executable, "training/check_data.py", "--train_data_dir", str(tmp_path),
                           "--max_length", "0"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and f"{tmp_path / 'b.png'}: unreadable" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------- built-in data
@pytest.mark.parametrize("colors", ["named", "random"])
def test_builtin_data_is_unchanged(colors):
    from ldm.synthetic import make_dataset

    ds = load_captioned_dataset(train_data_dir=None, dataset_name=None, image_column="image", caption_column="text",
                                builtin_num_images=12, resolution=32, seed=3, builtin_colors=colors)
    ref = make_dataset(12, 32, 3, colors)
    assert ds.column_names == ref.column_names == ["image", "text"] and ds["text"] == ref["text"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ds["image"], ref["image"]))


def test_nothing_usable_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        load(tmp_path)
    (tmp_path / "a.png").write_bytes(b"junk"); (tmp_path / "a.txt").write_text("junk")
    with pytest.raises(ValueError, match="every one of 1 items is bad"):
        checked_folder(tmp_path)
