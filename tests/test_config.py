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


# -- one value, one place (config.LINKED) and the ignored official keys (config.IGNORED) ---------

from pathlib import Path  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs/tora"
OFFICIAL = [CONFIGS / "model/cogvideox_5b_tora.yaml", CONFIGS / "inference.yaml"]
SAMPLER, GUIDER = "model.sampler_config.params.num_steps", "model.sampler_config.params.guider_config.params.num_steps"
DISC = "discretization_config.params.shift_scale"


def test_readme_num_steps_override_drives_the_guider_schedule(caplog):
    from tora.diffusion import DiscreteDenoiser, VPSDEDPMPP2MSampler
    with caplog.at_level("INFO", logger="tora.config"):
        cfg = load_config(OFFICIAL, [f"{SAMPLER}=30"])
    sampler = VPSDEDPMPP2MSampler.from_config(cfg.model.sampler_config,
                                              DiscreteDenoiser.from_config(cfg.model.denoiser_config))
    assert sampler.num_steps == 30 and sampler.guider.num_steps == 30
    # the official schedule input sampler_steps - timestep, over a 30-step schedule
    assert sampler.guider.scale_at(0, 999, 30) == sampler.guider.schedule(30 - 999)
    note = caplog.text
    assert f"'{GUIDER}' follows '{SAMPLER}' = 30 (in command line)" in note
    assert "50 (in " + str(OFFICIAL[0]) + ") is not used" in note


def test_a_copy_set_on_its_own_is_an_error_naming_both_keys_and_sources():
    message = (f"'{GUIDER}' = 30 (in command line) disagrees with '{SAMPLER}' = 50 (in {OFFICIAL[0]}): "
               f"the first is a copy of the second, set only '{SAMPLER}'")
    with pytest.raises(ConfigError) as err:
        load_config(OFFICIAL, [f"{GUIDER}=30"])
    assert str(err.value) == message


def test_copies_disagreeing_in_one_file_are_an_error(tmp_path):
    bad = write(tmp_path, "mine.yaml", "model:\n  sampler_config:\n    params:\n      num_steps: 30\n"
                                       "      guider_config:\n        params:\n          num_steps: 40\n")
    with pytest.raises(ConfigError, match=rf"'{GUIDER}' = 40 \(in {bad}\) disagrees with '{SAMPLER}' = 30 "
                                          rf"\(in {bad}\)"):
        load_config(OFFICIAL + [bad])


def test_the_denoiser_discretization_is_the_one_place():
    from tora.diffusion import DiscreteDenoiser, DiscreteSampling, VPSDEDPMPP2MSampler
    cfg = load_config(OFFICIAL, [f"model.denoiser_config.params.{DISC}=3.0"]).model
    sampler_disc = cfg.sampler_config.params.discretization_config
    sigma_disc = cfg.loss_fn_config.params.sigma_sampler_config.params.discretization_config
    assert sampler_disc.params.shift_scale == sigma_disc.params.shift_scale == 3.0
    denoiser = DiscreteDenoiser.from_config(cfg.denoiser_config)
    sampler = VPSDEDPMPP2MSampler.from_config(cfg.sampler_config, denoiser)
    sigmas = DiscreteSampling.from_config(cfg.loss_fn_config.params.sigma_sampler_config)
    import torch
    assert torch.equal(sigmas.alphas_cumprod_sqrt, denoiser.alphas_cumprod_sqrt)
    assert torch.equal(sampler.discretization.alphas_cumprod, denoiser_table(3.0))


def denoiser_table(shift):
    from tora.diffusion import ZeroSNRDDPMDiscretization
    return ZeroSNRDDPMDiscretization(shift_scale=shift).alphas_cumprod


@pytest.mark.parametrize("copy", ["model.sampler_config.params", "model.loss_fn_config.params.sigma_sampler_config.params"])
def test_a_discretization_copy_cannot_disagree(copy):
    with pytest.raises(ConfigError, match=rf"'{copy}.{DISC}' = 3.0 \(in command line\) disagrees with "
                                          rf"'model.denoiser_config.params.{DISC}' = 1.0 \(in .*cogvideox_5b_tora.yaml\)"):
        load_config(OFFICIAL, [f"{copy}.{DISC}=3.0"])


