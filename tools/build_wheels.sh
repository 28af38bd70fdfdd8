#!/usr/bin/env bash
# Build the base wheel and the CUDA plugin wheel into dist/ (on a machine with nvcc), then, with --check,
# install both into a fresh virtual environment and list the devices from there.
#   tools/build_wheels.sh [--check]   (--check installs offline from dist/, .whl/ and .whl-venv/)
# Release builds: LLMPLACE_CPU_ALL_VARIANTS=ON (every x86 CPU variant in the base wheel) and
# LLMPLACE_CUDA_ARCHITECTURES unset (llama.cpp's own list of CUDA architectures); "90" = Hopper only.
# Compilers: the system gcc/g++ (an image whose default GCC links libstdc++ statically breaks std::regex
# across our libraries; see tools/build_cuda_stage.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d vendor/llama.cpp ] && [ -f .dev/llama.cpp.tar.xz ]; then
    mkdir -p vendor && tar xJf .dev/llama.cpp.tar.xz -C vendor
fi
export CC="${LLMPLACE_CC:-/usr/bin/gcc}" CXX="${LLMPLACE_CXX:-/usr/bin/g++}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
mkdir -p dist
python3 -m pip wheel --no-build-isolation --no-deps -w dist . 2>&1 | tail -2
python3 -m pip wheel --no-build-isolation --no-deps -w dist plugins/cuda 2>&1 | tail -2
ls -la dist
if [ "${1:-}" = "--check" ]; then
    rm -rf /tmp/llmplace-venv && python3 -m venv /tmp/llmplace-venv
    # PYTHONPATH unset: pip must not count packages found there (e.g. a staged cffi) as installed in the venv
    env -u PYTHONPATH /tmp/llmplace-venv/bin/python -m pip install -q --no-index --find-links dist --find-links .whl --find-links .whl-venv llmplace-cuda13
    (cd /tmp && env -u PYTHONPATH /tmp/llmplace-venv/bin/python -c "
import llmplace
for d in llmplace.devices():
    print(d.index, d.name, d.kind, d.description, d.memory_total >> 20, 'MiB')
print([(m.name, m.loaded, m.error) for m in llmplace.backend_modules()])
assert any(d.kind == 'gpu' for d in llmplace.devices()), 'no GPU listed'
")
fi
