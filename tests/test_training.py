"""Fine-tuning (tora.training, tora.run_folder, sat/train_video.py): official settings, the step's
pieces, and real runs of the training loop + DeepSpeed ZeRO-2 on the CPU (gloo, fp32) with a micro model.

In-process runs use a cheap deterministic RAFT stand-in (``StubRaft``); the torchrun test runs the
real RAFT (random weights).
"""
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tora.checkpoint import MODEL_FILE, CheckpointError, load_dit_checkpoint, load_state_dict
from tora.config import ConfigError, MotionFromVideoConfig, TrajectoryConfig, load_config
from tora.model_factory import UNTRAINED_MARKER, build_dit
from tora.tracking import dense_motion_flow, sample_keypoints
from tora.trajectory import flow_to_rgb, rgb_to_video, tracks_to_video
from tora import run_folder, training
from tora.training import (StepBatchSampler, ToraTrainingModule, clip_flows, deepspeed_config,
                           motion_video_from_clip, step_seed)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs/tora"
TRAIN_BASE = [CONFIGS / "model/tora_tiny.yaml", CONFIGS / "train_dense.yaml", CONFIGS / "train_tiny.yaml"]


# ----------------------------------------------------------------------------------------------
# A micro model (32 x 48 pixels, 5 frames, 2 layers) with checkpoints in the real formats
# ----------------------------------------------------------------------------------------------

def micro_overrides(root: Path) -> list[str]:
    return [
        "model.network_config.params.num_frames=5", "model.network_config.params.latent_height=4",
        "model.network_config.params.latent_width=6", "model.network_config.params.num_layers=2",
        f"model.conditioner_config.params.emb_models=[{{params: {{model_dir: {root / 't5'}, max_length: 16}}}}]",
        f"model.first_stage_config.params.ckpt_path={root / 'vae/3d-vae.pt'}",
        "model.first_stage_config.params.encoder_config.params={ch: 32, ch_mult: [1, 1, 1, 1], num_res_blocks: 1}",
        "model.first_stage_config.params.decoder_config.params={ch: 32, ch_mult: [1, 1, 1, 1], num_res_blocks: 1}",
        "data.params.video_size=[32,48]", "data.params.max_num_frames=5",
        f"motion_from_video.raft_weights={root / 'raft_small.pth'}", "motion_from_video.raft_iterations=2",
        f"args.load={root / 't2v'}", f"args.train_data=[{REPO / 'training_examples'}]",
    ]


I2V = ["model.noised_image_input=true", "model.network_config.params.in_channels=32",
       "model.network_config.params.modules.pos_embed_config.params.learnable_pos_embed=true"]


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    sys.path.insert(0, str(REPO / "scripts"))
    import make_tiny_checkpoints
    from tora.text import write_tiny_t5
    from tora.vae import VideoAutoencoder
    root = tmp_path_factory.mktemp("micro")
    cfg = load_config(TRAIN_BASE, micro_overrides(root))
    make_tiny_checkpoints.write_dit(cfg, root / "t2v", seed=0)
    make_tiny_checkpoints.write_dit(load_config(TRAIN_BASE, micro_overrides(root) + I2V), root / "i2v", seed=1)
    (root / "vae").mkdir()
    vae = VideoAutoencoder(cfg.model.first_stage_config.params)
    with torch.no_grad():  # a narrow posterior, like a trained VAE's (log-variance -10)
        conv_out = vae.autoencoder.encoder.conv_out.conv
        conv_out.weight[16:] *= 0.01
        conv_out.bias[16:] = -10.0
    vae.save_official(root / "vae/3d-vae.pt")
    write_tiny_t5(root / "t5", d_model=32)
    training.write_random_raft(root / "raft_small.pth", "raft_small")
    return root


def micro_cfg(micro, save: Path, *extra: str):
    return load_config(TRAIN_BASE, micro_overrides(micro) + [f"args.save={save}", *extra])


