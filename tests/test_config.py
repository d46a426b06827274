"""ldm/config.py and ldm/presets.py: defaults < YAML (`--config`) < command-line flags, validation, presets, --help."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from ldm.config import TrainConfig, build_parser, fill_objective, resolve_train_config, save_config
from ldm.errors import UsageError
from ldm.presets import PRESETS, ObjectiveConfig, model_preset


def _write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def pipeline_folder(path):
    """An empty diffusers pipeline layout: what the startup check of a pretrained folder looks for."""
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (path / part).mkdir(parents=True)
    return path


def resolved(cfg: TrainConfig) -> TrainConfig:
    """A config with the unset objective flags filled in from its preset, as the CLI does."""
    return fill_objective(cfg, model_preset(cfg.preset).objective)


# ------------------------------------------------------------------------------- defaults / flags
def test_no_flags_gives_dataclass_defaults_with_the_presets_objective():
    tiny = model_preset("tiny").objective
    expected = dataclasses.replace(
        TrainConfig(), snr_gamma=tiny.snr_gamma, timestep_bias_strategy=tiny.timestep_bias_strategy,
        timestep_bias_multiplier=tiny.timestep_bias_multiplier, timestep_bias_portion=tiny.timestep_bias_portion,
        timestep_bias_end_multiplier=tiny.timestep_bias_end_multiplier,
        train_text_encoder=tiny.train_text_encoder, text_encoder_lr=tiny.text_encoder_lr,
        train_token_embedding=tiny.train_token_embedding, learning_rate=tiny.learning_rate,
        max_train_steps=tiny.max_train_steps)
    assert resolve_train_config([]) == expected
    assert (expected.learning_rate, expected.max_train_steps) == (1e-3, 3600)


def test_the_dit_preset_trains_longer_and_faster_unless_told_otherwise(tmp_path):
    """tiny-dit's recipe (8,000 steps at 3e-3: tiny's wall time); flags win; fine-tuning a
    pretrained model keeps the usual defaults whatever the preset."""
    cfg = resolve_train_config(["--preset", "tiny-dit"])
    assert (cfg.learning_rate, cfg.max_train_steps) == (3e-3, 8000)
    cfg = resolve_train_config(["--preset", "tiny-dit", "--learning_rate", "5e-4", "--max_train_steps", "10"])
    assert (cfg.learning_rate, cfg.max_train_steps) == (5e-4, 10)
    cfg = resolve_train_config(["--preset", "tiny-dit", "--pretrained_model_name_or_path",
                                str(pipeline_folder(tmp_path / "sd"))])
    assert (cfg.learning_rate, cfg.max_train_steps) == (1e-3, 3600)
    with pytest.raises(UsageError, match="--max_train_steps must be >= 1, got 0"):
        resolve_train_config(["--preset", "tiny-dit", "--max_train_steps", "0"])


def test_objective_comes_from_the_preset_unless_given(tmp_path):
    tiny = model_preset("tiny").objective
    assert tiny != ObjectiveConfig()  # the tiny preset really has its own objective
    cfg = resolve_train_config([])
    assert (cfg.snr_gamma, cfg.timestep_bias_strategy) == (tiny.snr_gamma, tiny.timestep_bias_strategy)
    # given flags win, and 0 switches min-SNR off
    cfg = resolve_train_config(["--snr_gamma", "0", "--timestep_bias_strategy", "none"])
    assert cfg.snr_gamma is None and cfg.timestep_bias_strategy == "none"
    assert resolve_train_config(["--snr_gamma", "3"]).snr_gamma == 3.0
    # the jointly trained text encoder learns 10x slower than the U-Net unless told otherwise
    assert resolve_train_config([]).text_encoder_lr == 1e-4
    assert resolve_train_config(["--text_encoder_lr", "1e-3"]).text_encoder_lr == 1e-3
    # ... and keeps its token embedding table as initialised unless told otherwise
    assert resolve_train_config([]).train_token_embedding is False
    assert resolve_train_config(["--train_token_embedding"]).train_token_embedding is True
    # the timestep bias anneals only when asked; 0 keeps the multiplier constant
    assert resolve_train_config([]).timestep_bias_end_multiplier is None
    assert resolve_train_config(["--timestep_bias_end_multiplier", "1"]).timestep_bias_end_multiplier == 1.0
    constant = resolve_train_config(["--timestep_bias_end_multiplier", "0"])
    assert constant.timestep_bias_end_multiplier == 0.0  # kept as 0, so a saved train_config.yaml stays constant
    save_config(constant, tmp_path / "constant.yaml")
    assert resolve_train_config(["--config", str(tmp_path / "constant.yaml")]).timestep_bias_end_multiplier == 0.0
    folder = pipeline_folder(tmp_path / "sd")
    assert resolve_train_config(["--pretrained_model_name_or_path", str(folder)]).timestep_bias_end_multiplier is None
    # a pretrained model gets the Stable Diffusion objective, not the tiny preset's
    cfg = resolve_train_config(["--pretrained_model_name_or_path", str(folder)])
    assert (cfg.snr_gamma, cfg.timestep_bias_strategy, cfg.train_text_encoder) == (5.0, "none", None)
    assert cfg.text_encoder_lr is None  # --train_text_encoder then uses --learning_rate
    assert cfg.train_token_embedding is True  # ... and trains all of the encoder


def test_bad_timestep_bias_is_refused():
    with pytest.raises(ValueError, match="timestep_bias_strategy"):
        resolve_train_config(["--timestep_bias_strategy", "middle"])
    with pytest.raises(ValueError, match="timestep_bias_portion"):
        resolve_train_config(["--timestep_bias_strategy", "later", "--timestep_bias_portion", "0"])


def test_defaults_known_values():
    cfg = resolve_train_config([])
    assert cfg.preset == "tiny"
    assert cfg.train_batch_size == 32
    assert cfg.learning_rate == 1e-3
    assert cfg.use_ema is True
    assert cfg.center_crop is True and cfg.random_flip is False
    assert cfg.prediction_type is None and cfg.resolution is None and cfg.config is None
    assert len(cfg.validation_prompts) == 4 and all(isinstance(p, str) for p in cfg.validation_prompts)


def test_default_list_is_not_shared_between_configs():
    a, b = resolve_train_config([]), resolve_train_config([])
    a.validation_prompts.append("x")
    assert "x" not in b.validation_prompts and "x" not in TrainConfig().validation_prompts


def test_flags_override_defaults_with_types():
    cfg = resolve_train_config(["--train_batch_size", "4", "--learning_rate", "2e-4",
                                "--resolution", "64", "--output_dir", "out/x",
                                "--prediction_type", "v_prediction", "--preset", "sd15"])
    assert cfg.train_batch_size == 4 and isinstance(cfg.train_batch_size, int)
    assert cfg.learning_rate == 2e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.resolution == 64
    assert cfg.output_dir == "out/x"
    assert cfg.prediction_type == "v_prediction"
    assert cfg.preset == "sd15"
    # everything else untouched (the objective is the sd15 preset's)
    changed = {"train_batch_size", "learning_rate", "resolution", "output_dir", "prediction_type"}
    d, default = cfg.to_dict(), resolved(TrainConfig(preset="sd15")).to_dict()
    assert {k for k in d if d[k] != default[k]} == changed


@pytest.mark.parametrize("argv,expected", [
    ([], True), (["--use_ema"], True), (["--no-use_ema"], False),
    (["--no-use_ema", "--use_ema"], True),  # the last one given wins
])
def test_boolean_flags(argv, expected):
    assert resolve_train_config(argv).use_ema is expected


def test_boolean_flags_for_default_false():
    assert resolve_train_config(["--random_flip"]).random_flip is True
    assert resolve_train_config(["--no-random_flip"]).random_flip is False
    assert resolve_train_config(["--no-center_crop"]).center_crop is False


def test_list_flag_gives_list():
    assert resolve_train_config(["--validation_prompts", "a", "b"]).validation_prompts == ["a", "b"]


def test_list_flag_with_one_value_gives_list():
    assert resolve_train_config(["--validation_prompts", "one cat"]).validation_prompts == ["one cat"]


def test_list_flag_wins_over_yaml(tmp_path):
    path = _write_yaml(tmp_path / "c.yaml", {"validation_prompts": ["p"]})
    cfg = resolve_train_config(["--config", path, "--validation_prompts", "q", "r"])
    assert cfg.validation_prompts == ["q", "r"]


def test_bad_int_flag_exits():
    with pytest.raises(SystemExit):
        resolve_train_config(["--train_batch_size", "four"])


def test_unknown_flag_exits():
    with pytest.raises(SystemExit):
        resolve_train_config(["--no_such_flag", "1"])


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("value", ["sample", "eps", "x0"])
def test_bad_prediction_type_raises(value):
    with pytest.raises(ValueError, match="prediction_type"):
        resolve_train_config(["--prediction_type", value])


def test_missing_train_data_dir_raises(tmp_path):
    with pytest.raises(UsageError, match="missing: no such folder"):
        resolve_train_config(["--train_data_dir", str(tmp_path / "missing")])


def test_existing_train_data_dir_accepted(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not read at startup")
    (tmp_path / "a.txt").write_text("a red circle")
    assert resolve_train_config(["--train_data_dir", str(tmp_path)]).train_data_dir == str(tmp_path)


def test_train_data_dir_is_a_file_raises(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        resolve_train_config(["--train_data_dir", str(f)])


@pytest.mark.parametrize("files,match", [
    ({}, "no images found"),
    ({"notes.md": "x", "data.bin": "y"}, "no images found"),
    ({"a.png": "x"}, r"none of its 1 images is usable \(e.g. .*a.png: missing caption"),
    ({"a.png": "x", "metadata.jsonl": '{"file_name": "a.png", "caption": "c", "prompt": "p"}'},
     "no caption column 'text'"),
])
def test_unusable_data_folder_is_refused_at_startup(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UsageError, match=match):
        resolve_train_config(["--train_data_dir", str(tmp_path)])


def test_unknown_caption_column_is_named(tmp_path):
    (tmp_path / "a.png").write_text("x")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "c"}\n')
    with pytest.raises(UsageError, match="no caption column 'words'"):
        resolve_train_config(["--train_data_dir", str(tmp_path), "--caption_column", "words"])


@pytest.mark.parametrize("value,match", [
    ("33", r"--resolution 33: must be a multiple of 8 \(the VAE's x2 times the U-Net's x4 downsampling\); "
           "nearest: 32 or 40"),
    ("-32", "--resolution -32: must be a multiple of 8 .*nearest: 8"),
    ("0", "--resolution 0: .*nearest: 8"),
])
def test_resolution_must_fit_the_models_downsampling(value, match):
    with pytest.raises(UsageError, match=match):
        resolve_train_config(["--resolution", value])
    assert resolve_train_config(["--resolution", "40"]).resolution == 40


def test_resolution_of_a_local_pretrained_folder_uses_its_configs(tmp_path):
    import json

    pipeline_folder(tmp_path)
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"block_out_channels": [8, 16, 32, 32]}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 16, 32, 32]}))
    with pytest.raises(UsageError, match="multiple of 64 .*x8 times the U-Net's x8.*nearest: 64 or 128"):
        resolve_train_config(["--pretrained_model_name_or_path", str(tmp_path), "--resolution", "100"])
    assert resolve_train_config(["--pretrained_model_name_or_path", str(tmp_path), "--resolution", "128"])


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(UsageError, match="--output_dir .*out: not a folder"):
        resolve_train_config(["--output_dir", str(f)])
    with pytest.raises(UsageError, match="its parent .*out is a file"):
        resolve_train_config(["--output_dir", str(f / "sub")])


def test_resume_must_be_latest_or_a_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert resolve_train_config(["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    with pytest.raises(UsageError, match="--resume_from_checkpoint checkpoint-7: no such checkpoint folder"):
        resolve_train_config(["--output_dir", str(out), "--resume_from_checkpoint", "checkpoint-7"])
    ckpt = out / "checkpoints" / "checkpoint-7"
    ckpt.mkdir(parents=True)
    with pytest.raises(UsageError, match="not a complete checkpoint folder"):
        resolve_train_config(["--output_dir", str(out), "--resume_from_checkpoint", "checkpoint-7"])
    (ckpt / "COMPLETE").write_text("{}")
    cfg = resolve_train_config(["--output_dir", str(out), "--resume_from_checkpoint", "checkpoint-7"])
    assert cfg.resume_from_checkpoint == str(ckpt)  # a bare name is the one under --output_dir


@pytest.mark.parametrize("argv,match", [
    (["--preset", "nope"], "nope"),
    (["--caption_dropout", "1.0"], "caption_dropout"),
    (["--caption_dropout", "-0.1"], "caption_dropout"),
    (["--train_batch_size", "0"], "train_batch_size"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--max_train_steps", "0"], "max_train_steps"),
    (["--num_validation_images", "-1"], "num_validation_images must be >= 0"),
    (["--checkpointing_steps", "-5"], "checkpointing_steps must be >= 0"),
    (["--attention_backend", "flash"], "attention_backend"),
    (["--train_dtype", "float16"], "train_dtype"),
    (["--train_dtype", "float64", "--mixed_precision", "bf16"], "train_dtype float64"),
    (["--dataset_name", "x/y", "--train_data_dir", "."], "not both"),
])
def test_invalid_values_raise(argv, match):
    with pytest.raises(ValueError, match=match):
        resolve_train_config(argv)


# ------------------------------------------------------------------------------- YAML
def test_yaml_is_read(tmp_path):
    path = _write_yaml(tmp_path / "c.yaml", {"train_batch_size": 8, "use_ema": False,
                                             "validation_prompts": ["p"], "learning_rate": 0.0005})
    cfg = resolve_train_config(["--config", path])
    assert cfg.train_batch_size == 8
    assert cfg.use_ema is False
    assert cfg.validation_prompts == ["p"]
    assert cfg.learning_rate == 0.0005
    assert cfg.config == path
    assert cfg.max_train_steps == model_preset("tiny").objective.max_train_steps  # keys not in the file keep defaults


@pytest.mark.parametrize("order", ["config_first", "config_last"])
def test_flags_win_over_yaml(tmp_path, order):
    path = _write_yaml(tmp_path / "c.yaml", {"train_batch_size": 8, "use_ema": False,
                                             "learning_rate": 0.5, "validation_prompts": ["p"],
                                             "seed": 3})
    flags = ["--train_batch_size", "2", "--use_ema", "--learning_rate", "0.25"]
    argv = ["--config", path, *flags] if order == "config_first" else [*flags, "--config", path]
    cfg = resolve_train_config(argv)
    assert cfg.train_batch_size == 2
    assert cfg.use_ema is True
    assert cfg.learning_rate == 0.25
    assert cfg.seed == 3 and cfg.validation_prompts == ["p"]  # not given as flags: the YAML's values


def test_flag_equal_to_default_still_wins_over_yaml(tmp_path):
    """A flag given with the default value must still beat the file (SUPPRESS-based detection)."""
    path = _write_yaml(tmp_path / "c.yaml", {"train_batch_size": 8})
    assert resolve_train_config(["--config", path, "--train_batch_size", "32"]).train_batch_size == 32


def test_unknown_yaml_key_raises_naming_it(tmp_path):
    path = _write_yaml(tmp_path / "c.yaml", {"train_batch_size": 8, "learning_rat": 1.0})
    with pytest.raises(ValueError, match="learning_rat"):
        resolve_train_config(["--config", path])


# PyYAML (YAML 1.1) reads `1e-4` (no dot) as the *string* "1e-4": values must be coerced to the
# field's type, or refused with an error naming the key.
@pytest.mark.parametrize("text,key,expected", [
    ("learning_rate: 1e-4\n", "learning_rate", 1e-4),
    ("train_batch_size: '8'\n", "train_batch_size", 8),
    ("validation_prompts: a cat\n", "validation_prompts", ["a cat"]),
    ("use_ema: 'no'\n", "use_ema", False),
])
def test_yaml_values_get_field_types(tmp_path, text, key, expected):
    """Either coerced to the annotated type, or rejected with a ValueError naming the key."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        cfg = resolve_train_config(["--config", str(path)])
    except ValueError as err:
        assert key in str(err)
        return
    value = getattr(cfg, key)
    assert value == expected and type(value) is type(expected)


