#!/usr/bin/env bash
# Build llmplace with the CUDA backend into a staging folder, without pip or network (for the lent GPU
# machine): the pinned source must already be in vendor/llama.cpp (or packed in .dev/llama.cpp.tar.xz), and
# cffi + pycparser importable. Usage: tools/build_cuda_stage.sh BUILD_DIR STAGE_DIR [CUDA_ARCH]
#
# Use the system compilers (the GPU machine's image sets CC/CXX to a GCC in /opt/gcc that links libstdc++
# statically into every shared library; several static copies of libstdc++ in one process crashed
# llama.cpp's tokenizer in std::regex). Override with LLMPLACE_CC / LLMPLACE_CXX.
set -euo pipefail
build=${1:?build dir}; stage=${2:?stage dir}; arch=${3:-90}
cd "$(dirname "$0")/.."
if [ ! -d vendor/llama.cpp ] && [ -f .dev/llama.cpp.tar.xz ]; then
    mkdir -p vendor && tar xJf .dev/llama.cpp.tar.xz -C vendor
fi
export CC="${LLMPLACE_CC:-/usr/bin/gcc}" CXX="${LLMPLACE_CXX:-/usr/bin/g++}"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
      -DPython_EXECUTABLE="$(command -v python3)"
cmake --build "$build" -j"$(nproc)"
cmake --install "$build" --component llmplace --prefix "$stage"
# the Python sources, subpackages included (the install step put only the compiled parts there)
(cd llmplace && find . -name "*.py" -not -path "./_native/*" -exec cp --parents {} "$stage/llmplace/" \;)
