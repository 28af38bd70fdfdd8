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

/* llama_sampler_apply / llama_sampler_accept with llama.cpp's C++ exceptions caught. Its grammar sampler throws
 * from accept once no rule can go on ("Unexpected empty grammar stack after accepting piece"): through the C API
 * that exception would end the process in std::terminate. Return 1, or 0 with the reason copied into err. */
struct llama_sampler;
struct llama_token_data_array;
LLMPLACE_API int llmplace_sampler_apply(struct llama_sampler * sampler, struct llama_token_data_array * candidates,
                                        char * err, size_t err_size);
LLMPLACE_API int llmplace_sampler_accept(struct llama_sampler * sampler, int32_t token, char * err, size_t err_size);

/* llama.cpp's JSON schema -> GBNF converter (common/json-schema-to-grammar.cpp) on a schema given as JSON text.
 * Returns the grammar's length in bytes: the NUL-terminated text is in out only when that length is below
 * out_size (otherwise call again with a bigger buffer). On failure returns a negative code with the reason
 * in out: -1 the text is not JSON, -2 the converter refuses the schema, -3 any other error. C++ exceptions
 * never escape. */
LLMPLACE_API int llmplace_json_schema_to_grammar(const char * schema_json, char * out, size_t out_size);

/* ---- llama.cpp's chat layer (common/chat.h): templates with tools, tool-call grammars, reply parsing ----
 * Inputs and outputs cross as JSON text, so the C surface stays small. Strings returned through `out` are
 * allocated by the shim: free them with llmplace_string_free. Every function returns 0 on success or a negative
 * code with the reason copied into err: -1 the input JSON is malformed or names an unknown option, -2 llama.cpp
 * refused it (a template it cannot render or analyse, a tool schema the grammar builder refuses, model output
 * that does not match the format), -3 any other error. C++ exceptions never escape. */
struct llmplace_chat_templates;
struct llmplace_chat_parser;

/* The model's chat templates (default and "tool_use"), or template_source when it is not NULL/empty (model may
 * then be NULL, with bos_token/eos_token given as text). Returns NULL on failure, with the reason in err. */
LLMPLACE_API struct llmplace_chat_templates * llmplace_chat_templates_new(const struct llama_model * model,
                                                                        const char * template_source,
                                                                        const char * bos_token,
                                                                        const char * eos_token,
                                                                        char * err, size_t err_size);
LLMPLACE_API void llmplace_chat_templates_free(struct llmplace_chat_templates * templates);

/* common_chat_templates_apply. inputs_json: {"messages": [...OpenAI messages], "tools": [...] or null,
 * "tool_choice": "auto"|"required"|"none", "parallel_tool_calls": bool, "reasoning_format": "none"|"auto"|
 * "deepseek"|"deepseek-legacy", "enable_thinking": bool, "chat_template_kwargs": {name: value},
 * "add_generation_prompt": bool, "json_schema": schema or null}. *out: {"prompt", "format", "format_name",
 * "grammar", "grammar_lazy", "grammar_triggers": [{"type": "token"|"word"|"pattern"|"pattern_full", "value",
 * "token"}], "preserved_tokens", "additional_stops", "generation_prompt", "parser", "supports_thinking",
 * "thinking_start_tag", "thinking_end_tags", "caps": {name: bool}, "supports_enable_thinking"}. */
LLMPLACE_API int llmplace_chat_templates_apply(const struct llmplace_chat_templates * templates,
                                               const char * inputs_json, char ** out, char * err, size_t err_size);

/* A reply parser. params_json: {"format": int, "parser": text, "generation_prompt": text, "reasoning_format":
 * name, "reasoning_in_content": bool, "parse_tool_calls": bool} (format, parser, generation_prompt as the
 * apply output gave them). Returns NULL on failure, with the reason in err. */
LLMPLACE_API struct llmplace_chat_parser * llmplace_chat_parser_new(const char * params_json, char * err,
                                                                  size_t err_size);
LLMPLACE_API void llmplace_chat_parser_free(struct llmplace_chat_parser * parser);

/* common_chat_parse of text[0:text_len] (is_partial: the reply is still being generated). *out: the message as
 * OpenAI JSON {"role", "content", "reasoning_content"?, "tool_calls"?: [{"type", "id", "function": {"name",
 * "arguments"}}]}. */
LLMPLACE_API int llmplace_chat_parser_parse(const struct llmplace_chat_parser * parser, const char * text,
                                            size_t text_len, int is_partial, char ** out, char * err,
                                            size_t err_size);

/* The memory a multimodal projector (mmproj GGUF) would take, per device, from libmtmd's dry run
 * (mtmd_get_memory_usage: its weights and compute buffers, nothing allocated). device: the ggml device its encoder
 * goes to (NULL: the first GPU when use_gpu). Writes up to `max` pairs (device, bytes) and returns how many
 * there are; -1 when the file could not be read as a projector. */
LLMPLACE_API int32_t llmplace_mtmd_memory_usage(const char * path, bool use_gpu, void * device, int32_t n_threads,
                                                int32_t max, void ** devices, size_t * bytes);

/* Frees a string the shim returned through an `out` parameter. NULL is allowed. */
LLMPLACE_API void llmplace_string_free(char * text);

#ifdef __cplusplus
}
#endif

#endif