def test_yaml_values_are_validated(tmp_path):
    path = _write_yaml(tmp_path / "c.yaml", {"prediction_type": "sample"})
    with pytest.raises(ValueError, match="prediction_type"):
        resolve_train_config(["--config", path])


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert resolve_train_config(["--config", str(path)]) == resolved(TrainConfig(config=str(path)))


def test_non_mapping_yaml_raises(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        resolve_train_config(["--config", str(path)])


def test_missing_yaml_raises(tmp_path):
    with pytest.raises(UsageError, match="nope.yaml: no such file"):
        resolve_train_config(["--config", str(tmp_path / "nope.yaml")])


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 1e-4\nseed: [1, 2\n")
    with pytest.raises(UsageError, match=r"bad.yaml: not valid YAML at line 3"):
        resolve_train_config(["--config", str(path)])


def test_save_config_round_trips(tmp_path):
    cfg = resolve_train_config(["--train_batch_size", "4", "--learning_rate", "1e-5",
                                "--no-use_ema", "--prediction_type", "v_prediction",
                                "--mixed_precision", "bf16", "--resolution", "64",
                                "--checkpoints_total_limit", "3"])
    cfg = dataclasses.replace(cfg, validation_prompts=["a", "b c: d", "1e-4", "yes"])  # YAML-tricky
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    back = resolve_train_config(["--config", str(path)])
    # `config` records which file was read; every other field comes back equal, types included
    assert dataclasses.replace(back, config=None) == cfg
    for f in dataclasses.fields(TrainConfig):
        if f.name != "config":
            assert type(getattr(back, f.name)) is type(getattr(cfg, f.name)), f.name


def test_save_config_round_trips_defaults_and_sd15(tmp_path):
    for cfg in (resolved(TrainConfig()), resolved(TrainConfig(preset="sd15", learning_rate=1e-4, ema_decay=0.9999))):
        path = tmp_path / "c.yaml"
        save_config(cfg, path)
        assert resolve_train_config(["--config", str(path)]) == dataclasses.replace(cfg, config=str(path))


def test_save_model_config_writes_plain_yaml(tmp_path):
    path = tmp_path / "model.yaml"
    save_config(model_preset("tiny"), path)
    data = yaml.safe_load(path.read_text())  # safe_load: no python tags such as !!python/tuple
    assert data["resolution"] == 32
    assert data["unet"]["block_out_channels"] == [32, 64, 128]
    assert data["noise"]["beta_schedule"] == "squaredcos_cap_v2"
    assert data["noise"]["prediction_type"] == "v_prediction"


# ------------------------------------------------------------------------------- --help
def test_help_shows_defaults():
    text = " ".join(build_parser().format_help().split())  # undo argparse's line wrapping
    assert "(default: tiny)" in text
    assert "(default: 32)" in text  # train_batch_size
    assert "(default: True)" in text  # use_ema
    assert "--use_ema, --no-use_ema" in text
    assert "(default: None)" in text
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text
    assert "(default: the preset's)" in text  # resolution: said in words, once
    assert "the preset's) (default" not in text


def test_help_text_names_a_default_once():
    for action in build_parser()._actions[1:]:
        assert action.help.count("default") == 1, action.help


def test_every_field_has_a_flag_and_help():
    parser = build_parser()
    dests = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in dests, f.name
        assert f.metadata.get("help"), f"{f.name} has no help text"
        assert "default" in dests[f.name].help


# ------------------------------------------------------------------------------- presets
def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="nope"):
        model_preset("nope")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_latent_size(name):
    m = model_preset(name)
    assert m.vae.downsample_factor == 2 ** (len(m.vae.block_out_channels) - 1)
    assert m.resolution % m.vae.downsample_factor == 0
    if m.dit:  # a DiT: the latent side is a whole number of patches
        assert m.unet is None and (m.resolution // m.vae.downsample_factor) % m.dit.patch_size == 0
    else:
        assert len(m.unet.cross_attention) == len(m.unet.block_out_channels)


def test_tiny_preset_known_answers():
    m = model_preset("tiny")
    assert m.resolution == 32
    assert m.vae.downsample_factor == 2
    assert m.resolution // m.vae.downsample_factor == 16  # 16x16x4 latents, as documented
    assert m.vae.latent_channels == 4


def test_sd15_preset_known_answers():
    m = model_preset("sd15")
    assert m.resolution == 512
    assert m.vae.downsample_factor == 8
    assert m.resolution // m.vae.downsample_factor == 64  # 64x64x4 latents
    assert m.vae.scaling_factor == 0.18215
    assert m.text.max_length == 77


def test_presets_are_fresh_and_frozen():
    a, b = model_preset("tiny"), model_preset("tiny")
    assert a == b
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.resolution = 64  # type: ignore[misc]


@pytest.mark.parametrize("text", ["train_batch_size: 1.5\n", "use_ema: maybe\n", "seed: [1, 2]\n",
                                  "gradient_accumulation_steps:\n"])
def test_bad_yaml_values_name_the_key(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=text.split(":")[0]):
        resolve_train_config(["--config", str(path)])


def test_help_is_answered_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom ldm.config import exit_early_for_help\nexit_early_for_help(argv=[])\n"
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
            "exit_early_for_help(argv=['--seed', '1', '--help'])\nraise SystemExit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # --help exits 0, before the line that would exit 3
    assert "--resolution" in proc.stdout and "(default: tiny)" in proc.stdout
