"""User-facing errors are ToraErrors (entry scripts print them as one line); other exceptions keep
their traceback.  The library's user errors keep their builtin base (ValueError, FileNotFoundError)."""
from pathlib import Path

import pytest

import sample_video
import train_video
from tora.checkpoint import CheckpointNotFoundError
from tora.config import ConfigError, MotionFromVideoConfig

TINY = str(Path(__file__).resolve().parents[1] / "configs/tora/model/tora_tiny.yaml")


@pytest.mark.parametrize("script, target", [(sample_video, "tora.sampling.run_sampling"),
                                            (train_video, "tora.training.run_training")])
def test_entry_scripts_catch_only_tora_errors(script, target, monkeypatch, caplog):
    def user_error(cfg):
        raise ConfigError("'args.load' names nothing (in x.yaml)")

    def internal_error(cfg):
        raise RuntimeError("shape [2, 3] is not [2, 4]")

    monkeypatch.setattr(target, user_error)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--base", TINY])
    assert exit_info.value.code == 1 and "'args.load' names nothing (in x.yaml)" in caplog.text
    monkeypatch.setattr(target, internal_error)
    with pytest.raises(RuntimeError, match=r"shape \[2, 3\] is not \[2, 4\]"):  # traceback kept
        script.main(["--base", TINY])


def test_missing_raft_weights_is_a_tora_error_and_a_file_not_found_error(tmp_path):
    from tora.tracking import load_raft
    missing = tmp_path / "raft.pth"
    with pytest.raises(CheckpointNotFoundError, match=f"RAFT weights not found at {missing}") as err:
        load_raft(MotionFromVideoConfig(raft_weights=str(missing)))
    assert isinstance(err.value, FileNotFoundError)


def test_an_unavailable_device_names_the_key():
    import torch

    from tora.runtime import pick_device
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    with pytest.raises(ConfigError, match="args.device = 'cuda', but no CUDA GPU is available"):
        pick_device("cuda")