def test_extractor_downscale_is_the_patch_size():
    net = "model.network_config.params"
    with pytest.raises(ConfigError, match=rf"'{net}.traj_extractor.downscale' = 4 \(in command line\) disagrees "
                                          rf"with '{net}.patch_size' = 2 \(in .*cogvideox_5b_tora.yaml\)"):
        load_config(OFFICIAL, [f"{net}.traj_extractor.downscale=4"])
    assert load_config([], [f"{net}.patch_size=1"]).model.network_config.params.traj_extractor.downscale == 1


def test_checkpoint_activations_has_one_place():
    one, copy = "args.checkpoint_activations", "model.network_config.params.transformer_args.checkpoint_activations"
    model, tiny = CONFIGS / "model/cogvideox_5b_tora.yaml", CONFIGS / "model/tora_tiny.yaml"
    train = [CONFIGS / "train_dense.yaml", CONFIGS / "train_tiny.yaml"]
    for files, value in (([model], True), ([tiny], False), ([tiny, train[0]], True), ([tiny, *train], False)):
        cfg = load_config(files)
        assert cfg.args.checkpoint_activations is value
        assert cfg.model.network_config.params.transformer_args.checkpoint_activations is value
    assert load_config([tiny, *train], [f"{one}=true"]).model.network_config.params.transformer_args \
        .checkpoint_activations is True
    with pytest.raises(ConfigError, match=rf"'{copy}' = True \(in command line\) disagrees with '{one}' = False "
                                          rf"\(in .*train_tiny.yaml\)"):
        load_config([tiny, *train], [f"{copy}=true"])


def test_dumped_network_params_must_agree_with_their_copies():
    from tora.config import network_params_from
    with pytest.raises(ConfigError, match=r"'model.network_config.params.transformer_args.num_layers' = 3 "
                                          r"\(in run.yaml\) disagrees with 'model.network_config.params.num_layers' "
                                          r"= 2 \(in run.yaml\)"):
        network_params_from({"num_layers": 2, "transformer_args": {"num_layers": 3}}, "run.yaml")


@pytest.mark.parametrize("model", ["cogvideox_5b_tora.yaml", "cogvideox_5b_tora_i2v.yaml"])
@pytest.mark.parametrize("stack", [["inference.yaml"], ["train_dense.yaml"], ["train_dense.yaml", "train_sparse.yaml"]])
def test_official_configs_load_without_notes(model, stack, caplog):
    with caplog.at_level("INFO", logger="tora.config"):
        cfg = load_config([CONFIGS / "model" / model, *(CONFIGS / f for f in stack)])
    assert caplog.text == ""  # every repeated value agrees
    assert cfg.model.sampler_config.params.guider_config.params.num_steps == 50


@pytest.mark.parametrize("override, message", [
    ("args.batch_size=2", "'args.batch_size' = 2 would have no effect: one video per prompt and seed (accepted: 1)"),
    ("model.sampler_config.params.verbose=false", "'model.sampler_config.params.verbose' = False would have no effect"),
    ("model.en_and_decode_n_samples_a_time=2", "one sample at a time"),
])
def test_ignored_official_keys_reject_values_that_would_do_nothing(override, message):
    with pytest.raises(ConfigError) as err:
        load_config([], [override])
    assert message in str(err.value)


def test_ignored_official_keys_are_schema_keys_with_a_reason():
    from omegaconf import OmegaConf

    from tora.config import ANY, IGNORED, schema
    cfg = schema()
    for key, (accepted, why) in IGNORED.items():
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key
        assert why and (accepted is ANY or OmegaConf.select(cfg, key) in accepted), key
    load_config([], ["args.eval_interval=99999", "model.log_keys=[txt,mp4]"])  # any value: accepted
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
