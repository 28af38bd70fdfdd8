/* llmplace shim: plain-C entry points for what llama.cpp's C API lacks.
 * Parsed by the cffi generator (build_cffi.py): keep it C, no macros in declarations. */
#ifndef LLMPLACE_SHIM_H
#define LLMPLACE_SHIM_H

#include <stddef.h>
#include <stdint.h>
#ifndef __cplusplus
#include <stdbool.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The llama.cpp commit this shim (and so the whole build) was compiled from. */
const char * llmplace_llama_commit(void);

/* Check a tensor-override pattern with the engine llama.cpp matches it with (std::regex, ECMAScript).
 * Returns 1 if valid; 0 if not, with the engine's message copied (NUL-terminated) into err. */
int llmplace_regex_check(const char * pattern, char * err, size_t err_size);

/* Does the pattern match somewhere in text (std::regex_search, as the model loader does)?
 * Returns 1 or 0, or -1 if the pattern is invalid. */
int llmplace_regex_search(const char * pattern, const char * text);

struct llama_model;

/* Weight tensors of a loaded model (also of a no_alloc dry-run load), in llama.cpp's order. */
int32_t llmplace_model_tensor_count(const struct llama_model * model);

/* The i-th weight tensor: its name, the name of the buffer type holding it ("CPU", "CUDA0", "CPU_REPACK",
 * "RPC0[host:port]" ...; "" if none) and its size in bytes. Returns 0 when i is out of range. The strings
 * live as long as the model. */
int llmplace_model_tensor_info(const struct llama_model * model, int32_t i, const char ** name,
                               const char ** buffer_type, uint64_t * n_bytes);

/* An abort callback for llama_context_params / llama_set_abort_callback: returns true once the int that
 * user_data points to is non-zero. ggml calls the abort callback at every graph node, so it lives in C:
 * a Python callback there would cost a GIL round trip per node. */
bool llmplace_abort_if_flag_set(void * user_data);

#ifdef __cplusplus
}
#endif

#endif
