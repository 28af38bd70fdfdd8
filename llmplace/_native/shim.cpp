// llmplace shim: extern "C" wrappers over the C++ parts of llama.cpp that the C API does not expose.
// Every function catches every C++ exception: nothing may unwind into cffi's C frames.
#include "llmplace_shim.h"

#include "llama-arch.h"   // llama.cpp internal: llm_arch_from_string, llm_arch_supports_sm_tensor
#include "llama-ext.h"    // llama.cpp internal: llama_get_memory_breakdown
#include "llama-model.h"  // llama.cpp internal: llama_model::tensors_by_name

#include "fit.h"          // llama.cpp common: common_fit_params
#include "json-schema-to-grammar.h"  // llama.cpp common: json_schema_to_grammar, common_json
#include "chat.h"         // llama.cpp common: chat templates with tools, tool-call grammars, reply parsing
#include "mtmd.h"         // libmtmd: mtmd_get_memory_usage (C++ only)

#include "ggml-backend.h"

#include <cstdlib>
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

namespace {

// 1 after call(), or 0 with the message of the exception it threw copied into err.
template <typename Call> int caught(char * err, size_t err_size, Call && call) {
    try {
        call();
        return 1;
    } catch (const std::exception & e) {
        copy_message(e.what(), err, err_size);
    } catch (...) {
        copy_message("unknown C++ exception", err, err_size);
    }
    return 0;
}

}  // namespace

extern "C" int llmplace_sampler_apply(struct llama_sampler * sampler, struct llama_token_data_array * candidates,
                                      char * err, size_t err_size) {
    return caught(err, err_size, [&] { llama_sampler_apply(sampler, candidates); });
}

extern "C" int llmplace_sampler_accept(struct llama_sampler * sampler, int32_t token, char * err, size_t err_size) {
    return caught(err, err_size, [&] { llama_sampler_accept(sampler, token); });
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

// ---- llama.cpp's chat layer (common/chat.h) ----------------------------------------------------------------

struct llmplace_chat_templates {
    common_chat_templates_ptr templates;
};

struct llmplace_chat_parser {
    common_chat_parser_params params;
};

namespace {

// Error codes of the chat functions (llmplace_shim.h).
constexpr int CHAT_BAD_INPUT = -1;
constexpr int CHAT_REFUSED   = -2;
constexpr int CHAT_OTHER     = -3;

// The input JSON is malformed or names an unknown option: told apart from llama.cpp refusing valid input.
struct bad_input : std::runtime_error {
    using std::runtime_error::runtime_error;
};

char * malloc_copy(const std::string & text) {
    char * out = static_cast<char *>(std::malloc(text.size() + 1));
    if (out == nullptr) {
        throw std::bad_alloc();
    }
    std::memcpy(out, text.data(), text.size());
    out[text.size()] = '\0';
    return out;
}

common_json parse_input(const char * text, const char * what) {
    if (text == nullptr) {
        throw bad_input(std::string("no ") + what + " given");
    }
    try {
        return common_json::parse(text);
    } catch (const std::exception & e) {
        throw bad_input(std::string(what) + " is not valid JSON: " + e.what());
    }
}

template <typename T> T field(const common_json & object, const char * key, T fallback) {
    if (!object.contains(key) || object.at(key).is_null()) {
        return fallback;
    }
    try {
        return object.at(key).get<T>();
    } catch (const std::exception & e) {
        throw bad_input(std::string("'") + key + "' has the wrong type: " + e.what());
    }
}

common_reasoning_format reasoning_format_named(const std::string & name) {
    try {
        return common_reasoning_format_from_name(name);
    } catch (const std::exception & e) {
        throw bad_input(std::string(e.what()) + " (use none, auto, deepseek or deepseek-legacy)");
    }
}

const char * trigger_type_name(common_grammar_trigger_type type) {
    switch (type) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:        return "token";
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:         return "word";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:      return "pattern";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: return "pattern_full";
    }
    return "unknown";
}

// Runs body, turning every exception into the documented code with its message in err.
template <typename F> int guarded(F && body, char * err, size_t err_size) {
    try {
        copy_message("", err, err_size);
        return body();
    } catch (const bad_input & e) {
        copy_message(e.what(), err, err_size);
        return CHAT_BAD_INPUT;
    } catch (const std::bad_alloc &) {
        copy_message("out of memory", err, err_size);
        return CHAT_OTHER;
    } catch (const std::exception & e) {
        // Everything else comes from llama.cpp's chat layer refusing the request: a template it cannot render
        // or analyse, a tool schema the grammar builder refuses, messages or tools it cannot read, output
        // that does not match the format.
        copy_message(e.what(), err, err_size);
        return CHAT_REFUSED;
    } catch (...) {
        copy_message("unknown C++ exception in llama.cpp's chat layer", err, err_size);
        return CHAT_OTHER;
    }
}

}  // namespace

