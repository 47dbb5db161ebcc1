#!/usr/bin/env python
"""Benchmark full-size Tora training steps: step time and peak GPU memory (one GPU).

    source scripts/device_env.sh && python scripts/bench_train_step.py            # T2V, dense stage
    python scripts/bench_train_step.py --stage sparse --steps 6                   # stage 2
    python scripts/bench_train_step.py --tiny                                     # CPU smoke run (CI)

Runs real training steps through the code path of ``sat/train_video.py`` (``tora.training``: the
training loop, DeepSpeed ZeRO-2, bf16, activation checkpointing, RAFT -> motion video -> VAE ->
DiT loss) with the official train_dense.yaml (+ train_sparse.yaml) settings, but with RANDOM weights
and a random clip, so it needs no downloads:

* the full-size CogVideoX-5B Tora DiT, built on the meta device and initialised on the GPU;
* the full-size CogVideoX VAE (random init);
* RAFT-large (random weights, written to a temporary file and loaded like the real one);
* instead of the 4.7 B-parameter T5-XXL: a random context [B, 226, 4096] (T5 costs ~0.1 s per
  step and ~8.9 GiB of bf16 weights on the GPU in a real run - added in the table as an estimate);
* a random 49 x 480 x 720 clip.

Everything else is the configured run, EMA of the trainable weights included (official 0.9999,
kept on rank 0 in fp32: +4 bytes per trainable parameter).

No checkpoint is written (the run stops through SAT's exit_interval after the last step).  Prints
the per-step metrics (metrics.jsonl), then a table: median step time after the warm-up steps, its
breakdown (data, RAFT + flow image, VAE encodes, DiT forward, backward, optimizer) and peak memory
(max_memory_allocated during the frozen preprocessing and over the whole step, max reserved).
Extra ``key=value`` arguments override config keys (e.g.
``model.first_stage_config.params.encode_chunk_frames=8``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sat"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

CONFIGS = REPO / "configs/tora"
T5_XXL_PARAMS = 4.762e9  # T5 v1.1 XXL encoder


class RandomText(nn.Module):
    """Stands in for the T5-XXL encoder: a random context of the real shape, seeded per call."""

    def __init__(self, length: int, width: int, device, dtype):
        super().__init__()
        self.length, self.width, self.device, self.dtype = length, width, device, dtype
        self.calls = 0

    def forward(self, prompts):
        self.calls += 1
        generator = torch.Generator(self.device).manual_seed(self.calls)
        return torch.randn(len(prompts), self.length, self.width, generator=generator, device=self.device,
                           dtype=self.dtype)


class RandomClips(torch.utils.data.Dataset):
    """One random clip [F, 3, H, W] in [-1, 1] (smooth noise), served for every index."""

    def __init__(self, frames: int, height: int, width: int, length: int = 1000):
        generator = torch.Generator().manual_seed(0)
        coarse = torch.rand(frames, 3, height // 16, width // 16, generator=generator) * 2 - 1
        self.clip = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {"mp4": self.clip, "txt": "a random clip", "num_frames": len(self.clip), "fps": 8.0}


def make_config(args, run_root: Path, raft_file: Path):
    from tora.config import load_config
    files = [CONFIGS / "model" / ("tora_tiny.yaml" if args.tiny else "cogvideox_5b_tora.yaml"),
             CONFIGS / "train_dense.yaml"]
    if args.stage == "sparse":
        files.append(CONFIGS / "train_sparse.yaml")
    overrides = [f"args.save={run_root}", "args.load=null", "args.from_scratch=true", "args.experiment_name=bench",
                 f"args.train_iters={args.steps}", f"args.exit_interval={args.steps}",
                 f"args.save_interval={args.steps + 1}", "args.num_workers=0",
                 "args.log_interval=1", f"motion_from_video.raft_weights={raft_file}"]
    if args.tiny:
        overrides += ["model.network_config.params.num_frames=5", "data.params.max_num_frames=5",
                      "data.params.video_size=[96,144]", "motion_from_video.raft_model=raft_small",
                      "motion_from_video.raft_iterations=2", "motion_from_video.raft_batch_pairs=4",
                      "args.checkpoint_activations=true"]
    return load_config(files, overrides + list(args.overrides))


def build_random(cfg, device, dtype):
    """Full-size (or tiny) components with random weights; nothing read from ckpts/."""
    from tora.model_factory import build_dit
    from tora.text import GeneralConditioner
    from tora.tracking import load_raft
    from tora.training import Components, init_motion_modules_
    from tora.vae import VideoAutoencoder
    start = time.perf_counter()
    dit = build_dit(cfg, None, device, dtype, seed=cfg.args.seed)  # meta build, random init on the device
    init_motion_modules_(dit, cfg.args.seed)
    vae = VideoAutoencoder(cfg.model.first_stage_config.params).to(device, dtype).requires_grad_(False).eval()
    text = cfg.model.conditioner_config.params.emb_models[0]
    width = cfg.model.network_config.params.modules.patch_embed_config.params.text_hidden_size
    conditioner = GeneralConditioner(RandomText(text.params.max_length, width, device, dtype), text.ucg_rate)
    raft = load_raft(cfg.motion_from_video, device)
    print(f"built random components in {time.perf_counter() - start:.1f} s "
          f"(DiT {sum(p.numel() for p in dit.parameters()) / 1e9:.2f} B params)", flush=True)
    return Components(dit, vae, conditioner, raft)


COLUMNS = [("seconds", "step (s)"), ("data_s", "data (s)"), ("motion_s", "RAFT+flow image (s)"),
           ("vae_s", "VAE encodes (s)"), ("text_s", "text (s)"), ("dit_forward_s", "DiT forward (s)"),
           ("backward_s", "backward (s)"), ("optimizer_s", "optimizer (s)"),
           ("peak_prepare_gib", "peak alloc, preprocessing (GiB)"), ("peak_step_gib", "peak alloc, step (GiB)"),
           ("reserved_gib", "max reserved (GiB)")]


def summarize(records: list[dict], warmup: int, device: torch.device, stage: str) -> str:
    measured = records[warmup:] or records[-1:]
    lines = [f"Tora training step benchmark ({stage} stage, {len(measured)} measured steps after "
             f"{min(warmup, len(records) - len(measured))} warm-up; median)",
             f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"]
    width = max(len(label) for _, label in COLUMNS)
    for key, label in COLUMNS:
        values = [r[key] for r in measured if r.get(key) is not None]
        if values:
            lines.append(f"  {label:<{width}}  {statistics.median(values):10.3f}")
    if device.type == "cuda":
        peak = max(r.get("peak_step_gib", 0) for r in records)
        t5 = T5_XXL_PARAMS * 2 / 2**30
        lines.append(f"  {'T5-XXL bf16 weights (not loaded)':<{width}}  {t5:10.3f}")
        lines.append(f"  {'peak alloc incl. T5 (estimate)':<{width}}  {peak + t5:10.3f}")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps in all (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--stage", choices=["dense", "sparse"], default="dense")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a smoke test)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from tora.training import run_training, write_random_raft
    with tempfile.TemporaryDirectory(prefix="tora-bench-") as tmp:
        tmp = Path(tmp)
        raft_file = write_random_raft(tmp / "raft.pth", "raft_small" if args.tiny else "raft_large")
        cfg = make_config(args, tmp / "runs", raft_file)
        params = cfg.data.params
        dataset = RandomClips(params.max_num_frames, *params.video_size)
        print(f"config: {args.stage} stage, {params.max_num_frames} x {params.video_size[0]} x "
              f"{params.video_size[1]} clip, ZeRO-{cfg.deepspeed.zero_optimization.stage}, activation "
              f"checkpointing {cfg.args.checkpoint_activations}, EMA {cfg.args.ema_decay}", flush=True)
        start = time.perf_counter()
        try:
            run_training(cfg, build=build_random, dataset=dataset)
        except torch.OutOfMemoryError:
            print(f"OUT OF MEMORY; peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
                  f"reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB", flush=True)
            print(torch.cuda.memory_summary(abbreviated=True), flush=True)
            raise
        (run_dir,) = (tmp / "runs").iterdir()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        print(f"\n{len(records)} steps in {time.perf_counter() - start:.1f} s (setup included); per step:")
        for record in records:
            print(json.dumps(record))
        table = summarize(records, args.warmup, device, args.stage)
        print("\n" + table, flush=True)
        return table


if __name__ == "__main__":
    main()
