# Sourced by the GPU machine's scripts (gpu_suite.sh, gpu_serve_bench.sh, gpu_vulkan_bench.sh): make the CUDA stage
# of llmplace ready in /tmp/stage, the same way for each. /tmp survives between the calls of one lease.
#   prepare_stage [build] [pack]
# Installs the carried .whl/ (cffi, pycparser, gguf) into /tmp/site and puts /tmp/stage and /tmp/site on
# PYTHONPATH; unpacks a carried .stage/stage.tar.xz.*; without one, `build` builds the stage from the carried
# .dev (tools/build_cuda_stage.sh, 4-5 minutes) and `pack` then packs it into $out in parts under 16 MiB, to
# carry to a later lease. Last, the checkout's Python sources replace the stage's (the compiled parts stay).
# Needs $repo (the checkout) and $out (the results folder).
prepare_stage() {
    local build=0 pack=0 arg
    for arg in "$@"; do
        case $arg in build) build=1 ;; pack) pack=1 ;; *) echo "prepare_stage: unknown $arg"; return 2 ;; esac
    done
    if [ -d "$repo/.whl" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$repo"/.whl/*.whl
    fi
    export PYTHONPATH=/tmp/stage:/tmp/site PYTHONUNBUFFERED=1
    if [ ! -f /tmp/stage/llmplace/_build_info.py ]; then
        if ls "$repo"/.stage/stage.tar.xz.* >/dev/null 2>&1; then
            cat "$repo"/.stage/stage.tar.xz.* | xz -d -T0 | tar xf - -C /tmp
        elif [ $build = 1 ]; then
            [ -d "$repo/.dev" ] || { echo "carry .dev (to build) or .stage (a packed stage)"; return 1; }
            "$repo/tools/build_cuda_stage.sh" /tmp/b /tmp/stage "${CUDA_ARCH:-90}" > "$out/build.log" 2>&1 \
                || { tail -40 "$out/build.log"; return 1; }
            if [ $pack = 1 ]; then
                tar cf - -C /tmp stage | xz -T0 -6 | split -b 15M -d -a 1 - "$out/stage.tar.xz."
            fi
        else
            echo "carry .stage (a packed CUDA stage: tools/gpu_suite.sh STEP=build)"; return 1
        fi
    fi
    (cd "$repo/llmplace" && find . -name "*.py" -not -path "./_native/*" -exec cp --parents {} /tmp/stage/llmplace/ \;)
}