extern "C" struct llmplace_chat_templates * llmplace_chat_templates_new(const struct llama_model * model,
                                                                      const char * template_source,
                                                                      const char * bos_token,
                                                                      const char * eos_token,
                                                                      char * err, size_t err_size) {
    llmplace_chat_templates * result = nullptr;
    guarded([&] {
        const std::string source = template_source == nullptr ? "" : template_source;
        if (model == nullptr && source.empty()) {
            throw bad_input("give a model or a template's source");
        }
        auto templates = common_chat_templates_init(model, source, bos_token == nullptr ? "" : bos_token,
                                                    eos_token == nullptr ? "" : eos_token);
        result = new llmplace_chat_templates{std::move(templates)};
        return 0;
    }, err, err_size);
    return result;
}

extern "C" void llmplace_chat_templates_free(struct llmplace_chat_templates * templates) {
    delete templates;
}

extern "C" int llmplace_chat_templates_apply(const struct llmplace_chat_templates * templates,
                                             const char * inputs_json, char ** out, char * err, size_t err_size) {
    if (out != nullptr) {
        *out = nullptr;
    }
    return guarded([&] {
        if (templates == nullptr || out == nullptr) {
            throw bad_input("no templates or no output pointer given");
        }
        const common_json request = parse_input(inputs_json, "the chat inputs");
        if (!request.is_object()) {
            throw bad_input("the chat inputs must be a JSON object");
        }
        common_chat_templates_inputs inputs;
        inputs.messages = common_chat_msgs_parse_oaicompat(request.value("messages", common_json::array()));
        inputs.tools = common_chat_tools_parse_oaicompat(request.value("tools", common_json()));
        try {
            inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(field<std::string>(request, "tool_choice", "auto"));
        } catch (const std::invalid_argument & e) {
            throw bad_input(std::string(e.what()) + " (use auto, required or none)");
        }
        inputs.parallel_tool_calls = field<bool>(request, "parallel_tool_calls", false);
        inputs.reasoning_format = reasoning_format_named(field<std::string>(request, "reasoning_format", "none"));
        inputs.enable_thinking = field<bool>(request, "enable_thinking", true);
        inputs.add_generation_prompt = field<bool>(request, "add_generation_prompt", true);
        if (request.contains("json_schema") && !request.at("json_schema").is_null()) {
            inputs.json_schema = request.at("json_schema").dump();
        }
        if (request.contains("chat_template_kwargs") && !request.at("chat_template_kwargs").is_null()) {
            const common_json & kwargs = request.at("chat_template_kwargs");
            if (!kwargs.is_object()) {
                throw bad_input("chat_template_kwargs must be a JSON object");
            }
            for (const auto & entry : kwargs.items()) {
                inputs.chat_template_kwargs[entry.key()] = entry.value().dump();  // common/chat parses each value
            }
        }

        const common_chat_params params = common_chat_templates_apply(templates->templates.get(), inputs);

        common_json triggers = common_json::array();
        for (const auto & trigger : params.grammar_triggers) {
            triggers.push_back({{"type", trigger_type_name(trigger.type)}, {"value", trigger.value},
                                {"token", (int64_t) trigger.token}});
        }
        common_json caps = common_json::object();
        for (const auto & [name, value] : common_chat_templates_get_caps(templates->templates.get())) {
            caps[name] = value;
        }
        common_json result = common_json::object();
        result["prompt"] = params.prompt;
        result["format"] = (int64_t) params.format;
        result["format_name"] = common_chat_format_name(params.format);
        result["grammar"] = params.grammar;
        result["grammar_lazy"] = params.grammar_lazy;
        result["grammar_triggers"] = triggers;
        result["preserved_tokens"] = params.preserved_tokens;
        result["additional_stops"] = params.additional_stops;
        result["generation_prompt"] = params.generation_prompt;
        result["parser"] = params.parser;
        result["supports_thinking"] = params.supports_thinking;
        result["thinking_start_tag"] = params.thinking_start_tag;
        result["thinking_end_tags"] = params.thinking_end_tags;
        result["caps"] = caps;
        result["supports_enable_thinking"] = common_chat_templates_support_enable_thinking(templates->templates.get());
        *out = malloc_copy(result.dump());
        return 0;
    }, err, err_size);
}

