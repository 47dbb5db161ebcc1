"""What training a model from scratch needs (the small model of scripts/train_moving_objects.py):
weight-free Farneback flow, the no-motion stage, from-scratch / load consistency, a T2V checkpoint
expanded into an I2V model, and per-clip caching of what depends on the clip alone."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sat"))

from tora import training  # noqa: E402
from tora.config import ConfigError, load_config  # noqa: E402
from tora.moving_objects import Sprite, render_frames  # noqa: E402
from tora.tracking import farneback_flows  # noqa: E402

MODEL = REPO / "configs/tora/model"
TRAIN = [REPO / "configs/tora/train_dense.yaml"]


def moving_disc(step=(3.0, 1.0), frames=6, size=(48, 64)) -> tuple[torch.Tensor, np.ndarray]:
    """A red disc moving by ``step`` px per frame on grey: clip [F, 3, H, W] in [-1, 1], centres [F, 2]."""
    background = np.full((*size, 3), 100.0)
    centres = np.array([[20 + step[0] * t, 20 + step[1] * t] for t in range(frames)])
    sprite = Sprite("red disc", "disc", 8.0, (230, 40, 40))
    video = render_frames(background, [sprite], centres[None])  # uint8 [F, H, W, 3]
    return torch.from_numpy(video).permute(0, 3, 1, 2).float() / 127.5 - 1, centres


def test_farneback_flow_follows_a_moving_shape():
    clip, centres = moving_disc()
    cfg = load_config([MODEL / "tora_tiny.yaml"], ["motion_from_video.flow_estimator=farneback"]).motion_from_video
    flows = farneback_flows(clip, cfg)
    assert flows.shape == (5, 48, 64, 2) and flows.dtype == torch.float32
    for t in range(5):  # the flow at the disc's centre is its displacement
        x, y = (int(round(v)) for v in centres[t])
        assert torch.allclose(flows[t, y, x], torch.tensor([3.0, 1.0]), atol=0.5), (t, flows[t, y, x])
    assert flows[:, 2, 2].abs().max() < 0.1  # the background stays


def config(*overrides, i2v=False):
    model = [MODEL / "tora_tiny.yaml"] + ([MODEL / "tora_tiny_i2v.yaml"] if i2v else [])
    return load_config(model + TRAIN, list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["args.load=null"], "args.load = None: name the starting weights with --load"),
    (["args.load=ckpts/x", "args.from_scratch=true"], "args.from_scratch = True: contradicts args.load = 'ckpts/x'"),
    (["args.expand_input_channels=true"], "args.expand_input_channels = True: needs args.load (a T2V checkpoint) "
                                          "and an I2V model"),
])
def test_from_scratch_and_load_are_one_choice(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        training.check_training_config(config(*overrides))


def test_from_scratch_needs_no_load():
    training.check_training_config(config("args.load=null", "args.from_scratch=true"))


def build(cfg, seed):
    from tora.engine import build_dit
    dit = build_dit(cfg, None, torch.device("cpu"), torch.float32, seed=seed)
    with torch.no_grad():
        for p in dit.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return dit.eval()


def test_a_t2v_checkpoint_expanded_into_an_i2v_model_computes_the_t2v_function(tmp_path):
    from tora.checkpoint import save_checkpoint
    t2v = build(config(), seed=0)
    save_checkpoint(t2v.state_dict(), tmp_path / "t2v", iteration=1)
    i2v = build(config(i2v=True), seed=1)
    training.load_base_weights(i2v, tmp_path / "t2v", expand_input_channels=True)
    torch.manual_seed(0)
    x = torch.randn(1, 7, 16, 12, 18)
    context = torch.randn(1, 64, 32)
    timesteps = torch.tensor([500])
    image = torch.randn(1, 7, 16, 12, 18)
    with torch.no_grad():
        expected = t2v(x, timesteps, context)
        got = i2v(x, timesteps, context, concat=image)
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(Exception, match="mixins.patch_embed"):  # without the setting: a shape error naming the key
        training.load_base_weights(build(config(i2v=True), seed=1), tmp_path / "t2v")


class FakeVAE:
    """Counts encodes; moments are a function of the video (mean = per-pixel mean, logvar -10)."""

    def __init__(self):
        self.encoded = 0

    def encode(self, video):
        self.encoded += len(video)
        mean = video.mean(dim=1, keepdim=True).expand(-1, 16, -1, -1, -1)[:, :, ::4, ::8, ::8]
        return SimpleNamespace(moments=torch.cat([mean, torch.full_like(mean, -10.0)], dim=1))


class FakeText:
    def __call__(self, prompts):
        return torch.zeros(len(prompts), 4, 32)

    def drop_text(self, context, generator):
        return context


@pytest.mark.parametrize("stage", ["none", "dense", "sparse"])
def test_cached_latents_are_the_uncached_ones(stage):
    cfg = config(f"motion_from_video.stage={stage}", "motion_from_video.flow_estimator=farneback",
                 "motion_from_video.tracking=subpixel", "trajectory.blur_kernel_size=9", "trajectory.blur_sigma=2")
    clip, _ = moving_disc(frames=5)
    batch = {"mp4": torch.stack([clip, clip.flip(-1)]), "txt": ["a", "b"], "clip": ["one.mp4", "two.mp4"]}
    outputs = {}
    for cached in (False, True):
        cfg.args.cache_latents = cached
        vae = FakeVAE()
        preparer = training.BatchPreparer(cfg, SimpleNamespace(vae=vae, conditioner=FakeText(), raft=None),
                                          torch.device("cpu"))
        steps = [preparer(batch, training.StepRandom.for_step(1, k, 0, 0, "cpu")) for k in range(2)]
        outputs[cached] = (steps, vae.encoded)
    for plain, cached in zip(outputs[False][0], outputs[True][0]):
        assert torch.equal(plain["x0"], cached["x0"])
        if stage == "none":
            assert plain["video_flow"] is None and cached["video_flow"] is None
        else:
            assert torch.equal(plain["video_flow"], cached["video_flow"])
    per_step = {"none": 2, "dense": 4, "sparse": 4}[stage]  # clips (+ motion videos) encoded per step
    assert outputs[False][1] == 2 * per_step
    # with the cache the second step encodes nothing but the sparse stage's new motion videos
    assert outputs[True][1] == per_step + (2 if stage == "sparse" else 0)


def test_cpu_flows_are_computed_in_the_data_workers(tmp_path):
    """With Farneback the dataset items carry the clip's flows (the loader's workers compute them), and
    the preparer uses them instead of computing its own."""
    from tora.data import SFTDataset
    from tora.video_io import write_mp4
    clip, _ = moving_disc(frames=5)
    frames = ((clip + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    write_mp4(tmp_path / "videos/disc.mp4", frames, fps=8)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels/disc.txt").write_text("a red disc\n")
    cfg = config("motion_from_video.flow_estimator=farneback", "data.params.video_size=[48,64]",
                 "data.params.max_num_frames=5", "data.params.skip_frms_num=0")
    assert training.worker_flows(config("motion_from_video.stage=none").motion_from_video) is None
    assert training.worker_flows(config().motion_from_video) is None  # RAFT runs in the preparer
    item = SFTDataset([tmp_path], cfg.data.params, flows=training.worker_flows(cfg.motion_from_video))[0]
    assert item["flows"].dtype == torch.float16 and item["flows"].shape == (4, 48, 64, 2)
    assert torch.allclose(item["flows"].float(), farneback_flows(item["mp4"], cfg.motion_from_video), atol=1e-2)
