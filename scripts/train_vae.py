#!/usr/bin/env python
"""Train a (small) CogVideoX 3-D VAE from scratch on training clips; resumable, one GPU or the CPU.

    python scripts/train_vae.py --base configs/tora/model/tora_small.yaml --data data/moving/train \
        --out outputs/vae/3d-vae.pt --steps 3000 --batch-size 8

The architecture is the model config's ``model.first_stage_config`` (the same class the sampler loads);
the clips are read by the training data loader with the config's ``data.params``.  The loop, top to
bottom: reconstruct -> L1 + MSE + kl_weight * KL -> AdamW step (cosine lr) -> log -> save.

Writes ``--out`` (the official ``3d-vae.pt`` format: what ``first_stage_config.params.ckpt_path`` reads),
``<out>.state.pt`` (optimizer and step: ``--steps`` more is resumed from it) and, at the end,
``<out dir>/vae_report.json``: reconstruction PSNR on held-out clips (``--eval-data``) and the latent
standard deviation, whose inverse is the ``model.scale_factor`` the DiT should use (latents of unit
variance, as CogVideoX's 0.7 does for its VAE).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sat"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tora.checkpoint import atomic_torch_save  # noqa: E402
from tora.config import load_config  # noqa: E402
from tora.data import SFTDataset  # noqa: E402
from tora.vae import VideoAutoencoder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", nargs="+", required=True, help="model config(s): first_stage_config and data.params")
    p.add_argument("--data", nargs="+", required=True, help="training clip folders (videos/, labels/)")
    p.add_argument("--eval-data", nargs="*", default=[], help="held-out clip folders for the PSNR report")
    p.add_argument("--out", type=Path, required=True, help="the 3d-vae.pt to write")
    p.add_argument("--state", type=Path, default=None, help="optimizer state for resuming (default <out>.state.pt)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps in total (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine to 5 %%)")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--eval-clips", type=int, default=64, help="held-out clips in the PSNR report")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this long; 0 = no limit")
    p.add_argument("--workers", type=int, default=8, help="data loader processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def kl_divergence(posterior) -> torch.Tensor:
    """KL(q || N(0, I)) per latent element, averaged."""
    return 0.5 * (posterior.mean.float() ** 2 + posterior.logvar.float().exp() - 1 - posterior.logvar.float()).mean()


def batches(dataset, batch_size: int, workers: int, seed: int):
    """Endless shuffled batches of clips [B, 3, F, H, W] in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, drop_last=True, num_workers=workers,
                        sampler=RandomSampler(dataset, replacement=True, num_samples=10 ** 9, generator=generator),
                        persistent_workers=workers > 0)
    for batch in loader:
        yield batch["mp4"].permute(0, 2, 1, 3, 4)


@torch.no_grad()
def report(vae: VideoAutoencoder, folders, params, device, max_clips: int = 64) -> dict:
    """PSNR (dB, frames in [0, 1]) of the reconstructions of up to ``max_clips`` clips, and the
    standard deviation of the posterior means (-> scale_factor = 1 / std)."""
    vae.eval()
    dataset = SFTDataset(folders, params, seed=0)
    psnrs, means = [], []
    for index in range(min(max_clips, len(dataset))):
        video = dataset[index]["mp4"].permute(1, 0, 2, 3)[None].to(device)
        recon, posterior = vae.reconstruct(video)
        mse = F.mse_loss((recon.float().clamp(-1, 1) + 1) / 2, (video + 1) / 2).item()
        psnrs.append(10 * math.log10(1.0 / max(mse, 1e-10)))
        means.append(posterior.mean.float().flatten().cpu())
    std = torch.cat(means).std().item()
    return {"clips": len(psnrs), "psnr_db": sum(psnrs) / len(psnrs), "psnr_min_db": min(psnrs),
            "latent_std": std, "scale_factor": 1.0 / std}


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.base, args.overrides)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    vae = VideoAutoencoder(cfg.model.first_stage_config.params).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    state_file = args.state or args.out.with_name(args.out.name + ".state.pt")
    step = 0
    if state_file.is_file() and args.out.is_file():  # resume
        vae.load_official(args.out)
        state = torch.load(state_file, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed {args.out} at step {step}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"VAE: {n_params / 1e6:.2f} M parameters; training {args.steps} steps of {args.batch_size} clips on {device}")

    def save():
        vae.save_official(args.out)
        atomic_torch_save({"optimizer": optimizer.state_dict(), "step": step}, state_file)

    dataset = SFTDataset(args.data, cfg.data.params, seed=args.seed)
    data = batches(dataset, args.batch_size, args.workers, args.seed + step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    start, bar = time.time(), tqdm(total=args.steps, initial=step, desc="VAE", dynamic_ncols=True)
    vae.train()
    while step < args.steps:
        video = next(data).to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        with autocast:
            recon, posterior = vae.reconstruct(video)
        recon = recon.float()
        loss_rec = F.l1_loss(recon, video) + F.mse_loss(recon, video)
        loss = loss_rec + args.kl_weight * kl_divergence(posterior)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_rec.item():.4f}", lr=f"{lr_at(step, args):.1e}")
        if step % args.save_every == 0:
            save()
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            print(f"time limit reached at step {step}")
            break
    bar.close()
    save()
    result = {"step": step, "parameters": n_params, "minutes": (time.time() - start) / 60,
              "last_loss": loss_rec.item() if step else None}
    if args.eval_data:
        result.update(report(vae, args.eval_data, cfg.data.params, device, args.eval_clips))
    (args.out.parent / "vae_report.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