class StubRaft(nn.Module):
    """Cheap deterministic stand-in for RAFT: flow (3 + 8 * brightness change, 1) pixels everywhere."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, image1, image2, num_flow_updates=12):
        change = (image2 - image1).mean(dim=1, keepdim=True)
        return [torch.cat([3 + 8 * change, torch.ones_like(change)], dim=1)]


def stub_build(cfg, device, dtype):
    return replace(training.build_components(cfg, device, dtype), raft=StubRaft())


@contextlib.contextmanager
def process_state():
    """Training reseeds the global RNG and fills in RANK etc.: restore both for the other tests."""
    environ = dict(os.environ)
    with torch.random.fork_rng(devices=[]):
        yield
    os.environ.clear()
    os.environ.update(environ)


def train(cfg, build=stub_build, dataset=None) -> Path:
    with process_state():
        return training.run_training(cfg, build, dataset)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def dit_state(path) -> dict:
    return load_state_dict(Path(path) / MODEL_FILE if Path(path).is_dir() else path)


# ----------------------------------------------------------------------------------------------
# Configs and settings
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["cogvideox_5b_tora.yaml", "cogvideox_5b_tora_i2v.yaml"])
def test_train_configs_hold_the_official_values(model):
    dense = load_config([CONFIGS / "model" / model, CONFIGS / "train_dense.yaml"])
    sparse = load_config([CONFIGS / "model" / model, CONFIGS / "train_dense.yaml", CONFIGS / "train_sparse.yaml"])
    for cfg, stage, lr in ((dense, "dense", 1e-4), (sparse, "sparse", 5e-5)):
        a, ds = cfg.args, cfg.deepspeed
        assert (a.mode, a.train_iters, a.save_interval, a.log_interval, a.seed) == ("finetune", 15000, 2000, 1, 1234)
        assert (a.warmup, a.lr_decay_style, a.auto_warmup_steps, a.auto_warmup_rate) == (0.01, "linear", 100, 0.05)
        assert a.checkpoint_activations and a.ema_decay == 0.9999
        assert list(cfg.model.trainable_modules) == ["fuser", "traj_extractor"]
        assert cfg.motion_from_video.stage == stage and cfg.motion_from_video.raft_model == "raft_large"
        assert (cfg.trajectory.blur_border, cfg.trajectory.flow_image_chunk_frames) == ("zeros", 2)
        assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.gradient_clipping) == (1, 1, 0.1)
        assert ds.zero_optimization.stage == 2 and ds.bf16.enabled and not ds.fp16.enabled
        assert dict(ds.optimizer.params) == {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-4}
        assert (cfg.data.params.video_size, cfg.data.params.max_num_frames) == ([480, 720], 49)
    assert (sparse.motion_from_video.min_points, sparse.motion_from_video.max_points,
            sparse.motion_from_video.grid_stride) == (1, 16, 32)
    assert dense.args.load == "ckpts/CogVideoX-5b-sat/transformer" and sparse.args.load is None


def test_sparse_stage_without_load_is_explained(caplog):
    import train_video
    with pytest.raises(SystemExit):
        train_video.main(["--base", str(CONFIGS / "model/cogvideox_5b_tora.yaml"), str(CONFIGS / "train_dense.yaml"),
                          str(CONFIGS / "train_sparse.yaml")])
    assert "args.load = None: name the starting weights with --load" in caplog.text


def test_deepspeed_config_follows_the_dtype_and_avoids_compiled_ops():
    cfg = load_config([CONFIGS / "model/cogvideox_5b_tora.yaml", CONFIGS / "train_dense.yaml"])
    cpu = deepspeed_config(cfg, torch.float32)
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    assert cpu["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                            "weight_decay": 1e-4, "torch_adam": True}}
    assert deepspeed_config(cfg, torch.bfloat16)["bf16"]["enabled"]
    official = load_config([CONFIGS / "model/cogvideox_5b_tora.yaml", CONFIGS / "train_dense.yaml"],
                           ["deepspeed.optimizer.type=sat.ops.FusedEmaAdam"])
    assert deepspeed_config(official, torch.bfloat16)["optimizer"]["type"] == "AdamW"
    for key, value, message in (("deepspeed.fp16.enabled", "true", "fp16"),
                                ("deepspeed.zero_optimization.stage", "3", "ZeRO-3"),
                                ("deepspeed.optimizer.type", "SGD", "only Adam/AdamW")):
        bad = load_config([CONFIGS / "model/cogvideox_5b_tora.yaml", CONFIGS / "train_dense.yaml"], [f"{key}={value}"])
        with pytest.raises(ConfigError, match=message):
            deepspeed_config(bad, torch.float32)


def lr_args(**changes):
    from argparse import Namespace
    args = dict(lr=1e-4, lr_decay_iters=None, train_iters=15000, warmup=0.01, lr_decay_style="linear",
                lr_decay_ratio=0.1, mode="finetune", auto_warmup_steps=100, auto_warmup_rate=0.05)
    return Namespace(**{**args, **changes})


def sat_schedule(args, steps: int) -> list[float]:
    """SAT's AnnealingLR as training_main used it (the reference): the lr of steps 1..steps."""
    from sat.training.deepspeed_training import get_learning_rate_scheduler
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_learning_rate_scheduler(optimizer, 0, args, auto_warmup_steps=args.auto_warmup_steps,
                                            auto_warmup_rate=args.auto_warmup_rate)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return values