extern "C" struct llmplace_chat_parser * llmplace_chat_parser_new(const char * params_json, char * err,
                                                                size_t err_size) {
    llmplace_chat_parser * result = nullptr;
    guarded([&] {
        const common_json request = parse_input(params_json, "the parser parameters");
        if (!request.is_object()) {
            throw bad_input("the parser parameters must be a JSON object");
        }
        common_chat_parser_params params;
        const int64_t format = field<long long>(request, "format", 0);
        if (format < 0 || format >= COMMON_CHAT_FORMAT_COUNT) {
            throw bad_input("unknown chat format number " + std::to_string(format));
        }
        params.format = (common_chat_format) format;
        params.reasoning_format = reasoning_format_named(field<std::string>(request, "reasoning_format", "none"));
        params.reasoning_in_content = field<bool>(request, "reasoning_in_content", false);
        params.generation_prompt = field<std::string>(request, "generation_prompt", "");
        params.parse_tool_calls = field<bool>(request, "parse_tool_calls", true);
        const std::string parser = field<std::string>(request, "parser", "");
        if (!parser.empty()) {
            params.parser.load(parser);  // the serialized PEG parser that common_chat_templates_apply built
        }
        result = new llmplace_chat_parser{std::move(params)};
        return 0;
    }, err, err_size);
    return result;
}

extern "C" void llmplace_chat_parser_free(struct llmplace_chat_parser * parser) {
    delete parser;
}

extern "C" int llmplace_chat_parser_parse(const struct llmplace_chat_parser * parser, const char * text,
                                          size_t text_len, int is_partial, char ** out, char * err,
                                          size_t err_size) {
    if (out != nullptr) {
        *out = nullptr;
    }
    return guarded([&] {
        if (parser == nullptr || out == nullptr || (text == nullptr && text_len > 0)) {
            throw bad_input("no parser, text or output pointer given");
        }
        const std::string input = text == nullptr ? std::string() : std::string(text, text_len);
        const common_chat_msg msg = common_chat_parse(input, is_partial != 0, parser->params);
        common_json calls = common_json::array();
        for (const auto & call : msg.tool_calls) {
            calls.push_back({{"name", call.name}, {"arguments", call.arguments}, {"id", call.id}});
        }
        common_json result = common_json::object();
        result["content"] = msg.content;
        result["reasoning_content"] = msg.reasoning_content;
        result["tool_calls"] = calls;
        *out = malloc_copy(result.dump());
        return 0;
    }, err, err_size);
}

extern "C" int32_t llmplace_mtmd_memory_usage(const char * path, bool use_gpu, void * device, int32_t n_threads,
                                              int32_t max, void ** devices, size_t * bytes) {
    try {
        mtmd_context_params params = mtmd_context_params_default();
        params.use_gpu = use_gpu;
        params.device = static_cast<ggml_backend_dev_t>(device);
        params.n_threads = n_threads;
        params.print_timings = false;
        params.warmup = true;  // in a dry run this only reserves the compute buffers (what sizes them here)
        // an empty map is also what it returns for a file it could not read (it logs why)
        const std::map<ggml_backend_dev_t, size_t> usage = mtmd_get_memory_usage(path, params);
        if (usage.empty()) {
            return -1;
        }
        int32_t i = 0;
        for (const auto & [device, size] : usage) {
            if (i < max) {
                devices[i] = device;
                bytes[i] = size;
            }
            i++;
        }
        return i;
    } catch (...) {
        return -1;
    }
}

extern "C" void llmplace_string_free(char * text) {
    std::free(text);
}
