#!/usr/bin/env bash
# A CUDA 12 toolkit for building llmplace-cuda12 on a Debian 12 x86-64 machine that has none (issue 19): Debian 13's
# non-free nvidia-cuda-toolkit (CUDA 12.4) and its headers and libraries, downloaded from the machine's own Debian
# mirror and unpacked, nothing installed, then laid out as a toolkit root that CMake's FindCUDAToolkit and nvcc
# understand (bin/, nvvm/, include/, lib64/ and an nvcc.profile pointing at them). NVIDIA's binaries in those
# packages need glibc >= 2.34 (Debian 12 has 2.36) and a host compiler CUDA 12.4 accepts (GCC <= 13: Debian 12's
# GCC 12).
#
#   tools/cuda12_toolkit.sh [ROOT]          default ROOT /tmp/cuda12; about 1.3 GB downloaded, 3.2 GB unpacked
#   CUDACXX=/tmp/cuda12/bin/nvcc CUDAHOSTCXX=/usr/bin/g++ CUDAToolkit_ROOT=/tmp/cuda12 \
#       CHECK=0 tools/build_wheels.sh cuda12
set -euo pipefail
root=$(realpath -m "${1:-/tmp/cuda12}")
work=$root.debs  # apt's lists and the downloaded and unpacked packages
. "$(dirname "$0")/debian_packages.sh"
# nvcc and its tools; the headers and link libraries (nvidia-cuda-dev); the runtime and cuBLAS that ggml-cuda links;
# NVVM; and the C++ headers (CCCL: libcu++, CUB, Thrust) that Debian ships apart
debian_unpack "$work" "trixie main non-free" nvidia-cuda-toolkit nvidia-cuda-dev libcudart12 libcublas12 \
    libcublaslt12 libnvvm4 libcu++-dev libcub-dev libthrust-dev
u=$work/root; toolkit=$u/usr/lib/nvidia-cuda-toolkit
rm -rf "$root" && mkdir -p "$root/bin" "$root/nvvm/bin" "$root/lib64"
# nvcc reads nvcc.profile from its own folder and finds cicc through it: a copy, not a link, so that its folder is
# bin/ here (Debian's points at /etc and /usr)
cp "$toolkit/bin/nvcc" "$root/bin/"
cp "$toolkit/bin/cicc" "$root/nvvm/bin/"
ln -s "$toolkit/bin/crt" "$root/bin/crt"
ln -s "$toolkit/libdevice" "$root/nvvm/libdevice"
for tool in ptxas fatbinary cudafe++ nvlink bin2c cuobjdump nvdisasm nvprune cu++filt; do
    [ -e "$u/usr/bin/$tool" ] && ln -s "$u/usr/bin/$tool" "$root/bin/$tool"
done
ln -s "$u/usr/include" "$root/include"
for f in "$u"/usr/lib/x86_64-linux-gnu/*; do ln -s "$f" "$root/lib64/"; done
cat > "$root/bin/nvcc.profile" <<'EOF'
TOP = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES += "-I$(TOP)/include" $(_SPACE_)
LIBRARIES =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"
EOF
"$root/bin/nvcc" --version | tail -2
