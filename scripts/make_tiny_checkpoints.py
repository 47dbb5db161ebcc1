#!/usr/bin/env python
"""Write small RANDOM-weight checkpoints in the real formats into ckpts/tiny/ (CPU demo and CI).

    ckpts/tiny/t2v/latest + 1/mp_rank_00_model_states.pt   SAT container, keys model.diffusion_model.*
    ckpts/tiny/i2v/...                                      same, 32 input channels
    ckpts/tiny/vae/3d-vae.pt                                {"state_dict": encoder.*/decoder.*}
    ckpts/tiny/t5/                                          T5 encoder + sentencepiece tokenizer folder

The weights are random: videos sampled with them show no real content.  Each folder carries an
UNTRAINED marker file, and the engine says so when it loads one.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sat"))

from tora.logs import quiet_libraries  # noqa: E402

quiet_libraries()  # before SAT, DeepSpeed and transformers are imported

import torch  # noqa: E402

from tora.checkpoint import save_checkpoint  # noqa: E402
from tora.config import load_config  # noqa: E402
from tora.model_factory import UNTRAINED_MARKER, build_dit  # noqa: E402
from tora.text import write_tiny_t5  # noqa: E402
from tora.vae import VideoAutoencoder  # noqa: E402

CONFIGS = REPO / "configs/tora/model"
NOTE = "Random weights written by scripts/make_tiny_checkpoints.py - NOT a trained model.\n"


def mark(folder: Path) -> None:
    (folder / UNTRAINED_MARKER).write_text(NOTE)


def write_dit(cfg, folder: Path, seed: int) -> None:
    dit = build_dit(cfg, load=None, device=torch.device("cpu"), dtype=torch.float32, seed=seed)
    with torch.no_grad():  # make the zero-initialised motion paths and gates active
        for name, p in dit.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    save_checkpoint(dit.state_dict(), folder, iteration=1)
    mark(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "ckpts/tiny", help="output folder (default: %(default)s)")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when the folder is complete")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = args.out
    expected = [out / "t2v/latest", out / "i2v/latest", out / "vae/3d-vae.pt", out / "t5/config.json"]
    if args.if_missing and all(p.exists() for p in expected):
        print(f"tiny checkpoints already in {out}")
        return
    t2v = load_config([CONFIGS / "tora_tiny.yaml"])
    i2v = load_config([CONFIGS / "tora_tiny.yaml", CONFIGS / "tora_tiny_i2v.yaml"])
    torch.manual_seed(args.seed)
    write_dit(t2v, out / "t2v", args.seed)
    write_dit(i2v, out / "i2v", args.seed + 1)
    vae = VideoAutoencoder(t2v.model.first_stage_config.params)
    (out / "vae").mkdir(parents=True, exist_ok=True)
    vae.save_official(out / "vae/3d-vae.pt")
    mark(out / "vae")
    d_model = t2v.model.network_config.params.modules.patch_embed_config.params.text_hidden_size
    write_tiny_t5(out / "t5", d_model=d_model, seed=args.seed)
    mark(out / "t5")
    print(f"wrote random-weight (untrained) tiny checkpoints to {out}")


if __name__ == "__main__":
    main()
