/* llmplace shim: plain-C entry points for what llama.cpp's C API lacks.
 * Parsed by the cffi generator (build_cffi.py): keep it C, no macros in declarations. */
#ifndef LLMPLACE_SHIM_H
#define LLMPLACE_SHIM_H

#include <stddef.h>
#include <stdint.h>
#ifndef __cplusplus
#include <stdbool.h>
#endif

/* The shim is compiled with hidden visibility (CMakeLists.txt): only these functions are exported. Its own
 * instantiations of C++ templates (std::regex ...) must stay private: exported, the dynamic linker may bind
 * libllama's calls to them (seen as a crash in llama.cpp's tokenizer on the GPU machine). */
#if defined(__GNUC__) && !defined(LLMPLACE_CFFI_PARSE)
#define LLMPLACE_API __attribute__((visibility("default")))
#else
#define LLMPLACE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The llama.cpp commit this shim (and so the whole build) was compiled from. */
LLMPLACE_API const char * llmplace_llama_commit(void);

/* Check a tensor-override pattern with the engine llama.cpp matches it with (std::regex, ECMAScript).
 * Returns 1 if valid; 0 if not, with the engine's message copied (NUL-terminated) into err. */
LLMPLACE_API int llmplace_regex_check(const char * pattern, char * err, size_t err_size);

/* Does the pattern match somewhere in text (std::regex_search, as the model loader does)?
 * Returns 1 or 0, or -1 if the pattern is invalid. */
LLMPLACE_API int llmplace_regex_search(const char * pattern, const char * text);

struct llama_model;

/* Weight tensors of a loaded model (also of a no_alloc dry-run load), in llama.cpp's order. */
LLMPLACE_API int32_t llmplace_model_tensor_count(const struct llama_model * model);

/* The i-th weight tensor: its name, the name of the buffer type holding it ("CPU", "CUDA0", "CPU_REPACK",
 * "RPC0[host:port]" ...; "" if none) and its size in bytes. Returns 0 when i is out of range. The strings
 * live as long as the model. */
LLMPLACE_API int llmplace_model_tensor_info(const struct llama_model * model, int32_t i, const char ** name,
                               const char ** buffer_type, uint64_t * n_bytes);

/* Does llama.cpp implement split_mode TENSOR for this architecture ("llama", "qwen3moe" ...)? Returns 1 or 0,
 * or -1 for an architecture name this llama.cpp does not know. Loading an unsupported one fails late. */
LLMPLACE_API int llmplace_arch_supports_tensor_split(const char * arch);

struct llama_context;
struct llama_model_params;
struct llama_context_params;
struct llama_model_tensor_buft_override;

/* The memory a context and its model use per buffer type, as llama.cpp accounts it (llama_get_memory_breakdown;
 * for a no_alloc dry run, what a real load would allocate). Writes at most max entries: the buffer type's
 * name (static), its model / context (KV cache) / compute bytes, and whether the buffer type is host memory.
 * Returns the number of buffer types (may exceed max), or -1 on error. */
LLMPLACE_API int32_t llmplace_memory_breakdown(const struct llama_context * ctx, int32_t max, const char ** buffer_type,
                                               uint64_t * model, uint64_t * context, uint64_t * compute,
                                               int32_t * is_host);

/* llama.cpp's memory fit (common_fit_params in common/fit.cpp): adjusts n_gpu_layers, tensor_split, the
 * overrides and n_ctx (only where still at their defaults; n_ctx only if 0) so the model fits the devices'
 * free memory minus margins[i] bytes (one per device of the model's device list). draft_path may be NULL;
 * otherwise the draft model is fitted alongside. Returns 0 (fits), 1 (cannot fit) or 2 (error, message in
 * err). C++ exceptions never escape. */
LLMPLACE_API int32_t llmplace_fit_params(const char * path, struct llama_model_params * mparams,
                                         struct llama_context_params * cparams, float * tensor_split,
                                         struct llama_model_tensor_buft_override * overrides, size_t * margins,
                                         uint32_t n_ctx_min, const char * draft_path,
                                         struct llama_model_params * draft_mparams,
                                         struct llama_context_params * draft_cparams, int32_t log_level,
                                         char * err, size_t err_size);

/* An abort callback for llama_context_params / llama_set_abort_callback: returns true once the int that
 * user_data points to is non-zero. ggml calls the abort callback at every graph node, so it lives in C:
 * a Python callback there would cost a GIL round trip per node. */
LLMPLACE_API bool llmplace_abort_if_flag_set(void * user_data);

/* llama.cpp's JSON schema -> GBNF converter (common/json-schema-to-grammar.cpp) on a schema given as JSON text.
 * Returns the grammar's length in bytes: the NUL-terminated text is in out only when that length is below
 * out_size (otherwise call again with a bigger buffer). On failure returns a negative code with the reason
 * in out: -1 the text is not JSON, -2 the converter refuses the schema, -3 any other error. C++ exceptions
 * never escape. */
LLMPLACE_API int llmplace_json_schema_to_grammar(const char * schema_json, char * out, size_t out_size);

#ifdef __cplusplus
}
#endif

#endif
