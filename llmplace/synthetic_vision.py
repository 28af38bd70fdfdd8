"""A tiny synthetic vision model: a LLaVA-1.5-style pair of GGUF files with random weights.

Why: no small vision GGUF can be had where the tests run, and images need two files that libmtmd accepts: the
text model (a llama, written by `llmplace.synthetic`) and its projector ("mmproj"). The projector written here
is LLaVA-1.5's: a CLIP ViT (class embedding, learned position embeddings, pre-layernorm, pre-norm blocks with
biased attention and a GELU feed-forward) followed by the "mlp" projector (`mm.0` → GELU → `mm.2`) into the
text model's embedding space. Tensor names, shapes and metadata keys are those llama.cpp's converter writes for
llava-hf checkpoints and that the pinned libmtmd reads (tools/mtmd/clip.cpp, clip-impl.h); only the sizes are
tiny: a 56x56 image in 14x14 patches gives 16 image tokens, and the whole pair loads and runs in well under a
second on one core.

    python -m llmplace.synthetic_vision /tmp/vision      # writes text.gguf and mmproj.gguf there

Like llmplace.synthetic, this depends only on numpy and gguf.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from . import synthetic

__all__ = ["ClipShape", "TINY_CLIP", "TINY_VISION_TEXT", "write_projector", "write_vision_model"]


@dataclass(frozen=True, kw_only=True)
class ClipShape:
    """A CLIP vision tower with LLaVA's MLP projector (the `clip.vision.*` keys libmtmd reads)."""

    image_size: int  # clip.vision.image_size: images are resized (padded to a square) to this many pixels a side
    patch_size: int  # clip.vision.patch_size
    n_embd: int  # clip.vision.embedding_length
    n_ff: int  # clip.vision.feed_forward_length
    n_head: int  # clip.vision.attention.head_count
    n_layer: int  # clip.vision.block_count (LLaVA reads the features of the second-to-last block)
    eps: float = 1e-5  # clip.vision.attention.layer_norm_epsilon

    @property
    def n_patches(self) -> int:
        """Image tokens per image: the projector turns each patch into one text-model embedding."""
        return (self.image_size // self.patch_size) ** 2

    def check(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_ff == self.n_embd:
            # clip.cpp swaps ffn_up/ffn_down of LLaVA files whose ffn_down rows are n_embd long (a legacy export);
            # with n_ff == n_embd the orientation could not be told apart
            raise ValueError("n_ff must differ from n_embd")
        if self.n_layer < 2:
            raise ValueError("LLaVA reads the second-to-last block's output: n_layer must be at least 2")


TINY_CLIP = ClipShape(image_size=56, patch_size=14, n_embd=32, n_ff=64, n_head=2, n_layer=3)
# The text model: a tiny llama whose embedding size the projector's output must equal.
TINY_VISION_TEXT = synthetic.TINY_LLAMA

# CLIP's own normalization constants (OpenAI CLIP, as llava-hf's image processor carries them).
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _tensors(shape: ClipShape, n_embd_text: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, ggml-order shape, kind) of every projector tensor, in the converter's order. kind: "matrix" (f16, a
    projection), "norm" (f32 ~1), "bias" (f32 ~0), "embd" (f32 embeddings)."""
    d, ff, p = shape.n_embd, shape.n_ff, shape.patch_size
    plan = [
        ("mm.0.weight", (d, n_embd_text), "matrix"),
        ("mm.0.bias", (n_embd_text,), "bias"),
        ("mm.2.weight", (n_embd_text, n_embd_text), "matrix"),
        ("mm.2.bias", (n_embd_text,), "bias"),
        ("v.class_embd", (d,), "embd"),
        ("v.patch_embd.weight", (p, p, 3, d), "matrix"),  # a convolution kernel: patch x patch x RGB per channel
        ("v.position_embd.weight", (d, shape.n_patches + 1), "embd"),  # + 1: the class embedding's position
        ("v.pre_ln.weight", (d,), "norm"),
        ("v.pre_ln.bias", (d,), "bias"),
    ]
    for i in range(shape.n_layer):
        blk = f"v.blk.{i}."
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            plan += [(blk + proj + ".weight", (d, d), "matrix"), (blk + proj + ".bias", (d,), "bias")]
        plan += [
            (blk + "ln1.weight", (d,), "norm"), (blk + "ln1.bias", (d,), "bias"),
            (blk + "ffn_up.weight", (d, ff), "matrix"), (blk + "ffn_up.bias", (ff,), "bias"),
            (blk + "ffn_down.weight", (ff, d), "matrix"), (blk + "ffn_down.bias", (d,), "bias"),
            (blk + "ln2.weight", (d,), "norm"), (blk + "ln2.bias", (d,), "bias"),
        ]
    return plan


def write_projector(path: str | os.PathLike[str], shape: ClipShape = TINY_CLIP, *, n_embd_text: int,
                    seed: int = 0) -> Path:
    """Write a LLaVA-1.5 projector (mmproj) GGUF of `shape` with random weights whose output embeddings have
    `n_embd_text` values (the text model's embedding_length, which libmtmd checks). Same arguments, same bytes."""
    shape.check()
    if n_embd_text <= 0:
        raise ValueError(f"n_embd_text must be positive, got {n_embd_text}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_name("llmplace synthetic llava-1.5 projector")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", False)  # CLIP's quick GELU, as llava-hf's config says (hidden_act quick_gelu)
    writer.add_uint32("clip.vision.image_size", shape.image_size)
    writer.add_uint32("clip.vision.patch_size", shape.patch_size)
    writer.add_uint32("clip.vision.embedding_length", shape.n_embd)
    writer.add_uint32("clip.vision.feed_forward_length", shape.n_ff)
    writer.add_uint32("clip.vision.projection_dim", n_embd_text)
    writer.add_uint32("clip.vision.attention.head_count", shape.n_head)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", shape.eps)
    writer.add_uint32("clip.vision.block_count", shape.n_layer)
    writer.add_array("clip.vision.image_mean", _CLIP_MEAN)
    writer.add_array("clip.vision.image_std", _CLIP_STD)

    rng = np.random.default_rng(seed)
    for name, ne, kind in _tensors(shape, n_embd_text):
        n = math.prod(ne)
        values = rng.standard_normal(n, dtype=np.float32)
        if kind == "matrix":
            # 1/sqrt(fan-in): each projection keeps activations near unit scale, so the image embeddings the text
            # model receives are of the size its own token embeddings have
            fan_in = ne[0] if len(ne) == 2 else math.prod(ne[:3])
            array = (values / math.sqrt(fan_in)).astype(np.float16)
        elif kind == "norm":
            array = 1.0 + 0.02 * values
        elif kind == "bias":
            array = 0.02 * values
        else:
            array = 0.1 * values
        # gguf-py takes numpy-order shapes (ggml order reversed)
        writer.add_tensor(name, array.reshape(tuple(reversed(ne))))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def write_vision_model(folder: str | os.PathLike[str], *, text_shape: synthetic.LlamaShape = TINY_VISION_TEXT,
                       clip_shape: ClipShape = TINY_CLIP, tokenizer_from: str | os.PathLike[str] | None = None,
                       seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny vision model into `folder`: `text.gguf` (a llama with `tokenizer_from`'s tokenizer and chat
    template, Q8_0) and `mmproj.gguf` (its LLaVA-1.5 projector). Returns (text path, projector path)."""
    folder = Path(folder)
    text = synthetic.write_model(folder / "text.gguf", text_shape, tokenizer_from=tokenizer_from, dtype="q8_0",
                                 seed=seed)
    projector = write_projector(folder / "mmproj.gguf", clip_shape, n_embd_text=text_shape.n_embd, seed=seed)
    return text, projector


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmplace.synthetic_vision", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="where to write text.gguf and mmproj.gguf")
    parser.add_argument("--tokenizer-from", help="a GGUF whose tokenizer.* keys to copy (default: SmolLM2's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    text, projector = write_vision_model(args.folder, tokenizer_from=args.tokenizer_from, seed=args.seed)
    print(f"{text}\n{projector}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
