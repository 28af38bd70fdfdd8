"""The CUDA 13 backend of llmplace: llama.cpp's libggml-cuda.so, loaded by llmplace from this folder.

Nothing to import by hand: with this package installed, `llmplace.devices()` lists the GPUs."""
