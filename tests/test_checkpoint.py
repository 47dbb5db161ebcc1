"""SAT checkpoint containers: both layouts, strict keys with readable errors, atomic saves."""
import os
import re

import pytest
import torch

from tora.checkpoint import (DIT_PREFIX, MODEL_FILE, CheckpointError, load_dit_checkpoint, resolve_checkpoint,
                             save_checkpoint)
from tora.config import network_params_from
from tora.dit import DiffusionTransformer

from test_dit import TINY


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiffusionTransformer(network_params_from(TINY))


def write(path, state):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {DIT_PREFIX + k: v for k, v in state.items()}}, path)


def fresh(model):
    torch.manual_seed(1)
    return DiffusionTransformer(model.params)


def test_sat_training_layout_with_latest(tmp_path, model):
    save_checkpoint(model.state_dict(), tmp_path, 1000)
    assert (tmp_path / "latest").read_text() == "1000"
    other = fresh(model)
    assert load_dit_checkpoint(other, tmp_path) == 1000
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_published_layout_without_latest(tmp_path, model):
    write(tmp_path / MODEL_FILE, model.state_dict())
    assert resolve_checkpoint(tmp_path) == (tmp_path / MODEL_FILE, None)
    other = fresh(model)
    load_dit_checkpoint(other, tmp_path)
    assert torch.equal(other.time_embed[0].weight, model.time_embed[0].weight)
    load_dit_checkpoint(fresh(model), tmp_path / MODEL_FILE)  # the file itself


def test_missing_and_unexpected_keys_are_listed_grouped(tmp_path, model):
    state = dict(model.state_dict())
    for i in range(2):
        del state[f"transformer.layers.{i}.attention.dense.weight"]
    state["mixins.adaln_layer.extra.weight"] = torch.zeros(1)
    write(tmp_path / MODEL_FILE, state)
    with pytest.raises(CheckpointError) as err:
        load_dit_checkpoint(fresh(model), tmp_path)
    text = str(err.value)
    assert "missing 2 key(s)" in text
    assert "transformer.layers.*.attention.dense.weight  (2 keys" in text
    assert "unexpected 1 key(s)" in text and "mixins.adaln_layer.extra.weight" in text
    assert str(tmp_path / MODEL_FILE) in text


def test_shape_mismatch_names_the_key(tmp_path, model):
    state = dict(model.state_dict())
    state["time_embed.0.weight"] = torch.zeros(3, 3)
    write(tmp_path / MODEL_FILE, state)
    with pytest.raises(CheckpointError, match=r"time_embed.0.weight: checkpoint \(3, 3\) vs model"):
        load_dit_checkpoint(fresh(model), tmp_path)


def test_dead_and_derivable_keys_may_be_absent(tmp_path, model):
    state = {k: v for k, v in model.state_dict().items()
             if k not in ("transformer.position_embeddings.weight", "mixins.pos_embed.freqs_sin",
                          "mixins.pos_embed.freqs_cos")}
    write(tmp_path / MODEL_FILE, state)
    other = fresh(model)
    with torch.no_grad():
        other.mixins.pos_embed.freqs_cos.zero_()
    load_dit_checkpoint(other, tmp_path)
    torch.testing.assert_close(other.mixins.pos_embed.freqs_cos, model.mixins.pos_embed.freqs_cos)


def test_keys_of_other_engine_parts_are_ignored(tmp_path, model):
    payload = {DIT_PREFIX + k: v for k, v in model.state_dict().items()}
    payload["first_stage_model.encoder.conv_in.conv.weight"] = torch.zeros(1)
    torch.save({"module": payload}, tmp_path / MODEL_FILE)
    load_dit_checkpoint(fresh(model), tmp_path)


def test_bad_paths_are_explained(tmp_path, model):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_dit_checkpoint(model, tmp_path / "nope")
    with pytest.raises(CheckpointError, match="expected .*latest.* or .*mp_rank_00_model_states.pt"):
        load_dit_checkpoint(model, tmp_path)
    (tmp_path / "latest").write_text("7")
    with pytest.raises(CheckpointError, match="names iteration '7'"):
        load_dit_checkpoint(model, tmp_path)


def test_pickled_objects_are_refused(tmp_path, model):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())
    torch.save({"module": Evil()}, tmp_path / MODEL_FILE)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_dit_checkpoint(model, tmp_path)


def test_save_is_atomic(tmp_path, model, monkeypatch):
    save_checkpoint(model.state_dict(), tmp_path, 1)
    before = (tmp_path / "1" / MODEL_FILE).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model.state_dict(), tmp_path, 1)
    assert (tmp_path / "1" / MODEL_FILE).read_bytes() == before
    assert (tmp_path / "latest").read_text() == "1"
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == [MODEL_FILE]  # no temp files left


# -- damaged files, full disk, umask (issue 14, defects 6 and 10) ------------------------------

def test_empty_or_truncated_checkpoints_are_named(model, tmp_path):
    data = save_checkpoint(model.state_dict(), tmp_path / "good", 1).read_bytes()
    for name, content, message in [("empty", b"", "is empty (0 bytes)"),
                                   ("cut", data[:len(data) // 2], "is truncated or not a PyTorch checkpoint")]:
        file = tmp_path / name / MODEL_FILE
        file.parent.mkdir()
        file.write_bytes(content)
        with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(file))}.*{re.escape(message)}"):
            load_dit_checkpoint(fresh(model), file.parent)


def test_checkpoint_files_respect_the_umask(model, tmp_path):
    old = os.umask(0o022)
    try:
        file = save_checkpoint(model.state_dict(), tmp_path, 3)
    finally:
        os.umask(old)
    assert oct(file.stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "latest").stat().st_mode & 0o777) == oct(0o644)


def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(model, tmp_path):
    from test_files import small_tmpfs
    small = {k: v[:1].clone() for k, v in list(model.state_dict().items())[:2]}
    with small_tmpfs(tmp_path / "disk", size="256k") as disk:
        save_checkpoint(small, disk, 1)
        with pytest.raises(OSError, match=f"no space left on {disk / '2'}"):
            save_checkpoint(model.state_dict(), disk, 2)
        assert (disk / "latest").read_text() == "1" and resolve_checkpoint(disk)[1] == 1
        assert [p.name for p in (disk / "2").iterdir()] == []  # no temporary left behind


def test_a_checkpoint_of_another_resolution_loads_with_recomputed_rotary_tables(model, tmp_path):
    """The README's promise: rotary tables are a function of the config, not weights (issue 14, defect 8)."""
    save_checkpoint(model.state_dict(), tmp_path, 1)  # the tables are in the file, at 8 x 12 latents
    other = DiffusionTransformer(network_params_from({**TINY, "latent_height": 10, "latent_width": 6}))
    load_dit_checkpoint(other, tmp_path)
    reference = DiffusionTransformer(other.params)
    for key in ("mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos"):
        assert other.state_dict()[key].shape != model.state_dict()[key].shape
        torch.testing.assert_close(other.state_dict()[key], reference.state_dict()[key])
    torch.testing.assert_close(other.state_dict()["transformer.layers.0.attention.dense.weight"],
                               model.state_dict()["transformer.layers.0.attention.dense.weight"])
