#!/usr/bin/env bash
# Vulkan on the lent NVIDIA GPU machine (issue 19): Vulkan0 against CUDA0 on the same GPU, then both backends as
# two devices of one process (layers split 1:1), then experts on the CPU with the rest on Vulkan0. llama-bench and
# llmplace, interleaved rep by rep (benchmarks/gpu_suite.py's `compare`: pp512, tg128), each placement also checked
# (explain equals read-back) and its greedy text kept. Writes $OUT/vulkan-dense.json and $OUT/vulkan-moe.json (or
# ./gpu-out), each rewritten after every row, and their logs.
#
#   STEP=dense   the Llama-8B shape, Q4_0 (llmplace.synthetic): CUDA0, Vulkan0, CUDA0 + Vulkan0 layers 1:1
#   STEP=moe     MOE_SHAPE (default qwen3-30b-a3b, Q4_0, 17 GiB): experts on CPU, the rest on CUDA0, then Vulkan0
#   Default STEP="dense moe"; REPS (3), MOE_REPS (2), THREADS (all cores), MOE_SHAPE. One step per call is safer
#   inside a call's 10 minutes: /tmp (the stage, the models) survives between the calls of one lease.
#
# Carry (`run`'s carry list): .vk, .stage (or .dev to build the stage: 4-5 minutes more), .whl, .tok.
#   .vk     made on the developer machine by `VK_TOOLCHAIN=debian13 tools/gpu_vulkan_bench.sh --prepare` (see
#           --prepare below; without VK_TOOLCHAIN, Debian 12's glslc: no cooperative-matrix or integer-dot
#           shaders, so NVIDIA's Vulkan numbers would understate llama.cpp's Vulkan backend): the Vulkan module
#           (llmplace_vulkan/, built from the same pinned source and ggml options as the stage, Release; the GPU
#           machine has no glslc and no Vulkan headers) and the .deb files of the Vulkan loader and GL dispatch
#           libraries (the device README's recipe: the machine has NVIDIA's Vulkan driver but no loader)
#   .stage  a packed CUDA stage (tools/gpu_suite.sh STEP=build packs one into $OUT), or .dev (llama.cpp.tar.xz)
#   .whl    cffi, pycparser, gguf for cp312; .tok: tiny-llama.gguf (SmolLM2's tokenizer for the synthetic models)
#
# The module is installed as the plugin package llmplace_vulkan beside the stage's llmplace (llmplace loads it
# from there after its build-ID check); llama-bench, which looks for modules only beside itself and in its working
# folder, gets it through GGML_BACKEND_PATH.
set -euo pipefail
if [ "${1:-}" = --prepare ]; then
    # On the developer machine (Debian 12, x86-64), in the repository: build the module (Release, the pinned source,
    # the plugin's CMake project) and collect the loader's packages into .vk/.
    # VK_TOOLCHAIN=debian13: compile with Debian 13's glslc (shaderc 2025.2) and Vulkan/SPIR-V headers (1.4.309)
    # instead of Debian 12's, whose glslc knows none of the optional GLSL extensions: the module then has the
    # cooperative-matrix (KHR and NV's coopmat2) and integer-dot shaders that llama.cpp's Vulkan backend runs on
    # NVIDIA GPUs, as a build with a current Vulkan SDK has. Nothing is installed: the packages are extracted
    # into $tc, and glslc runs through Debian 13's own dynamic loader and libraries.
    cd "$(dirname "$0")/.."
    build=${VK_BUILD:-/tmp/vk-gpu-build}
    toolchain=()
    if [ "${VK_TOOLCHAIN:-}" = debian13 ]; then
        tc=/tmp/vk-debian13
        . tools/debian_packages.sh
        debian_unpack "$tc" "trixie main" glslc libshaderc1 libvulkan-dev spirv-headers libc6 libstdc++6 libgcc-s1
        lib="$tc/root/usr/lib/x86_64-linux-gnu"
        printf '#!/bin/sh\nexec %s --library-path %s %s "$@"\n' "$lib/ld-linux-x86-64.so.2" "$lib" \
            "$tc/root/usr/bin/glslc" > "$tc/glslc"
        chmod +x "$tc/glslc"
        toolchain=(-DVulkan_GLSLC_EXECUTABLE="$tc/glslc" -DVulkan_INCLUDE_DIR="$tc/root/usr/include"
                   -DSPIRV-Headers_DIR="$tc/root/usr/share/cmake/SPIRV-Headers")
    fi
    cmake -S plugins/vulkan -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPROJECT_VERSION_OVERRIDE=0.1.0 \
        -DPython_EXECUTABLE="$(command -v python3)" "${toolchain[@]}" > /dev/null
    cmake --build "$build" -j2
    rm -rf .vk && mkdir -p .vk
    cmake --install "$build" --component plugin --prefix .vk > /dev/null
    cp plugins/vulkan/llmplace_vulkan/__init__.py .vk/llmplace_vulkan/
    strip --strip-unneeded .vk/llmplace_vulkan/libggml-vulkan.so
    readelf -d .vk/llmplace_vulkan/libggml-vulkan.so | grep -E "NEEDED|RUNPATH"
    xz -T2 -6 .vk/llmplace_vulkan/libggml-vulkan.so  # 28 MB of mostly SPIR-V: 3 MB to carry beside the stage
    (cd .vk && apt-get download libvulkan1 libglvnd0 libglx0 libgl1 libegl1 libopengl0 libgles2 2> /dev/null)
    du -ah .vk
    exit 0
