"""The Vulkan backend of llmplace: llama.cpp's libggml-vulkan.so, loaded by llmplace from this folder.

Nothing to import by hand: with this package installed and a Vulkan driver on the machine, `llmplace.devices()`
lists the GPUs as Vulkan0, Vulkan1 ... Like llama.cpp, the module takes discrete and integrated GPUs; a CPU
Vulkan device (Mesa's lavapipe) only when named with GGML_VK_VISIBLE_DEVICES (e.g. "0"), set before llmplace
loads its backends."""
