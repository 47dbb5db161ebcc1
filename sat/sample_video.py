#!/usr/bin/env python
"""Sample trajectory-controlled videos with Tora (text-to-video or image-to-video).

    torchrun --standalone --nproc_per_node=N sat/sample_video.py \\
        --base configs/tora/model/cogvideox_5b_tora.yaml configs/tora/inference.yaml \\
        --load ckpts/tora/t2v --point_path trajs/circle.txt --input-file assets/t2v_prompts.txt \\
        --output-dir samples  [model.sampler_config.params.num_steps=30 ...]

Every flag sets the config key args.<flag>; trailing key=value pairs override any config key.
Precedence: --base files in order < flags < key=value overrides.
"""
import argparse
import logging
import os
import sys

# Large, changing activation shapes: let the CUDA allocator grow segments instead of fragmenting.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from tora.logs import quiet_libraries, setup_logging  # noqa: E402

quiet_libraries()  # before SAT, DeepSpeed and transformers are imported

from tora.config import load_config, parse_cli  # noqa: E402
from tora.errors import ToraError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", nargs="+", required=True, metavar="YAML",
                   help="config files, merged in order (model config first, then e.g. configs/tora/inference.yaml)")
    p.add_argument("--load", help="DiT checkpoint: folder with 'latest' or mp_rank_00_model_states.pt")
    p.add_argument("--point_path", nargs="+", metavar="TXT", help="trajectory files (x,y per line), one per object")
    p.add_argument("--input-file", dest="input_file", help="prompt file; I2V lines: prompt@@image_name")
    p.add_argument("--input-type", dest="input_type", choices=["txt", "cli"], help="txt: --input-file; cli: stdin")
    p.add_argument("--output-dir", dest="output_dir", help="where videos are written (never overwritten)")
    p.add_argument("--image2video", action="store_const", const=True, help="prompts carry a first-frame image")
    p.add_argument("--img_dir", help="folder of the I2V images (default: the prompt file's folder)")
    p.add_argument("--seed", type=int, help="base seed; prompt k uses seed + k")
    p.add_argument("--sampling-num-frames", dest="sampling_num_frames", type=int, help="latent frames, odd, at most the model's (13 = 49 frames, the 5B model's; "
                        "the tiny model's 7 = 25 frames); default: the model's")
    p.add_argument("--no-flow-injection", dest="no_flow_injection", action="store_const", const=True,
                   help="ignore trajectories (plain CogVideoX behaviour)")
    p.add_argument("--save-latents", dest="save_latents", action="store_const", const=True,
                   help="also write the sampled latents (latents/<name>.safetensors)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU, else CPU)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--offload", choices=["none", "model", "sequential"],
                   help="none: everything stays on the GPU (fastest); model: T5/VAE and DiT take turns (default); "
                        "sequential: DiT and T5 streamed layer by layer (least memory)")
    speed = p.add_argument_group("speed modes (config section 'acceleration'; see README 'Speed and memory')")
    speed.add_argument("--compile", action="store_const", const=True, help="regional torch.compile")
    speed.add_argument("--fp8", action="store_const", const=True, help="fp8 matmuls (Hopper GPUs)")
    speed.add_argument("--cache", dest="step_cache", action="store_const", const=True,
                       help="first-block step cache (approximate)")
    speed.add_argument("--cfg-parallel", dest="cfg_parallel", action="store_const", const=True,
                       help="CFG halves on two GPUs (torchrun with an even number of processes)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.sampler_config.params.num_steps=30")
    return parse_cli(p, argv)



def main(argv=None):
    setup_logging()
    options = parse_args(argv)
    given = {k: v for k, v in vars(options).items() if k not in ("base", "overrides") and v is not None}
    speed = {k: given.pop(k) for k in ("compile", "fp8", "cfg_parallel") if k in given}
    if given.pop("step_cache", None):
        speed["step_cache"] = {"enabled": True}
    try:
        cfg = load_config(options.base, options.overrides, extra={"args": given, "acceleration": speed})
        from tora.sampling import run_sampling
        run_sampling(cfg)
    except ToraError as err:  # what the user can fix; anything else keeps its traceback
        logging.getLogger("sample_video").error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
