// llmplace shim: extern "C" wrappers over the C++ parts of llama.cpp that the C API does not expose.
// Every function catches every C++ exception: nothing may unwind into cffi's C frames.
#include "llmplace_shim.h"

#include "llama-arch.h"   // llama.cpp internal: llm_arch_from_string, llm_arch_supports_sm_tensor
#include "llama-ext.h"    // llama.cpp internal: llama_get_memory_breakdown
#include "llama-model.h"  // llama.cpp internal: llama_model::tensors_by_name

#include "fit.h"          // llama.cpp common: common_fit_params
#include "json-schema-to-grammar.h"  // llama.cpp common: json_schema_to_grammar, common_json

#include "ggml-backend.h"

#include <cstring>
#include <regex>
#include <string>

namespace {

void copy_message(const std::string & message, char * out, size_t out_size) {
    if (out == nullptr || out_size == 0) {
        return;
    }
    size_t n = message.size() < out_size - 1 ? message.size() : out_size - 1;
    std::memcpy(out, message.data(), n);
    out[n] = '\0';
}

}  // namespace

extern "C" const char * llmplace_llama_commit(void) {
    return LLMPLACE_LLAMA_COMMIT;
}

extern "C" int llmplace_regex_check(const char * pattern, char * err, size_t err_size) {
    try {
        std::regex re(pattern);  // ECMAScript is the default grammar, as in llama-model-loader.cpp
        (void) re;
        copy_message("", err, err_size);
        return 1;
    } catch (const std::exception & e) {
        copy_message(e.what(), err, err_size);
        return 0;
    }
}

extern "C" int llmplace_regex_search(const char * pattern, const char * text) {
    try {
        return std::regex_search(text, std::regex(pattern)) ? 1 : 0;
    } catch (const std::exception &) {
        return -1;
    }
}

extern "C" int llmplace_arch_supports_tensor_split(const char * arch) {
    try {
        const llm_arch id = llm_arch_from_string(arch == nullptr ? "" : arch);
        if (id == LLM_ARCH_UNKNOWN) {
            return -1;
        }
        return llm_arch_supports_sm_tensor(id) ? 1 : 0;
    } catch (...) {
        return -1;
    }
}

extern "C" bool llmplace_abort_if_flag_set(void * user_data) {
    // Written by Python from another thread; read with acquire semantics so the store is seen promptly.
    return user_data != nullptr && __atomic_load_n(static_cast<int *>(user_data), __ATOMIC_ACQUIRE) != 0;
}

extern "C" int32_t llmplace_model_tensor_count(const struct llama_model * model) {
    return model == nullptr ? 0 : (int32_t) model->tensors_by_name.size();
}

extern "C" int llmplace_model_tensor_info(const struct llama_model * model, int32_t i, const char ** name,
                                          const char ** buffer_type, uint64_t * n_bytes) {
    if (model == nullptr || i < 0 || (size_t) i >= model->tensors_by_name.size()) {
        return 0;
    }
    const auto & entry = model->tensors_by_name[(size_t) i];
    const ggml_tensor * tensor = entry.second;
    *name = entry.first.c_str();
    // A no_alloc (dry-run) load gives each weight a size-0 buffer of the chosen type, so this reads the
    // placement decision in both kinds of load.
    *buffer_type = tensor->buffer != nullptr ? ggml_backend_buft_name(ggml_backend_buffer_get_type(tensor->buffer)) : "";
    *n_bytes = ggml_nbytes(tensor);
    return 1;
}

extern "C" int32_t llmplace_memory_breakdown(const struct llama_context * ctx, int32_t max, const char ** buffer_type,
                                             uint64_t * model, uint64_t * context, uint64_t * compute,
                                             int32_t * is_host) {
    if (ctx == nullptr) {
        return -1;
    }
    try {
        const llama_memory_breakdown breakdown = llama_get_memory_breakdown(ctx);
        int32_t i = 0;
        for (const auto & [buft, data] : breakdown) {
            if (i < max) {
                buffer_type[i] = ggml_backend_buft_name(buft);
                model[i] = data.model;
                context[i] = data.context;
                compute[i] = data.compute;
                is_host[i] = ggml_backend_buft_is_host(buft) ? 1 : 0;
            }
            i++;
        }
        return i;
    } catch (...) {
        return -1;
    }
}

extern "C" int32_t llmplace_fit_params(const char * path, struct llama_model_params * mparams,
                                       struct llama_context_params * cparams, float * tensor_split,
                                       struct llama_model_tensor_buft_override * overrides, size_t * margins,
                                       uint32_t n_ctx_min, const char * draft_path,
                                       struct llama_model_params * draft_mparams,
                                       struct llama_context_params * draft_cparams, int32_t log_level,
                                       char * err, size_t err_size) {
    try {
        common_fit_extra_model draft = {draft_path, draft_mparams, draft_cparams, false};
        const common_params_fit_status status = common_fit_params(
            path, mparams, cparams, tensor_split, overrides, margins, n_ctx_min,
            draft_path != nullptr ? &draft : nullptr, (ggml_log_level) log_level);
        if (status == COMMON_PARAMS_FIT_STATUS_ERROR) {
            copy_message("llama.cpp's fit failed (its log says why)", err, err_size);
        }
        return (int32_t) status;
    } catch (const std::exception & e) {
        copy_message(e.what(), err, err_size);
        return 2;
    } catch (...) {
        copy_message("unknown C++ exception in common_fit_params", err, err_size);
        return 2;
    }
}

extern "C" int llmplace_json_schema_to_grammar(const char * schema_json, char * out, size_t out_size) {
    // Returns the GBNF's length (the text is complete in out only when that is < out_size), or a negative code
    // with the reason in out: -1 not JSON, -2 a schema llama.cpp's converter refuses, -3 anything else.
    if (schema_json == nullptr) {
        copy_message("no schema given", out, out_size);
        return -3;
    }
    common_json schema;
    try {
        schema = common_json::parse(schema_json);
    } catch (const std::exception & e) {
        copy_message(std::string("the schema is not valid JSON: ") + e.what(), out, out_size);
        return -1;
    } catch (...) {
        copy_message("the schema is not valid JSON", out, out_size);
        return -1;
    }
    try {
        const std::string grammar = json_schema_to_grammar(schema, /* force_gbnf */ true);
        if (grammar.size() > (size_t) INT32_MAX) {
            copy_message("the grammar is too large", out, out_size);
            return -3;
        }
        copy_message(grammar, out, out_size);
        return (int) grammar.size();
    } catch (const std::exception & e) {
        copy_message(e.what(), out, out_size);
        return -2;
    } catch (...) {
        copy_message("unknown C++ exception in json_schema_to_grammar", out, out_size);
        return -3;
    }
}
