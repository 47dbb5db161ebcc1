"""Stacked YAML + dotlist overrides, validated against the schema with key paths in errors."""
import pytest

from tora.config import ConfigError, load_config


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_later_files_and_command_line_win(tmp_path):
    a = write(tmp_path, "a.yaml", "model:\n  sampler_config:\n    params:\n      num_steps: 30\n  scale_factor: 0.5\n")
    b = write(tmp_path, "b.yaml", "model:\n  sampler_config:\n    params:\n      num_steps: 40\n")
    cfg = load_config([a, b], ["model.sampler_config.params.guider_config.params.scale=3"])
    assert cfg.model.sampler_config.params.num_steps == 40
    assert cfg.model.scale_factor == 0.5
    assert cfg.model.sampler_config.params.guider_config.params.scale == 3
    assert load_config([a, b], ["model.sampler_config.params.num_steps=20"]).model.sampler_config.params.num_steps == 20


def test_unknown_key_names_path_and_file(tmp_path):
    bad = write(tmp_path, "bad.yaml", "model:\n  network_config:\n    params:\n      num_layer: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.network_config.params.num_layer' \(in .*bad.yaml\)"):
        load_config([bad])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.samplr' \(in command line\)"):
        load_config([], ["model.samplr=1"])


def test_wrong_types_and_choices(tmp_path):
    with pytest.raises(ConfigError, match="model.network_config.params.hidden_size.*could not be converted"):
        load_config([], ["model.network_config.params.hidden_size=wide"])
    with pytest.raises(ConfigError, match="invalid value 'sometimes' for 'model.motion.cache'"):
        load_config([], ["model.motion.cache=sometimes"])


def test_unsupported_target_is_named(tmp_path):
    bad = write(tmp_path, "t.yaml", "model:\n  sampler_config:\n    target: sgm.EulerEDMSampler\n")
    with pytest.raises(ConfigError, match="unsupported target 'sgm.EulerEDMSampler' at 'model.sampler_config.target'"):
        load_config([bad])


def test_consistency_checks():
    with pytest.raises(ConfigError, match="hidden_size_head"):
        load_config([], ["model.network_config.params.num_attention_heads=24"])
    with pytest.raises(ConfigError, match="num_frames 48 must be 1 \\+ k"):
        load_config([], ["model.network_config.params.num_frames=48"])


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config([tmp_path / "missing.yaml"])
    broken = write(tmp_path, "broken.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse config file .*broken.yaml"):
        load_config([broken])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config([], ["num_steps"])


def test_override_with_broken_yaml_value():
    with pytest.raises(ConfigError, match="cannot parse command-line overrides"):
        load_config([], ["model.first_stage_config.params.ignore_keys=[loss"])


def test_every_project_target_names_an_existing_object():
    import importlib

    from tora.config import TARGETS
    for owner, allowed in TARGETS.items():
        for target in (t for t in allowed if t.startswith("tora.")):
            module, name = target.rsplit(".", 1)
            assert hasattr(importlib.import_module(module), name), f"{owner}: {target}"


@pytest.mark.parametrize("recipe, offload, chunk, encode_tile, decode_tile", [
    ("24gb.yaml", "model", 8, 0, 32), ("8gb.yaml", "sequential", 8, 32, 32)])
def test_shipped_memory_recipes_stack_after_the_inference_config(recipe, offload, chunk, encode_tile, decode_tile):
    from pathlib import Path
    configs = Path(__file__).resolve().parents[1] / "configs/tora"
    cfg = load_config([configs / "model/cogvideox_5b_tora.yaml", configs / "inference.yaml", configs / "memory" / recipe])
    vae = cfg.model.first_stage_config.params
    assert (cfg.args.offload, vae.encode_chunk_frames, vae.encode_tile_latent_size, vae.decode_tile_latent_size) == (
        offload, chunk, encode_tile, decode_tile)
    assert cfg.model.network_config.params.num_layers == 42  # the model config is untouched


# -- command line (issue 14, defect 2) -----------------------------------------------------------

def sample_cli(argv, capsys):
    """sample_video.py's parser on ``argv``; returns (options or None, stderr)."""
    import sample_video
    try:
        return sample_video.parse_args(["--base", "m.yaml", *argv]), ""
    except SystemExit as exit_info:
        assert exit_info.code == 2
        return None, capsys.readouterr().err


def test_a_token_that_is_not_key_value_is_an_error_naming_it(capsys):
    options, err = sample_cli(["--load", "ck", "args.seed", "99"], capsys)
    assert options is None and "unexpected argument 'args.seed'" in err and "did you mean 'args.seed=99'" in err
    options, err = sample_cli(["--point_path", "a.txt", "--seed", "3", "b.txt"], capsys)
    assert options is None and "unexpected argument 'b.txt'" in err


def test_overrides_stand_anywhere_on_the_line(capsys):
    options, _ = sample_cli(["--point_path", "a.txt", "b.txt", "args.seed=99", "--seed", "3", "x.y=1"], capsys)
    assert options.point_path == ["a.txt", "b.txt"] and options.seed == 3
    assert options.overrides == ["args.seed=99", "x.y=1"]
