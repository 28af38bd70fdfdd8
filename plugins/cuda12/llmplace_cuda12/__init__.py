"""The CUDA 12 backend of llmplace: llama.cpp's libggml-cuda.so built with a CUDA 12 toolkit (for drivers older
than CUDA 13), loaded by llmplace from this folder.

Nothing to import by hand: with this package installed, `llmplace.devices()` lists the GPUs."""
