# shellcheck shell=bash
# Environment for running this project on a lent GPU machine (the device tool).
#
# Source it at the start of a device command, from the repository root:
#
#     source scripts/device_env.sh || exit 1; <your command>
#
# and name `.device` (site.tar.xz, see scripts/fetch_device_wheels.sh --pack) or `.whl` (and
# `.whl-ffmpeg` when the command writes mp4s) in the call's `carry`.
#
# The GPU machine has Python 3.12 with torch/torchvision/transformers/huggingface_hub/numpy/...
# but no network and none of SwissArmyTransformer, deepspeed, diffusers, omegaconf, datasets,
# wandb, ...  Those travel as wheels in the git-ignored folder `.whl/` (in .git/info/exclude,
# never committed), one version of each, chosen to fit the machine's own packages:
#   SwissArmyTransformer 0.4.12, deepspeed 0.19.8, diffusers 0.42.1, omegaconf 2.4.0 (antlr4
#   vendored), datasets 5.2.0 + dill 0.4.1 + multiprocess 0.70.19 (py312), tensorboardX 2.6.5,
#   hjson 3.1.0, pydantic 2.14.3 + pydantic-core 2.50.4 (cp312) + annotated-types 0.8.0 +
#   typing-inspection 0.4.5 + typing-extensions 4.16.0 (pydantic needs >= 4.16; shadows the
#   machine's), webdataset 1.0.2 + braceexpand 0.1.7 (sat.data_utils), wandb 0.31.0 +
#   platformdirs 4.14.7 + opentelemetry-api 1.45.2 (what `import wandb` needs).
#   Left out on purpose: boto3, cpm-kernels (SAT imports them lazily or under try), cwevals and
#   the opentelemetry sdk/exporters (only used by a running wandb service).
# Two of them are built here, not downloaded as is:
#   - deepspeed: `DS_ACCELERATOR=cuda DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation
#     deepspeed==0.19.8` -> py3-none-any, no compiled ops (JIT-built on first use if needed);
#   - wandb-0.31.0-0nobin-py3-none-any.whl: the official manylinux wheel with wandb/bin/
#     (wandb-core service binary etc., 19 MiB of the 20) removed and re-packed with build tag
#     `0nobin`. `import wandb` and wandb.init(mode="disabled") work; online/offline runs raise
#     WandbCoreNotAvailableError (there is no network there anyway). WANDB_MODE=disabled is set.
# Everything else: `pip download --no-deps --only-binary=:all: --python-version 3.12
#   --implementation cp --platform manylinux_2_17_x86_64 ... -d .whl NAME==VERSION`.
# Optional `.whl-ffmpeg/` (29 MiB): imageio-ffmpeg 0.6.0 with its static ffmpeg 7 (libx264),
# which sat/tora/sampling.py needs to write mp4s; installed too when it is carried.
# The wheels are unpacked with `pip --target` into $TORA_SITE (default /tmp/site), which goes
# first on PYTHONPATH, followed by the repo's sat/ folder (the `tora` package).
#
# What it exports: PYTHONPATH, OMP_NUM_THREADS (cores per GPU / 2 unless already set),
# DS_ACCELERATOR=cuda, the NVLink-multicast-off variables (keep them: KINDS.md says why),
# offline switches for the HF hub/datasets/wandb, PYTHONUNBUFFERED=1.  Then it prints the
# versions of the stack and returns non-zero if a required import fails.
#
# Overrides (for a local dry run): TORA_WHEELS (wheel folder, default $REPO/.whl),
# TORA_SITE (install folder), TORA_PYTHON (interpreter, default python3).
# Does not `set -e` or `exit`: it is sourced, so it only returns a status.

TORA_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORA_WHEELS="${TORA_WHEELS:-$TORA_REPO/.whl}"
TORA_SITE="${TORA_SITE:-/tmp/site}"
TORA_PYTHON="${TORA_PYTHON:-python3}"
export TORA_REPO TORA_SITE