def test_official_learning_rate_schedule():
    lr, iters, args = 1e-4, 15000, lr_args()
    values = [training.learning_rate(n, lr, args) for n in range(1, 1001)]  # values[k]: step k + 1
    for n in (1, 5, 7, 8, 50, 100):
        assert values[n - 1] == pytest.approx(min(0.05 * lr, lr * n / 150))
    for n in (101, 120, 150):
        assert values[n - 1] == pytest.approx(lr * n / 150)
    for n in (151, 300, 400):
        assert values[n - 1] == pytest.approx(lr * (iters - (n - 150)) / iters)
    assert values[-1] == pytest.approx(lr * (iters - 850) / iters)
    assert values == pytest.approx(sat_schedule(args, 1000), rel=1e-12)  # SAT's AnnealingLR, step by step


@pytest.mark.parametrize("changes", [dict(lr_decay_style="cosine", train_iters=300, warmup=0.1),
                                     dict(lr_decay_style="constant", auto_warmup_steps=0, warmup=0.1, train_iters=50),
                                     dict(lr_decay_style="linear", lr_decay_iters=200, train_iters=300)])
def test_learning_rate_equals_sat_annealing_lr_for_every_style(changes):
    args = lr_args(**changes)
    ours = [training.learning_rate(n, 1e-3, args) for n in range(1, args.train_iters + 1)]
    assert ours == pytest.approx(sat_schedule(lr_args(**changes, lr=1e-3), args.train_iters), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Pieces of the step
# ----------------------------------------------------------------------------------------------

def test_only_the_motion_modules_are_trainable_and_decay_follows_the_official_groups(micro):
    from sat.training.deepspeed_training import get_optimizer_param_groups  # the official grouping
    cfg = load_config(TRAIN_BASE, micro_overrides(micro))
    dit = build_dit(cfg, None, torch.device("cpu"), torch.float32)
    module = ToraTrainingModule(dit, loss_fn=None, trainable_modules=["fuser", "traj_extractor"])
    count = module.disable_untrainable_params()
    trainable = {n for n, p in dit.named_parameters() if p.requires_grad}
    assert trainable and all("fuser_list" in n or n.startswith("traj_extractor.") for n in trainable)
    assert count == sum(p.numel() for n, p in dit.named_parameters() if n in trainable)
    assert all(("fuser_list" in n or n.startswith("traj_extractor.")) == (n in trainable)
               for n, _ in dit.named_parameters())
    decay, no_decay = training.decay_groups(module)
    official = get_optimizer_param_groups(module)
    assert [[id(p) for p in g["params"]] for g in (decay, no_decay)] == [[id(p) for p in g["params"]] for g in official]
    names = {id(p): n for n, p in dit.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert not any(n.endswith(".bias") for n in decayed) and "weight_decay" not in decay
    assert {"traj_extractor.body.0.bn1.weight", "mixins.adaln_layer.fuser_list.0.flow_cond_norm.weight",
            "mixins.adaln_layer.fuser_list.1.flow_gamma_temporal.weight"} <= decayed  # GroupNorm/BN decayed
    assert no_decay["weight_decay"] == 0.0 and len(decayed) + len(no_decay["params"]) == len(trainable)
    with pytest.raises(ConfigError, match="match no DiT parameter"):
        ToraTrainingModule(dit, None, ["no_such_module"]).disable_untrainable_params()


def test_a_base_without_motion_modules_loads_and_initialises_them(micro, tmp_path):
    """Stage 1 starts from the CogVideoX-5B SAT transformer, which has no extractor and no fusers."""
    from tora.checkpoint import CheckpointError, save_checkpoint
    cfg = load_config(TRAIN_BASE, micro_overrides(micro))
    tora_state = {k[len("model.diffusion_model."):]: v for k, v in dit_state(micro / "t2v/1").items()}
    motion = [k for k in tora_state if k.startswith(training.MOTION_MODULE_KEYS)]
    save_checkpoint({k: v for k, v in tora_state.items() if k not in motion}, tmp_path / "cogvideox-sat/transformer", 1000)
    dit = build_dit(cfg, None, torch.device("cpu"), torch.float32, seed=5)
    assert training.load_base_weights(dit, tmp_path / "cogvideox-sat") == 1000  # the download folder works too
    loaded = dit.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tora_state.items() if k not in motion)
    for fuser in dit.fusers:  # a fresh fuser is the identity
        assert not fuser.flow_gamma_temporal.weight.any() and not fuser.flow_beta_temporal.bias.any()
    assert dit.traj_extractor.conv_in.weight.std() > 0 and not dit.traj_extractor.conv_in.bias.any()
    save_checkpoint({k: v for k, v in tora_state.items() if k != motion[0]}, tmp_path / "partial", 1)
    with pytest.raises(CheckpointError, match="missing 1 key"):
        training.load_base_weights(dit, tmp_path / "partial")


def test_small_frames_are_resized_for_raft_and_the_flow_scaled_back():
    class ConstantRaft(StubRaft):
        def forward(self, image1, image2, num_flow_updates=12):
            assert image1.shape[-2:] == (128, 192)  # 32 x 48 clip, scaled up to RAFT's minimum
            return [torch.tensor([4.0, 2.0]).view(1, 2, 1, 1).expand(len(image1), 2, *image1.shape[-2:])]
    flows = clip_flows(ConstantRaft(), torch.zeros(3, 3, 32, 48), MotionFromVideoConfig(raft_iterations=1))
    assert flows.shape == (2, 32, 48, 2)
    assert torch.allclose(flows, torch.tensor([1.0, 0.5]))  # clip pixels


def test_dense_motion_video_is_the_flow_image_of_all_raft_flows():
    clip = torch.rand(5, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg, traj = MotionFromVideoConfig(stage="dense"), TrajectoryConfig(flow_image_chunk_frames=2)
    video = motion_video_from_clip(clip, StubRaft(), cfg, traj, torch.Generator())
    flows = StubRaft()(clip[:-1], clip[1:])[0].permute(0, 2, 3, 1)
    assert torch.equal(video, rgb_to_video(flow_to_rgb(dense_motion_flow(flows), 2)))
    assert video.shape == (1, 3, 5, 128, 128)


@pytest.mark.parametrize("border, chunk", [("zeros", 2), ("reflect101", 0)])
def test_sparse_motion_video_is_the_sampling_function_of_the_tracked_keypoints(border, chunk):
    """Training keypoints go through trajectory.tracks_to_video, like the point files of sampling."""
    clip = torch.zeros(6, 3, 128, 160)  # no brightness change: the stub flow is (3, 1) everywhere
    cfg = MotionFromVideoConfig(stage="sparse", max_points=4)
    traj = TrajectoryConfig(blur_border=border, flow_image_chunk_frames=chunk)
    video = motion_video_from_clip(clip, StubRaft(), cfg, traj, torch.Generator().manual_seed(3))
    start = sample_keypoints(torch.tensor([3.0, 1.0]).expand(128, 160, 2), cfg, torch.Generator().manual_seed(3))
    steps = torch.arange(6)[:, None] * torch.tensor([3, 1])  # integer flow: exact official tracking
    tracks = torch.minimum(start[None] + steps[:, None], torch.tensor([159, 127])).permute(1, 0, 2)
    assert 1 <= len(start) <= 4
    assert torch.equal(video, tracks_to_video(tracks, (128, 160), traj).video)


def test_step_seeds_depend_on_seed_step_micro_batch_and_rank():
    seeds = {step_seed(s, i, m, r, 1) for s in (1, 2) for i in (0, 1) for m in (0, 1) for r in (0, 1)}
    assert len(seeds) == 16 and step_seed(1, 5, 0, 0, 1) == step_seed(1, 5, 0, 0, 1)


def test_sampler_covers_epochs_splits_ranks_and_resumes_anywhere():
    ranks = [StepBatchSampler(7, 2, rank, 2, seed=5) for rank in range(2)]
    first = [iter(s) for s in ranks]
    batches = [[next(it) for _ in range(7)] for it in first]  # 7 steps x 2 ranks x 2 = 28 = 4 epochs
    keys = [key for step in zip(*batches) for batch in step for key in batch]
    for epoch in range(4):
        assert sorted(i for e, i in keys if e == epoch) == list(range(7))  # every clip once per epoch
    assert keys[:7] != keys[7:14] or True  # (shuffled per epoch; order checked below)
    assert [i for e, i in keys if e == 0] != list(range(7))
    resumed = iter(StepBatchSampler(7, 2, 1, 2, seed=5, start_micro_batch=4))
    assert [next(resumed) for _ in range(3)] == batches[1][4:7]


# ----------------------------------------------------------------------------------------------
# Real runs: the training loop + DeepSpeed ZeRO-2 on the CPU
# ----------------------------------------------------------------------------------------------

RUN = ["args.train_iters=6", "args.save_interval=2", "args.keep_last_checkpoints=2", "args.ema_decay=0.9",
       "args.log_interval=3"]


@pytest.fixture(scope="module")
def reference_run(micro, tmp_path_factory):
    """6 uninterrupted steps, a checkpoint every 2, the last 2 kept, EMA on (umask 022)."""
    umask = os.umask(0o022)
    try:
        return train(micro_cfg(micro, tmp_path_factory.mktemp("reference"), *RUN))
    finally:
        os.umask(umask)


def test_run_writes_metrics_and_checkpoints_that_sampling_loads(reference_run, micro):
    records = metrics(reference_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert {"loss", "lr", "grad_norm", "seconds", "samples_per_second", "motion_s", "vae_s",
                "dit_forward_s", "backward_s", "optimizer_s"} <= set(record)
        assert np.isfinite(record["loss"]) and record["grad_norm"] > 0 and record["lr"] > 0
    assert (reference_run / "latest").read_text() == "6"
    assert sorted(p.name for p in reference_run.iterdir() if p.is_dir()) == ["4", "4-ema", "6", "6-ema"]
    assert (reference_run / "6/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert (reference_run / UNTRAINED_MARKER).is_file()  # fine-tuned from random weights
    assert "experiment_name: tiny" in (reference_run / "training_config.yaml").read_text()
    cfg = micro_cfg(micro, reference_run)
    dit = build_dit(cfg, None, torch.device("cpu"), torch.float32)
    assert load_dit_checkpoint(dit, reference_run) == 6  # the loader of sample_video.py --load


def test_only_trainable_parameters_change(reference_run, micro):
    before, after = dit_state(micro / "t2v/1"), dit_state(reference_run / "6")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k for k in before if ".fuser_list." in k or ".traj_extractor." in k}
    assert changed and changed <= trainable  # frozen weights and buffers bit-identical
    assert any(k.endswith(".flow_gamma_temporal.weight") for k in changed)
    assert any(k.startswith("model.diffusion_model.traj_extractor.") and k.endswith("conv_in.weight") for k in changed)
    ema = dit_state(reference_run / "6-ema")
    assert all(torch.equal(ema[k], after[k]) for k in after if k not in trainable)
    assert all(ema[k].dtype == torch.float32 for k in trainable if k.endswith((".weight", ".bias")))
    assert any(not torch.equal(ema[k], after[k]) for k in changed)


def test_crash_while_saving_keeps_the_last_checkpoint_and_resume_continues_the_curve(
        reference_run, micro, tmp_path, monkeypatch):
    cfg = micro_cfg(micro, tmp_path / "runs", *RUN)
    real_save = torch.save

    def dying_save(obj, file, *args, **kwargs):
        path = str(getattr(file, "name", file))  # a path, or the open (temporary) file of a durable write
        if MODEL_FILE in Path(path).name and "incomplete-4" in path:
            raise KeyboardInterrupt("killed while saving iteration 4")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "latest").read_text() == "2" and not (run_dir / "4").exists()
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    with open(run_dir / "metrics.jsonl", "a") as file:  # power loss while a line was written
        file.write('{"step": 5, "loss": 0.2')

    resumed = train(micro_cfg(micro, tmp_path / "runs", *RUN, f"args.resume={run_dir}"))
    assert resumed == run_dir and not (run_dir / ".incomplete-4").exists()
    expected, got = metrics(reference_run), metrics(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in expected], key  # the same curve, bit for bit
    for name in ("6", "6-ema"):
        reference, again = dit_state(reference_run / name), dit_state(run_dir / name)
        assert all(torch.equal(reference[k], again[k]) for k in reference), name


def test_resume_with_another_world_size_is_refused(reference_run, micro, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    state = torch.load(run_dir / "6/training_state.pt", weights_only=True)
    torch.save({**state, "world_size": 2}, run_dir / "6/training_state.pt")
    with pytest.raises(Exception, match="trained with world_size 2, this run has 1"):
        train(micro_cfg(micro, tmp_path, *RUN, "args.train_iters=8", f"args.resume={run_dir}"))


def test_tiny_overfit_run_lowers_the_loss(micro, tmp_path):
    """One 11-frame clip (always the same 5 frames), 2 samples per step, no text dropout: the motion
    modules learn it; the loss at fixed timesteps and noise falls."""
    import decord
    from tora.video_io import write_mp4
    data = tmp_path / "one_clip"
    frames = decord.VideoReader(str(REPO / "training_examples/videos/disc_line.mp4")).get_batch(list(range(11)))
    write_mp4(data / "videos/disc.mp4", frames.asnumpy(), fps=8)
    (data / "labels").mkdir()
    (data / "labels/disc.txt").write_text("a red ball\n")
    run_dir = train(micro_cfg(micro, tmp_path / "runs", "args.train_iters=30", "args.save_interval=30",
                              f"args.train_data=[{data}]", "args.lr_decay_style=constant",
                              "deepspeed.optimizer.params.lr=0.01", "deepspeed.train_micro_batch_size_per_gpu=2",
                              "model.conditioner_config.params.emb_models.0.ucg_rate=0"))
    cfg = micro_cfg(micro, tmp_path, "model.conditioner_config.params.emb_models.0.ucg_rate=0")
    losses = {}
    for name, weights in (("before", micro / "t2v"), ("after", run_dir)):
        with process_state():
            losses[name] = fixed_draw_loss(cfg, weights, data)
    assert losses["after"] < 0.9 * losses["before"], losses


def fixed_draw_loss(cfg, weights, data) -> float:
    """The training loss of the first item at 8 fixed timesteps and noises, with ``weights``."""
    from tora.data import SFTDataset
    from tora.training import BatchPreparer, StepRandom
    components = stub_build(cfg, torch.device("cpu"), torch.float32)
    load_dit_checkpoint(components.dit, weights)
    module = ToraTrainingModule(components.dit, None, [])
    batch = torch.utils.data.default_collate([SFTDataset([data], cfg.data.params, seed=cfg.args.seed)[0]])
    inputs = BatchPreparer(cfg, components, torch.device("cpu"))(batch, StepRandom.for_step(1, 0, 0, 0, "cpu"))
    from tora.diffusion import DiscreteDenoiser, VideoDiffusionLoss, conditioned_network
    loss_fn = VideoDiffusionLoss.from_config(cfg.model.loss_fn_config, DiscreteDenoiser.from_config(cfg.model.denoiser_config))
    x0 = inputs["x0"].expand(8, -1, -1, -1, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        loss = loss_fn(conditioned_network(module.dit.train()), x0, {"crossattn": inputs["context"].expand(8, -1, -1)},
                       idx=torch.linspace(50, 950, 8).long(), noise=noise,
                       video_flow=inputs["video_flow"].expand(8, -1, -1, -1, -1))
    return float(loss.mean())


def test_image_to_video_sparse_stage_with_activation_checkpointing(micro, tmp_path, capsys):
    run_dir = train(micro_cfg(micro, tmp_path, *I2V, f"args.load={micro / 'i2v'}", "args.train_iters=2",
                              "args.checkpoint_activations=true", "motion_from_video.stage=sparse",
                              "args.tensorboard=true", "args.log_interval=1"))
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert re.search(r"training: 100%.*\| 2/2 ", capsys.readouterr().err)  # the progress bar (rank 0)
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    before, after = dit_state(micro / "i2v/1"), dit_state(run_dir / "2")
    assert any(not torch.equal(before[k], after[k]) for k in before if ".fuser_list." in k)


@pytest.mark.slow
def test_two_process_gloo_run_of_train_video(micro, tmp_path):
    """torchrun with 2 ranks: the CLI, real RAFT (random weights), ZeRO-2 partitions on both ranks."""
    overrides = micro_overrides(micro) + [f"args.save={tmp_path}", "args.train_iters=2", "args.save_interval=2",
                                          "motion_from_video.stage=sparse"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "sat"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "sat/train_video.py"), "--base", *map(str, TRAIN_BASE), *overrides],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = tmp_path.iterdir()
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert all(r["samples_per_second"] > 0 for r in metrics(run_dir))
    for rank in (0, 1):
        assert (run_dir / f"2/deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    state = torch.load(run_dir / "2/training_state.pt", weights_only=True)
    assert state["world_size"] == 2


def test_benchmark_script_runs_tiny(capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_train_step
    with process_state():
        table = bench_train_step.main(["--tiny", "--steps", "2", "--warmup", "1",
                                       "model.first_stage_config.params.encoder_config.params.ch_mult=[1,1,1,1]",
                                       "model.first_stage_config.params.decoder_config.params.ch_mult=[1,1,1,1]"])
    assert "step (s)" in table and "DiT forward (s)" in table and "VAE encodes (s)" in table
    assert capsys.readouterr().out.rstrip().endswith(table.splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Nothing lost, nothing silent (issue 14): run folders, damaged files, full disks, permissions
# ----------------------------------------------------------------------------------------------

def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, reference_run):
    """Two runs started in the same minute used to share <name>-MM-DD-HH-MM and overwrite each other."""
    now = datetime(2026, 12, 1, 22, 5, 18)
    first = run_folder.create_run_dir(tmp_path, "tiny", now)
    second = run_folder.create_run_dir(tmp_path, "tiny", now)
    assert (first.name, second.name) == ("tiny-12-01-22-05-18", "tiny-12-01-22-05-18-1")
    (tmp_path / "tiny-12-01-22-05-18-2").mkdir()  # an existing folder is never reused
    (tmp_path / "tiny-12-01-22-05-18-2/metrics.jsonl").write_text('{"step": 1}\n')
    third = run_folder.create_run_dir(tmp_path, "tiny", now)
    assert third.name == "tiny-12-01-22-05-18-3" and not any(third.iterdir())
    assert re.fullmatch(r"tiny-\d\d-\d\d-\d\d-\d\d-\d\d", reference_run.name)


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_named(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    run_folder.truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and "dropped its last line 3" in caplog.text
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match=re.escape(f"{path}, line 2: not a JSON record")):
        run_folder.read_metrics(path)


def test_run_files_respect_the_umask(reference_run):
    """Every checkpoint file and pointer used to be created 0600 (temporary file + rename)."""
    files = ["latest", "metrics.jsonl", "training_config.yaml", f"6/{MODEL_FILE}", "6/training_state.pt",
             f"6-ema/{MODEL_FILE}", "6/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    modes = {name: oct((reference_run / name).stat().st_mode & 0o777) for name in files}
    assert modes == {name: "0o644" for name in files}  # the fixture's umask 022


def test_checkpoint_files_and_latest_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    run_dir = tmp_path / "run"
    staging = run_folder.staging_dir(run_dir, 2)
    (staging / "2").mkdir(parents=True)
    run_folder.write_durably(staging / "2" / MODEL_FILE, lambda f: torch.save({"module": {}}, f))
    (staging / "2" / "optim.pt").write_bytes(b"written by DeepSpeed")
    run_folder.commit_checkpoint(run_dir, 2, keep=0)
    assert (run_dir / "latest").read_text() == "2" and (run_dir / "2" / MODEL_FILE).is_file()

    def first(kind, predicate):
        return next(i for i, (k, path) in enumerate(events) if k == kind and predicate(path))
    def staged(name):  # the temporary name a durable write uses beside the final one
        return lambda p: Path(p).name.startswith(f".{name}.")
    assert first("fsync", staged(MODEL_FILE)) < first("replace", staged(MODEL_FILE))
    assert first("fsync", lambda p: p.endswith("optim.pt")) < first("replace", lambda p: p == str(staging / "2"))
    assert first("fsync", staged("latest")) < first("replace", staged("latest"))


@pytest.mark.parametrize("file", [MODEL_FILE, "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_checkpoint_on_resume_names_the_file(reference_run, micro, tmp_path, file, damage):
    """A zero-byte checkpoint gave a raw EOFError, a truncated one "corrupted" naming no file."""
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    target = run_dir / "6" / file
    data = target.read_bytes()
    target.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    message = "is empty (0 bytes)" if damage == "empty" else "is truncated or corrupted"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {target} {message}")) as error:
        train(micro_cfg(micro, tmp_path, *RUN, "args.train_iters=8", f"args.resume={run_dir}"))
    assert "Other checkpoints of the run: [4]" in str(error.value)


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(folder: Path) -> Path:
    """Write a file until the file system holding ``folder`` is full."""
    filler = folder / "filler"
    with open(filler, "wb") as file:
        try:
            while True:
                file.write(b"\0" * 2**20)
                file.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(micro, small_disk, monkeypatch):
    """A full disk used to report "enforce fail at inline_container.cc:672" only."""
    real_save = training.save_checkpoint

    def save_on_a_full_disk(state, run_dir, *args):
        if state.iteration == 4:
            fill_disk(small_disk)
        return real_save(state, run_dir, *args)

    monkeypatch.setattr(training, "save_checkpoint", save_on_a_full_disk)
    cfg = micro_cfg(micro, small_disk / "runs", "args.train_iters=4", "args.save_interval=2")
    with pytest.raises(CheckpointError, match=r"no space left on .*runs/tiny-[\d-]+/\.incomplete-4/4 while writing"):
        train(cfg)
    (run_dir,) = (small_disk / "runs").iterdir()
    assert (run_dir / "latest").read_text() == "2" and not (run_dir / ".incomplete-4").exists()
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["2"]
    load_dit_checkpoint(build_dit(cfg, None, torch.device("cpu"), torch.float32), run_dir)  # intact
    (small_disk / "filler").unlink()  # space freed: the run resumes from 2
    monkeypatch.undo()
    assert train(micro_cfg(micro, small_disk / "runs", "args.train_iters=4", "args.save_interval=2",
                           f"args.resume={run_dir}")) == run_dir
    assert (run_dir / "latest").read_text() == "4" and [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]


def test_a_failed_start_leaves_no_run_folder(micro, tmp_path):
    def broken_build(cfg, device, dtype):
        raise CheckpointError("no weights here")
    with pytest.raises(CheckpointError, match="no weights here"):
        train(micro_cfg(micro, tmp_path / "runs"), build=broken_build)
    assert list((tmp_path / "runs").iterdir()) == []


def test_logs_are_quiet_and_name_the_steps(reference_run):
    log = (reference_run / "train.log").read_text()
    assert "step 3/6: loss" in log and "step 6/6: loss" in log and "saved checkpoint" in log
    noisy = [line for line in log.splitlines() if re.search(r" (INFO|DEBUG) (sat|DeepSpeed)\b", line)]
    assert not noisy, noisy[:5]


def test_small_model_stages_from_scratch_then_farneback_motion_run_through_the_loop(micro, tmp_path):
    """Stage 0 (from scratch, no motion, every base weight trainable), then a sparse motion stage with
    the weight-free Farneback flow (flows cached per clip) from its run folder, every weight trainable."""
    base_only = r"model.trainable_modules=['^(?!traj_extractor\.|mixins\.adaln_layer\.fuser_list\.)']"
    stage0 = train(micro_cfg(micro, tmp_path / "s0", "args.load=null", "args.from_scratch=true", base_only,
                             "motion_from_video.stage=none", "args.train_iters=2", "args.save_interval=2"),
                   build=training.build_components)
    weights = dit_state(stage0 / "2")
    assert [r["step"] for r in metrics(stage0)] == [1, 2] and not (stage0 / UNTRAINED_MARKER).exists()
    cfg = micro_cfg(micro, tmp_path / "s1", f"args.load={stage0}", "model.trainable_modules=['.*']",
                    "motion_from_video.stage=sparse", "motion_from_video.flow_estimator=farneback",
                    "args.cache_latents=true", "args.train_iters=2", "args.save_interval=2")
    stage1 = train(cfg, build=training.build_components)
    after = dit_state(stage1 / "2")
    changed = {k for k in weights if not torch.equal(weights[k], after[k])}
    assert any(".fuser_list." in k for k in changed) and any(".attention." in k for k in changed)


def test_training_builds_models_without_the_sampling_engine():
    code = ("import sys; import tora.training; from tora.training import build_components; "
            "print(sorted(m for m in ('tora.engine', 'tora.sampling', 'tora.acceleration') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO / "sat")),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "[]", result.stderr[-2000:]