fi
repo=$PWD; out=$(realpath -m "${OUT:-gpu-out}"); mkdir -p "$out"
STEP=${STEP:-"dense moe"}; REPS=${REPS:-3}; THREADS=${THREADS:-$(nproc)}; MOE_SHAPE=${MOE_SHAPE:-qwen3-30b-a3b}
[ -f .vk/llmplace_vulkan/libggml-vulkan.so.xz ] || { echo "carry .vk (tools/gpu_vulkan_bench.sh --prepare)"; exit 1; }
# the Vulkan loader (and GL dispatch, which NVIDIA's Vulkan driver library needs), unpacked into / as the device
# README says; NVIDIA's driver file named where the loader would not find it
if ! ldconfig -p | grep -q "libvulkan.so.1 "; then
    for f in .vk/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f "$icd" ]; then export VK_DRIVER_FILES=$icd; fi
. "$repo/tools/gpu_stage.sh"; prepare_stage build || exit 1
rm -rf /tmp/stage/llmplace_vulkan && cp -r .vk/llmplace_vulkan /tmp/stage/
xz -d /tmp/stage/llmplace_vulkan/libggml-vulkan.so.xz
export GGML_BACKEND_PATH=/tmp/stage/llmplace_vulkan/libggml-vulkan.so
tok="$repo/.tok/tiny-llama.gguf"; [ -f "$tok" ] || tok="$repo/.dev/tiny-llama.gguf"
synth() {  # synth SHAPE: write /tmp/SHAPE.gguf (Q4_0) once (the same files as tools/gpu_suite.sh)
    [ -f "/tmp/$1.gguf" ] || python3 -m llmplace.synthetic "/tmp/$1.gguf" --shape "$1" --dtype q4_0 --tokenizer-from "$tok"
}
cd /tmp
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>/dev/null || true
python3 - > "$out/vulkan-devices.txt" 2>&1 <<'EOF' || true
import llmplace, llmplace_vulkan._build_info as info
print({k: v for k, v in vars(info).items() if k.isupper()})
for d in llmplace.devices():
    print(d)
for m in llmplace.backend_modules():
    print(m)
EOF
cat "$out/vulkan-devices.txt"
for step in $STEP; do
case $step in
dense)
    synth llama-8b
    python3 "$repo/tools/gpu_vulkan_bench.py" dense /tmp/llama-8b.gguf --reps "$REPS" --threads "$THREADS" \
        --out "$out/vulkan-dense.json" 2>&1 | tee "$out/vulkan-dense.log"
    ;;
moe)
    synth "$MOE_SHAPE"
    python3 "$repo/tools/gpu_vulkan_bench.py" moe "/tmp/$MOE_SHAPE.gguf" --reps "${MOE_REPS:-2}" --threads "$THREADS" \
        --out "$out/vulkan-moe.json" 2>&1 | tee "$out/vulkan-moe.log"
    ;;
*) echo "unknown step $step"; exit 1 ;;
esac
done