tora_env_setup() {
    # Preferred: .device/site.tar.xz, the wheels already unpacked for Python 3.12 and xz-packed
    # (about half the size of the wheels; scripts/fetch_device_wheels.sh --pack writes it).
    local archive="$TORA_REPO/.device/site.tar.xz"
    if [ -f "$archive" ]; then
        local stamp_xz
        stamp_xz="$(ls -l "$archive" | md5sum | cut -d' ' -f1)"
        if [ "$(cat "$TORA_SITE/.tora_wheels" 2>/dev/null)" != "$stamp_xz" ]; then
            rm -rf "$TORA_SITE" && mkdir -p "$TORA_SITE" && tar -C "$TORA_SITE" -xJf "$archive" || {
                echo "device_env: FATAL: cannot unpack $archive into $TORA_SITE" >&2
                return 1
            }
            echo "$stamp_xz" > "$TORA_SITE/.tora_wheels"
        fi
        tora_env_exports
        return
    fi
    local wheels=() d
    for d in "$TORA_WHEELS" "$TORA_REPO/.whl-ffmpeg"; do
        [ -d "$d" ] && wheels+=("$d"/*.whl)
    done
    if [ ! -e "${wheels[0]:-}" ]; then
        echo "device_env: FATAL: no wheels in $TORA_WHEELS (name .whl in the call's carry)" >&2
        return 1
    fi
    # Install once per machine: skip when the same wheel set is already unpacked in $TORA_SITE.
    local stamp
    stamp="$(ls -l "${wheels[@]}" | md5sum | cut -d' ' -f1)"
    if [ "$(cat "$TORA_SITE/.tora_wheels" 2>/dev/null)" != "$stamp" ]; then
        "$TORA_PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$TORA_SITE" "${wheels[@]}" || {
            echo "device_env: FATAL: pip install of ${#wheels[@]} wheels into $TORA_SITE failed" >&2
            return 1
        }
        echo "$stamp" > "$TORA_SITE/.tora_wheels"
    fi
    tora_env_exports
}

tora_env_exports() {
    export PYTHONPATH="$TORA_SITE:$TORA_REPO/sat${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$TORA_SITE/bin:$PATH"

    # Threads: half the cores per GPU process (16-core, 1-GPU box -> 8), leaving room for
    # data-loader workers and ffmpeg.  Respect a value that is already set.
    local cores gpus
    cores="$(nproc 2>/dev/null || echo 16)"
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
    [ "${gpus:-0}" -ge 1 ] 2>/dev/null || gpus=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / gpus / 2 > 0 ? cores / gpus / 2 : 1 ))}"

    export DS_ACCELERATOR=cuda
    # NVLink multicast must stay off on these machines (shared hosts).
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    # No network there: fail fast instead of waiting on hub look-ups; no wandb service binary.
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
    export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

    "$TORA_PYTHON" - <<'PYEOF'
import importlib, os, sys, traceback

from importlib.metadata import version, PackageNotFoundError

def ver(dist):
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"

import torch
print(f"python {sys.version.split()[0]} ({sys.executable})")
print(f"torch {torch.__version__} cuda {torch.version.cuda}", end="")
if torch.cuda.is_available():
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    print(f" | {torch.cuda.device_count()} x {', '.join(names)}")
else:
    print(" | WARNING: no CUDA device visible")
for d in ["SwissArmyTransformer", "deepspeed", "diffusers", "transformers", "omegaconf",
          "huggingface_hub", "datasets", "pydantic", "wandb", "protobuf", "pyarrow", "fsspec",
          "typing_extensions", "numpy"]:
    print(f"  {d:21s} {ver(d)}")
try:
    import imageio_ffmpeg
    print(f"  ffmpeg                {imageio_ffmpeg.get_ffmpeg_exe()}")
except Exception as e:
    print(f"  ffmpeg                none ({type(e).__name__}: mp4 writing needs .whl-ffmpeg carried)")
print(f"  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')}")

failed = []
for mod in ["deepspeed", "sat.training.deepspeed_training", "diffusers", "omegaconf",
            "tora.dit", "tora.engine"]:
    try:
        importlib.import_module(mod)
    except Exception:
        failed.append(mod)
        print(f"device_env: IMPORT FAILED: {mod}", file=sys.stderr)
        traceback.print_exc()
if failed:
    print(f"device_env: FATAL: {len(failed)} required import(s) failed: {', '.join(failed)}",
          file=sys.stderr)
    sys.exit(1)
print("device_env: OK")
PYEOF
}

tora_env_setup
