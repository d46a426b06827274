"""Sample grids carry each row's prompt and a title: ldm.images.labelled_grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from ldm.images import LABEL_WIDTH, _wrap, image_grid, labelled_grid


def cells(rows=2, cols=3, size=32):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(rows * cols)]


def test_sizes_and_untouched_cells():
    images = cells()
    plain = np.asarray(image_grid(images, cols=3))
    grid = labelled_grid(images, rows=2, cols=3, row_labels=["a red circle", "a blue square"], title="step 500")
    top = grid.height - 2 * 32
    assert grid.size == (LABEL_WIDTH + 3 * 32, top + 2 * 32) and top > 0
    assert np.array_equal(np.asarray(grid)[top:, LABEL_WIDTH:], plain)  # the images, unchanged
    assert labelled_grid(images, rows=2, cols=3).size == (96, 64)  # no labels, no title: image_grid's size
    assert labelled_grid(images, rows=2, cols=3, title="t").width == 96


def test_labels_and_title_are_drawn_and_differ_by_text():
    images = cells()
    arr = np.asarray(labelled_grid(images, rows=2, cols=3, row_labels=["a red circle", "a blue square"],
                                   title="step 500"))
    top = arr.shape[0] - 64
    unlabelled = np.asarray(labelled_grid(images, rows=2, cols=3, row_labels=["", ""], title=""))
    assert unlabelled.shape == arr.shape
    for region in (np.s_[:top], np.s_[top:top + 32, :LABEL_WIDTH], np.s_[top + 32:, :LABEL_WIDTH]):
        assert (arr[region] != unlabelled[region]).any(), region  # title, row 1's label, row 2's label
        assert (unlabelled[region] == 255).all()
    other = np.asarray(labelled_grid(images, rows=2, cols=3, row_labels=["a red circle", "a green star"],
                                     title="step 500"))
    assert np.array_equal(other[top:top + 32], arr[top:top + 32])  # same first label
    assert not np.array_equal(other[top + 32:, :LABEL_WIDTH], arr[top + 32:, :LABEL_WIDTH])


def test_long_prompts_are_wrapped_then_cut_to_the_row():
    font = ImageFont.load_default()
    prompt = "a yellow circle on the left and a purple square on the right, " * 4
    lines = _wrap(prompt, font, LABEL_WIDTH - 8, max_lines=2)
    assert len(lines) == 2 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= LABEL_WIDTH - 8 for line in lines)
    assert _wrap("a red circle", font, LABEL_WIDTH - 8, max_lines=2) == ["a red circle"]
    long_word = _wrap("x" * 200, font, 50, max_lines=100)
    assert "".join(long_word) == "x" * 200 and all(font.getlength(line) <= 50 for line in long_word)
    # a long prompt stays in its row: the cells and the next row's label area are unchanged
    images = cells(rows=2, cols=2)
    a = np.asarray(labelled_grid(images, rows=2, cols=2, row_labels=[prompt, ""]))
    b = np.asarray(labelled_grid(images, rows=2, cols=2, row_labels=["", ""]))
    assert np.array_equal(a[32:], b[32:]) and np.array_equal(a[:, LABEL_WIDTH:], b[:, LABEL_WIDTH:])


@pytest.mark.parametrize("kw, message", [
    (dict(rows=1, cols=3), "6 images do not fit 1 rows x 3 columns"),
    (dict(rows=2, cols=3, row_labels=["one"]), "1 row labels for 2 rows"),
])
def test_mistakes(kw, message):
    with pytest.raises(ValueError, match=message):
        labelled_grid(cells(), **kw)


def test_evaluation_grid_has_a_labelled_row_per_case_and_the_scores_in_its_title(tmp_path):
    from ldm.evaluation import save_report

    report = {"all": 0.5, "color": 1.0, "shape": 0.5, "position": 0.75, "images": 4,
              "cases": [{"prompt": "a red circle on the left"}, {"prompt": "a blue square at the top"}]}
    images = cells(rows=2, cols=2)
    save_report(report, images, tmp_path, images_per_case=2, title="step 40")
    grid = np.asarray(Image.open(tmp_path / "eval_grid.png").convert("RGB"))
    top = grid.shape[0] - 64
    assert grid.shape[1] == LABEL_WIDTH + 64 and top > 0
    assert np.array_equal(grid[top:, LABEL_WIDTH:], np.asarray(image_grid(images, cols=2)))
    expected = labelled_grid(images, rows=2, cols=2, row_labels=[c["prompt"] for c in report["cases"]],
                             title="step 40: all attributes 50.0% | colour 100.0% | shape 50.0% | "
                                   "position 75.0% (4 images)")
    assert np.array_equal(grid, np.asarray(expected))
