"""Tag-style captions (ldm/captions.py): shuffle, keep_tokens, tag dropout, prefix; their flags."""

from __future__ import annotations

import re

import pytest
import torch

from ldm.captions import TagOptions, add_prefix, process_tags, split_tags, tag_captions, with_prefix
from ldm.config import resolve_train_config
from ldm.draws import sample_generators
from ldm.errors import UsageError

CAPTION = "sks, red hair, smiling, outdoors, night"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_split_tags_strips_and_drops_empty_tags():
    assert split_tags(" a ,b,, c ,") == ["a", "b", "c"]
    assert split_tags("a photo of a dog") == ["a photo of a dog"]


def test_nothing_asked_returns_the_caption_and_draws_nothing():
    g = gen()
    assert process_tags("b,a,  c", TagOptions(prefix="x, "), g) == "b,a,  c"
    assert torch.equal(g.get_state(), gen().get_state())


def test_shuffle_is_the_generators_permutation_after_the_kept_tags():
    opts = TagOptions(shuffle=True, keep_tokens=1)
    perm = torch.randperm(4, generator=gen(3)).tolist()  # the draw process_tags makes for 4 free tags
    rest = ["red hair", "smiling", "outdoors", "night"]
    assert process_tags(CAPTION, opts, gen(3)) == ", ".join(["sks"] + [rest[i] for i in perm])
    assert perm != [0, 1, 2, 3]  # the known answer is a real shuffle


def test_dropout_keeps_a_tag_when_its_uniform_draw_is_at_least_p():
    opts = TagOptions(dropout=0.5, keep_tokens=2)
    draws = torch.rand(3, generator=gen(1)).tolist()  # one per tag after the 2 kept
    rest = ["smiling", "outdoors", "night"]
    expected = ["sks", "red hair"] + [t for t, u in zip(rest, draws) if u >= 0.5]
    assert process_tags(CAPTION, opts, gen(1)) == ", ".join(expected)


def test_dropout_rate_and_kept_tags_over_many_draws():
    opts = TagOptions(dropout=0.25, keep_tokens=1, shuffle=True)
    g = gen(7)
    outs = [split_tags(process_tags(CAPTION, opts, g)) for _ in range(2000)]
    assert all(o[0] == "sks" for o in outs)  # kept in place, never dropped
    kept = sum(len(o) - 1 for o in outs) / (4 * len(outs))
    assert abs(kept - 0.75) < 0.02
    assert len({tuple(o) for o in outs if len(o) == 5}) == 24  # every order of the 4 free tags shows up


def test_prefix_is_never_shuffled_or_dropped_and_not_counted_in_keep_tokens():
    opts = TagOptions(shuffle=True, dropout=0.5, keep_tokens=1, prefix="sks style, ")
    g = gen(0)
    for _ in range(50):
        out = process_tags("sks style, 1girl, a, b, c", opts, g)
        assert out.startswith("sks style, 1girl")
    # a caption without the prefix (a class prompt) is processed as a whole
    assert process_tags("a photo of a dog", TagOptions(shuffle=True, prefix="sks style, "), gen()) == "a photo of a dog"


def test_batch_uses_each_samples_generator_and_leaves_class_prompts_untouched():
    opts = TagOptions(shuffle=True, dropout=0.3)
    caps = [CAPTION, CAPTION, "a, b, c"]
    out = tag_captions(caps, opts, sample_generators(0, 5, [3, 4, 9]), untouched=[False, False, True])
    assert out[2] == "a, b, c"
    # sample 4's draw does not depend on its neighbours in the batch (resume, process count)
    alone = tag_captions([CAPTION], opts, sample_generators(0, 5, [4]))
    assert out[1] == alone[0]
    assert tag_captions(caps, opts, sample_generators(0, 5, [3, 4, 9]))[:2] == out[:2]


def test_add_prefix_to_cells_and_to_a_dataset():
    from datasets import Dataset, Features, List, Value

    assert add_prefix("a", "t, ") == "t, a" and add_prefix(["a", "b"], "t, ") == ["t, a", "t, b"]
    assert add_prefix("a", "") == "a"
    ds = Dataset.from_dict({"text": [["a", "b"], ["c"]], "n": [1, 2]},
                           features=Features({"text": List(Value("string")), "n": Value("int32")}))
    out = with_prefix(ds, "t, ")
    assert out["text"] == [["t, a", "t, b"], ["t, c"]] and out["n"] == [1, 2]
    assert out.features["text"] == ds.features["text"]


@pytest.mark.parametrize("flags, message", [
    (["--keep_tokens", "-1"], "--keep_tokens must be >= 0"),
    (["--tag_dropout", "1"], "--tag_dropout must be in [0, 1)"),
])
def test_bad_tag_flags_are_one_line_errors(flags, message, tmp_path):
    with pytest.raises(UsageError, match=re.escape(message)):
        resolve_train_config(["--output_dir", str(tmp_path / "o"), *flags])


def test_tag_options_from_flags(tmp_path):
    cfg = resolve_train_config(["--output_dir", str(tmp_path / "o"), "--shuffle_tags", "--keep_tokens", "2",
                                "--tag_dropout", "0.1", "--caption_prefix", "sks style, "])
    opts = TagOptions.from_config(cfg)
    assert opts == TagOptions(shuffle=True, keep_tokens=2, dropout=0.1, prefix="sks style, ") and opts.random
    assert not TagOptions.from_config(resolve_train_config(["--output_dir", str(tmp_path / "p")])).random
