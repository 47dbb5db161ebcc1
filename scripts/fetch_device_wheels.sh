#!/usr/bin/env bash
# Download (and where needed build) the wheels that scripts/device_env.sh installs on the lent GPU
# machine (Python 3.12, no network there) into the git-ignored folders .whl/ and .whl-ffmpeg/.
# Run once on a machine with PyPI access, from the repository root:
#     bash scripts/fetch_device_wheels.sh [--pack]
# The list and the reasons for each version are in scripts/device_env.sh's header.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl .whl-ffmpeg
grep -qs '^/.whl/$' .git/info/exclude || printf '/.whl/\n/.whl-ffmpeg/\n' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
get() {  # get DEST NAME==VERSION ...  (one at a time: a failure names its package and stops)
    local dest=$1 spec; shift
    for spec in "$@"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d "$dest" "$spec" 2>&1 | grep -v "^WARNING: Location" || true
        ls "$dest" | grep -qi "^$(echo "${spec%%==*}" | tr '-' '_' )-\|^${spec%%==*}-" \
            || { echo "fetch_device_wheels: no wheel for $spec" >&2; return 1; }
    done
}
get .whl SwissArmyTransformer==0.4.12 diffusers==0.42.1 omegaconf==2.4.0 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 tensorboardX==2.6.5 hjson==3.1.0 \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7 platformdirs==4.14.7 \
    opentelemetry-api==1.45.2 decord==0.6.0
# deepspeed: a pure-Python wheel without compiled ops (JIT-built on first use if ever needed).
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$tmp" deepspeed==0.19.8
    DS_ACCELERATOR=cuda DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-0.19.8.tar.gz
    rm -rf "$tmp"
fi
# wandb: the manylinux wheel without its service binaries (import works, runs are disabled there).
if ! ls .whl/wandb-0.31.0-0nobin-*.whl >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    get "$tmp" wandb==0.31.0
    "$PY" - "$tmp"/wandb-0.31.0-*.whl .whl/wandb-0.31.0-0nobin-py3-none-any.whl <<'PYEOF'
import sys, zipfile
source, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.startswith("wandb/bin/"):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if not l.startswith(b"wandb/bin/"))
        if item.filename.endswith(".dist-info/WHEEL"):
            data = b"\n".join(b"Tag: py3-none-any" if l.startswith(b"Tag:") else l for l in data.split(b"\n"))
        zout.writestr(item, data)
PYEOF
    rm -rf "$tmp"
fi
# ffmpeg for mp4 writing (imageio-ffmpeg ships a static ffmpeg).
get .whl-ffmpeg imageio-ffmpeg==0.6.0
# --pack: the same wheels unpacked for Python 3.12 and xz-packed into .device/site.tar.xz (about
# half their size: what one device call can carry beside the tree), which device_env.sh prefers.
if [ "${1:-}" = "--pack" ]; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" --python-version 3.12 \
        --implementation cp --only-binary=:all: "${platforms[@]}" .whl/*.whl .whl-ffmpeg/*.whl
    mkdir -p .device && grep -qs '^/.device/$' .git/info/exclude || echo /.device/ >> .git/info/exclude
    tar -C "$site" -cf - . | xz -T0 -9 > .device/site.tar.xz
    rm -rf "$site"
fi
du -sh .whl .whl-ffmpeg .device 2>/dev/null
