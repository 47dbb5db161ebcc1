#!/usr/bin/env python
"""Convert Tora weights between the SAT container and the diffusers format (T2V and I2V).

    # SAT -> diffusers: OUT/transformer/{config.json, diffusion_pytorch_model*.safetensors} (+ OUT/vae/)
    python scripts/convert_checkpoint.py to-diffusers --base configs/tora/model/cogvideox_5b_tora.yaml \\
        --load ckpts/tora/t2v --out ckpts/tora-diffusers/t2v [--vae ckpts/vae/3d-vae.pt]

    # diffusers -> SAT: OUT/latest + OUT/<iteration>/mp_rank_00_model_states.pt (+ --vae-out 3d-vae.pt)
    python scripts/convert_checkpoint.py to-sat --load ckpts/tora-diffusers/t2v --out ckpts/tora/t2v-sat

``--dry-run`` prints the key mapping (one line per rule, with tensor and parameter counts) and writes
nothing.  The network config of a SAT checkpoint comes from ``--base`` (+ ``key=value`` overrides); a
diffusers folder carries its own ``config.json``.  Outputs are never overwritten.  The mapping and the
choices behind it are documented in ``sat/tora/diffusers_format.py``.
"""
import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sat"))

import torch  # noqa: E402

from tora import diffusers_format as df  # noqa: E402
from tora.checkpoint import read_dit_state  # noqa: E402
from tora.config import load_config  # noqa: E402
from tora.errors import ToraError  # noqa: E402
from tora.vae import VideoAutoencoder  # noqa: E402

SIZE_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"size like 5GB, 500MB or 123456 (bytes), got {text!r}")
    return int(float(m[1]) * SIZE_UNITS[m[2]])


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    to_d = sub.add_parser("to-diffusers", help="SAT checkpoint -> diffusers folder")
    to_d.add_argument("--base", nargs="+", required=True, help="model config YAML(s) of the checkpoint")
    to_d.add_argument("--vae", help="official 3d-vae.pt to convert into OUT/vae/ as well")
    to_d.add_argument("--learned-pos-embedding", action="store_true",
                      help="I2V: keep SAT's (never added) learned table as patch_embed.pos_embedding with "
                           "use_learned_positional_embeddings: true (diffusers' CogVideoX-I2V convention; "
                           "the diffusers model then ADDS it). Default: dropped, Tora-faithful")
    to_d.add_argument("--max-shard-size", type=parse_size, default=df.DEFAULT_MAX_SHARD_BYTES,
                      help="largest safetensors shard (default 5GB)")
    to_s = sub.add_parser("to-sat", help="diffusers folder -> SAT checkpoint")
    to_s.add_argument("--base", nargs="*", default=[], help="model config YAML(s) for --vae-out (VAE settings)")
    to_s.add_argument("--iteration", type=int, default=1, help="iteration written to OUT/latest (default 1)")
    to_s.add_argument("--vae-out", help="also write the folder's vae/ as an official 3d-vae.pt here")
    for p in (to_d, to_s):
        p.add_argument("--load", required=True, help="checkpoint to convert (any layout --load accepts)")
        p.add_argument("--out", help="output folder (must not exist or be empty)")
        p.add_argument("--dry-run", action="store_true", help="print the key mapping and counts, write nothing")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if not args.dry_run and not args.out:
        parser.error("--out is required (or --dry-run)")
    return args


def to_diffusers(args) -> None:
    cfg = load_config(args.base, args.overrides)
    params = cfg.model.network_config.params
    state, file, _ = read_dit_state(args.load)
    df.check_sat_state(state, params, str(file))
    steps = df.plan(state, args.learned_pos_embedding)
    print(df.describe_plan(steps, {k: tuple(v.shape) for k, v in state.items()}, "to-diffusers"))
    if args.dry_run:
        return
    out = Path(args.out)
    df.refuse_existing(out, "output folder")
    transformer = df.write_diffusers_folder(state, params, out / df.TRANSFORMER_DIR, args.learned_pos_embedding,
                                            source=str(file), max_shard_bytes=args.max_shard_size)
    print(f"wrote {transformer} ({len(list(transformer.glob('*.safetensors')))} shard(s)) from {file}")
    if args.vae:
        vae = VideoAutoencoder(cfg.model.first_stage_config.params)
        vae.load_official(args.vae)
        vae.save_diffusers(out / "vae", cfg.model.scale_factor)
        print(f"wrote {out / 'vae'} from {args.vae}")


def to_sat(args) -> None:
    folder = df.DiffusersFolder(args.load)
    params = folder.params()
    folder.validate()
    meta = df.meta_sat_state(params, folder.dtype("patch_embed.proj.weight"))
    steps = df.plan(meta, folder.learned_pos_embedding)
    print(df.describe_plan(steps, {k: tuple(v.shape) for k, v in meta.items()}, "to-sat"))
    if args.dry_run:
        return
    if args.vae_out:  # check every output before writing any
        df.refuse_existing(Path(args.vae_out), "VAE output")
    file = df.write_sat_checkpoint(folder, args.out, args.iteration)
    print(f"wrote {file} from {folder.dir}")
    if args.vae_out:
        vae_out = Path(args.vae_out)
        vae = VideoAutoencoder(load_config(args.base, args.overrides).model.first_stage_config.params)
        root = folder.dir.parent if folder.dir.name == df.TRANSFORMER_DIR else folder.dir
        vae.load_diffusers(root)
        vae.save_official(vae_out)
        print(f"wrote {vae_out} from {root / 'vae'}")


def main(argv=None) -> int:
    args = arguments(argv)
    try:
        with torch.no_grad():
            (to_diffusers if args.direction == "to-diffusers" else to_sat)(args)
    except (ToraError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
