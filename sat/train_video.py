#!/usr/bin/env python
"""Fine-tune Tora's motion modules (trajectory extractor + motion-guidance fusers) with DeepSpeed.

    # stage 1: dense optical flow
    torchrun --standalone --nproc_per_node=8 sat/train_video.py \\
        --base configs/tora/model/cogvideox_5b_tora.yaml configs/tora/train_dense.yaml
    # stage 2: 1-16 sparse trajectories, from the stage-1 run
    torchrun --standalone --nproc_per_node=8 sat/train_video.py \\
        --base configs/tora/model/cogvideox_5b_tora.yaml configs/tora/train_dense.yaml \\
               configs/tora/train_sparse.yaml --load outputs/train/tora-dense-MM-DD-HH-MM-SS
    # continue a run that stopped (same number of GPUs)
    torchrun ... sat/train_video.py --base <the same files> --resume outputs/train/tora-dense-MM-DD-HH-MM-SS

Without torchrun it runs as one process (on the CPU with gloo and fp32 when there is no GPU).
Every flag sets the config key args.<flag>; trailing key=value pairs override any config key, e.g.
deepspeed.optimizer.params.lr=5e-5.  Precedence: --base files in order < flags < key=value.
"""
import argparse
import logging
import sys

from tora.logs import quiet_libraries, setup_logging

quiet_libraries()  # before SAT, DeepSpeed and transformers are imported

from tora.config import load_config, parse_cli  # noqa: E402
from tora.errors import ToraError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", nargs="+", required=True, metavar="YAML",
                   help="config files, merged in order (model config, train_dense.yaml [, train_sparse.yaml])")
    p.add_argument("--load", help="starting weights: CogVideoX-5B SAT transformer folder, or a Tora checkpoint/run folder")
    p.add_argument("--resume", help="run folder to continue from its 'latest' checkpoint (same GPU count)")
    p.add_argument("--experiment-name", dest="experiment_name", help="run folder name prefix")
    p.add_argument("--save", help="parent folder of the run folders")
    p.add_argument("--train-data", dest="train_data", nargs="+", metavar="DIR", help="SFT data folders")
    p.add_argument("--train-iters", dest="train_iters", type=int, help="optimizer steps")
    p.add_argument("--save-interval", dest="save_interval", type=int, help="checkpoint every N iterations")
    p.add_argument("--keep-last-checkpoints", dest="keep_last_checkpoints", type=int, help="0 = keep all")
    p.add_argument("--log-interval", dest="log_interval", type=int)
    p.add_argument("--num-workers", dest="num_workers", type=int, help="data loader processes per rank")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda (default: this rank's GPU, else CPU)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. args.ema_decay=0")
    return parse_cli(p, argv)


def main(argv=None):
    setup_logging()
    options = parse_args(argv)
    flags = {k: v for k, v in vars(options).items() if k not in ("base", "overrides") and v is not None}
    log = logging.getLogger("train_video")
    try:
        cfg = load_config(options.base, options.overrides, extra={"args": flags})
        from tora.training import run_training
        run_dir = run_training(cfg)
    except ToraError as err:  # what the user can fix; anything else keeps its traceback
        log.error("%s", err)
        sys.exit(1)
    log.info("done: %s (sample with: sat/sample_video.py --base <model.yaml> configs/tora/inference.yaml "
             "--load %s ...)", run_dir, run_dir)


if __name__ == "__main__":
    main()
