"""Parameters that reached a GGML_ASSERT, a C++ throw or a cffi OverflowError (issue 17, class 2). Every case
runs isolated (tests/adversarial.py); each must end as a typed LlmplaceError, or, for the sweeps, as a typed
error or a run that works: never a crash, a hang or an untyped exception."""

from __future__ import annotations

import math

import pytest

import llmplace
from adversarial import outcomes, summary

SETUP = """
import math
import llmplace
from llmplace import Context
from llmplace.sampling import Sampler, SamplingParams
from llmplace.compat import Llama

def run(path, **load_kwargs):
    '''Load, then decode and sample a few tokens: some bad values only fail at the first decode.'''
    context_kwargs = load_kwargs.pop("context", {})
    with llmplace.load(path, progress=False, **load_kwargs) as model:
        with Context(model, n_ctx=64, n_batch=32, n_ubatch=32, **context_kwargs) as context:
            context.decode([1, 5, 9, 3])
            return Sampler(model.n_vocab, SamplingParams(temperature=0)).sample(context)

def with_model(fn, path=None):
    with llmplace.load(path or LLAMA, progress=False) as model:
        return fn(model)
"""


def _run(results, cases):
    print(summary(results))
    kinds = {name: r.kind for name, r in results.items()}
    assert kinds == dict.fromkeys(cases, "typed"), summary(results)


def _survived(results):
    """Every case either ran or raised a typed error: no crash, hang or untyped exception."""
    print(summary(results))
    assert all(r.kind in ("typed", "ok") for r in results.values()), summary(results)


def test_kv_overrides_llama_cpp_asserts_on_are_refused(tiny_llama_path, tiny_qwen3moe_path):
    moe = "run(MOE, kv_overrides={{{}}})"
    llama = "run(LLAMA, kv_overrides={{{}}})"
    cases = {
        "expert_used_count_0": moe.format("'qwen3moe.expert_used_count': 0"),
        "expert_used_above_count": moe.format("'qwen3moe.expert_used_count': 5"),
        "expert_count_0": moe.format("'qwen3moe.expert_count': 0"),
        "expert_count_above_max": moe.format("'qwen3moe.expert_count': 1025"),
        "expert_count_huge": moe.format("'qwen3moe.expert_count': 2**40"),
        "experts_on_a_dense_model": llama.format("'llama.expert_count': 4"),
        "block_count_0": llama.format("'llama.block_count': 0"),
        "block_count_negative": llama.format("'llama.block_count': -1"),
        "block_count_above_512": llama.format("'llama.block_count': 513"),
        "rms_eps_negative": llama.format("'llama.attention.layer_norm_rms_epsilon': -1.0"),
        "rms_eps_nan": llama.format("'llama.attention.layer_norm_rms_epsilon': math.nan"),
        "rms_eps_inf": llama.format("'llama.attention.layer_norm_rms_epsilon': math.inf"),
        "rope_scaling_unknown": llama.format("'llama.rope.scaling.type': 'sideways'"),
        "head_count_0": llama.format("'llama.attention.head_count': 0"),
        "head_count_kv_0": llama.format("'llama.attention.head_count_kv': 0"),
        "embedding_length_0": llama.format("'llama.embedding_length': 0"),
        "context_length_negative": llama.format("'llama.context_length': -5"),
        "architecture_changed": llama.format("'general.architecture': 'qwen3moe'"),
        "tokenizer_model_changed": llama.format("'tokenizer.ggml.model': 'llama'"),
        "expert_groups_on_dense": llama.format("'llama.expert_group_count': 2"),
        "not_a_dict": "run(LLAMA, kv_overrides=[('llama.block_count', 2)])",
        "key_too_long": llama.format("'x' * 200: 1"),
        "value_too_big": llama.format("'llama.block_count': 2**64"),
    }
    setup = SETUP + f"LLAMA, MOE = {str(tiny_llama_path)!r}, {str(tiny_qwen3moe_path)!r}\n"
    _run(outcomes(setup, cases, timeout=180), cases)


def test_every_integer_key_overridden_with_edge_values_never_crashes(tiny_qwen3moe_path):
    # the same class for keys nobody listed: each integer key of a MoE model at 0, 1, 2 and the edges of uint32
    from llmplace.gguf_info import read

    metadata = read(tiny_qwen3moe_path).metadata
    keys = [k for k, v in metadata.items() if isinstance(v, int) and not isinstance(v, bool)
            and not k.startswith("general.")]
    cases = {f"{key}={value}": f"run(MOE, kv_overrides={{{key!r}: {value}}})"
             for key in keys for value in (0, 1, 2, 2**31 - 1, 2**32 - 1)}
    _survived(outcomes(SETUP + f"MOE = {str(tiny_qwen3moe_path)!r}\n", cases, timeout=240))


def test_context_and_load_values_that_aborted_or_overflowed_are_refused(tiny_llama_path):
    cases = {
        "vocab_only_gpu_layers_0": "run(LLAMA, vocab_only=True, n_gpu_layers=0)",
        "vocab_only_context": "run(LLAMA, vocab_only=True)",
        "pooling_type_99": "run(LLAMA, context=dict(extra_params={'pooling_type': 99}))",
        "flash_attn_type_7": "run(LLAMA, context=dict(extra_params={'flash_attn_type': 7}))",
        "rope_scaling_type_42": "run(LLAMA, context=dict(extra_params={'rope_scaling_type': 42}))",
        "attention_type_minus_5": "run(LLAMA, context=dict(extra_params={'attention_type': -5}))",
        "type_k_99_extra": "run(LLAMA, context=dict(extra_params={'type_k': 99}))",
        "n_outputs_max_1": "run(LLAMA, context=dict(extra_params={'n_outputs_max': 1}))",
        "abort_callback_extra": "run(LLAMA, context=dict(extra_params={'abort_callback': 0}))",
        "unknown_field": "run(LLAMA, context=dict(extra_params={'no_such_field': 1}))",
        "yarn_orig_ctx_huge": "run(LLAMA, context=dict(extra_params={'yarn_orig_ctx': 2**40}))",
        "rope_freq_base_nan": "run(LLAMA, context=dict(extra_params={'rope_freq_base': math.nan}))",
        "embeddings_string": "run(LLAMA, context=dict(extra_params={'embeddings': 'yes'}))",
        "extra_params_list": "run(LLAMA, context=dict(extra_params=[1, 2]))",
        "non_causal_small_ubatch": "with_model(lambda m: Context(m, n_ctx=64, n_batch=32, n_ubatch=4, "
                                   "extra_params={'attention_type': 1}).decode(list(range(1, 20))))",
        "n_seq_max_100000": "run(LLAMA, context=dict(n_seq_max=100000))",
        "type_k_99": "run(LLAMA, context=dict(type_k=99))",
        "n_ctx_2_32": "with_model(lambda m: Context(m, n_ctx=2**32))",
        "n_threads_huge": "run(LLAMA, context=dict(n_threads=10**30))",
        "main_gpu_10_30": "run(LLAMA, main_gpu=10**30)",
        "n_gpu_layers_2_31": "run(LLAMA, n_gpu_layers=2**31)",
        "n_gpu_layers_float": "run(LLAMA, n_gpu_layers=1.5)",
        "penalty_last_n_2_31": "SamplingParams(penalty_last_n=2**31)",
        "penalty_last_n_near_2_31": "SamplingParams(penalty_last_n=2**31 - 2, repeat_penalty=1.1)",
        "top_k_2_31": "SamplingParams(top_k=2**31)",
        "logit_bias_key_2_40": "SamplingParams(logit_bias={2**40: 1.0})",
        "logit_bias_not_dict": "SamplingParams(logit_bias=[1, 2])",
        "is_control_far": "with_model(lambda m: m.vocab.is_control(10**9))",
        "is_control_negative": "with_model(lambda m: m.vocab.is_control(-7))",
        "is_control_2_40": "with_model(lambda m: m.vocab.is_control(2**40))",
        "is_eog_far": "with_model(lambda m: m.vocab.is_eog(2**31 - 1))",
        "is_eog_negative": "with_model(lambda m: m.vocab.is_eog(-2**31))",
        "piece_far": "with_model(lambda m: m.vocab.piece(10**12))",
        "token_text_float": "with_model(lambda m: m.vocab.token_text(3.0))",
        "sampler_accept_far": "with_model(lambda m: Sampler(m.n_vocab).accept(2**35))",
        "decode_huge_token": "with_model(lambda m: Context(m, n_ctx=64).decode([2**40]))",
        "decode_one_huge_token": "with_model(lambda m: Context(m, n_ctx=64).decode_one(2**40))",
        "decode_all_huge_token": "with_model(lambda m: Context(m, n_ctx=64).decode_all([1, 2**40]))",
        "logits_index_huge": "with_model(lambda m: Context(m, n_ctx=64).logits(2**40))",
        "truncate_huge": "with_model(lambda m: Context(m, n_ctx=64).truncate(2**40))",
        # the llama-cpp-python drop-in passes its keywords through to the same checks
        "compat_pooling_99": "Llama(LLAMA, pooling_type=99, verbose=False)",
        "compat_rope_scaling_7": "Llama(LLAMA, rope_scaling_type=7, verbose=False)",
        "compat_attention_type_9": "Llama(LLAMA, attention_type=9, verbose=False)",
        "compat_type_k_99": "Llama(LLAMA, type_k=99, verbose=False)",
        "compat_n_gpu_layers_2_31": "Llama(LLAMA, n_gpu_layers=2**31, verbose=False)",
        "compat_main_gpu_10_30": "Llama(LLAMA, main_gpu=10**30, verbose=False)",
        "compat_n_ctx_2_33": "Llama(LLAMA, n_ctx=2**33, verbose=False)",
        "compat_yarn_orig_ctx_negative": "Llama(LLAMA, yarn_orig_ctx=-1, verbose=False)",
        "compat_last_n_2_31": "Llama(LLAMA, n_ctx=64, last_n_tokens_size=2**31, verbose=False)"
                              ".create_completion('hi', max_tokens=2, repeat_penalty=1.1)",
        "compat_kv_overrides": "Llama(LLAMA, kv_overrides={'llama.block_count': 0}, verbose=False)",
    }
    _run(outcomes(SETUP + f"LLAMA = {str(tiny_llama_path)!r}\n", cases, timeout=180), cases)


def test_every_enum_value_of_extra_params_runs_or_is_refused(tiny_llama_path):
    # valid enumerators must not abort either (e.g. rank pooling on a model without a classifier head)
    from llmplace._ffi import ffi

    fields = dict(ffi.typeof("struct llama_context_params").fields)
    cases = {}
    for name in ("pooling_type", "attention_type", "rope_scaling_type"):
        for value in fields[name].type.elements:
            for embeddings in (False, True):
                cases[f"{name}={value},embeddings={embeddings}"] = (
                    f"run(LLAMA, context=dict(extra_params={{{name!r}: {value}, 'embeddings': {embeddings}}}))")
    _survived(outcomes(SETUP + f"LLAMA = {str(tiny_llama_path)!r}\n", cases, timeout=180))


def test_deep_grammars_and_schemas_are_refused(tiny_llama_path):
    cases = {
        "grammar_parens_100k": "GrammarConstraint(VOCAB_MODEL, 'root ::= ' + '(' * 100000 + '\"a\"' + ')' * 100000)",
        "grammar_parens_300k_llamagrammar": "LlamaGrammar.from_string("
                                            "'root ::= ' + '(' * 300000 + '\"a\"' + ')' * 300000)",
        "grammar_rule_chain_100k": "GrammarConstraint(VOCAB_MODEL, 'root ::= r0\\n' + ''.join("
                                   "f'r{i} ::= r{i + 1}\\n' for i in range(100000)) + 'r100000 ::= \"a\"\\n')",
        "grammar_nul": "GrammarConstraint(VOCAB_MODEL, 'root ::= \"a\"\\x00junk')",
        "schema_text_100k": "json_schema_to_gbnf('{\"type\":\"array\",\"items\":' * 100000 + '{}' + '}' * 100000)",
        "schema_text_300k_brackets": "json_schema_to_gbnf('[' * 300000 + ']' * 300000)",
        "schema_dict_100k": "json_schema_to_gbnf(nested_dict(100000))",
        "schema_from_json_schema_1000": "LlamaGrammar.from_json_schema("
                                        "'{\"type\":\"array\",\"items\":' * 1000 + '{}' + '}' * 1000)",
        "schema_self_containing_dict": "json_schema_to_gbnf(self_containing())",
    }
    setup = SETUP + f"""
from llmplace.compat.llama_grammar import GrammarConstraint, LlamaGrammar, json_schema_to_gbnf
VOCAB_MODEL = llmplace.load({str(tiny_llama_path)!r}, progress=False)

def nested_dict(depth):
    schema = {{"type": "string"}}
    for _ in range(depth):
        schema = {{"type": "array", "items": schema}}
    return schema

def self_containing():
    schema = {{"type": "array"}}
    schema["items"] = schema
    return schema
"""
    _run(outcomes(setup, cases, timeout=180), cases)


def test_grammars_that_allow_no_output_are_refused_not_aborted(smollm2_path):
    """A grammar no text can match (an empty character range, a token outside the vocabulary, integer bounds
    with no integer between them): llama.cpp's grammar sampler throws from accept once nothing may follow, which
    through its C API ended the process (one HTTP request could end `llmplace serve`); at temperature 0 the
    draw was an empty "stop" instead, a forced tool call with '' as its arguments. Every path that draws under a
    grammar must refuse it: the drop-in (GBNF, response_format, forced tools), the engine, both temperatures."""
    no_int = {"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 6}
    cases = {}
    for temperature in (0.8, 0):
        for name, grammar in (("empty_range", "root ::= [z-a]"), ("after_one_token", 'root ::= "a" [z-a]'),
                              ("token_outside_vocab", "root ::= <[999999]>")):
            cases[f"{name}_t{temperature}"] = f"LLM('x', grammar={grammar!r}, max_tokens=8, temperature={temperature})"
        cases[f"response_format_t{temperature}"] = (
            f"LLM.create_chat_completion(ASK, max_tokens=8, temperature={temperature}, response_format="
            f"{{'type': 'json_schema', 'json_schema': {{'name': 'x', 'schema': {no_int!r}}}}})")
        cases[f"forced_tool_t{temperature}"] = (
            f"LLM.create_chat_completion(ASK, max_tokens=8, temperature={temperature}, tools=[{{'type': 'function', "
            f"'function': {{'name': 'f', 'parameters': {no_int!r}}}}}], "
            "tool_choice={'type': 'function', 'function': {'name': 'f'}})")
        cases[f"engine_t{temperature}"] = (
            f"ENGINE.submit('x', grammar='root ::= [z-a]', max_tokens=8, temperature={temperature}).result(60)")
    # the engine ended only that request: the next one is served
    cases["engine_after"] = "ENGINE.submit('The capital of France is', max_tokens=3, temperature=0).result(60).text"
    cases["drop_in_after"] = "LLM('The capital of France is', max_tokens=3, temperature=0)['choices'][0]['text']"
    setup = SETUP + f"""
LLM = Llama({str(smollm2_path)!r}, n_ctx=256, n_threads=1, verbose=False)
ENGINE = llmplace.Engine(llmplace.load({str(smollm2_path)!r}, progress=False), slots=1, n_ctx=256, n_threads=1)
ASK = [{{"role": "user", "content": "weather?"}}]
"""
    results = outcomes(setup, cases, timeout=240)
    print(summary(results))
    after = {"engine_after", "drop_in_after"}
    assert {name: r.kind for name, r in results.items() if name not in after} == dict.fromkeys(set(cases) - after,
                                                                                              "typed")
    assert all("allows no text" in r.message for name, r in results.items() if name not in after)
    assert [results[name].kind for name in sorted(after)] == ["ok", "ok"], summary(results)


def test_combinations_llama_cpp_asserts_on_are_refused(tiny_llama_path):
    """Each value in range, the combination not: more sequences than llama.cpp reserves outputs for, and a draw
    from an output without logits, ended the process in a GGML_ASSERT."""
    cases = {
        "n_seq_max_above_n_batch": "with_model(lambda m: Context(m, n_ctx=512, n_batch=4, n_seq_max=8, n_threads=1)"
                                   ".decode([1, 2]))",
        "n_seq_max_above_n_ctx": "with_model(lambda m: Context(m, n_ctx=64, n_seq_max=65, n_threads=1).decode([1]))",
        "sample_a_fresh_context": "with_model(lambda m: Sampler(m.n_vocab, SamplingParams(temperature=0))"
                                  ".sample(Context(m, n_ctx=64, n_threads=1)))",
        "sample_an_output_not_computed": "with_model(lambda m: sample_after_decode(m, 5))",
        "sample_a_negative_output_not_computed": "with_model(lambda m: sample_after_decode(m, -2))",
    }
    setup = SETUP + f"""
LLAMA = {str(tiny_llama_path)!r}

def with_model(fn, path=None):
    with llmplace.load(path or LLAMA, progress=False) as model:
        return fn(model)

def sample_after_decode(model, index):
    context = Context(model, n_ctx=64, n_threads=1)
    context.decode([1, 5, 9])
    return Sampler(model.n_vocab, SamplingParams(temperature=0)).sample(context, index)
"""
    _run(outcomes(setup, cases, timeout=120), cases)


def test_an_interrupt_raised_by_one_requests_processor_ends_that_request_only(smollm2):
    def interrupting(ids, scores):
        raise KeyboardInterrupt

    with llmplace.Engine(smollm2, slots=2, n_ctx=512, n_threads=1) as engine:
        other = engine.submit("The capital of France is", max_tokens=6, temperature=0)
        with pytest.raises(KeyboardInterrupt):
            engine.submit("Hi", max_tokens=4, logits_processor=interrupting).result(60)
        assert other.result(60).finish_reason == "length" and not engine.closed
        assert engine.submit("Hi", max_tokens=2, temperature=0).result(60).finish_reason == "length"


def test_stop_and_logit_bias_forms_are_read_or_refused_at_the_call(smollm2):
    # stop=None is no stop strings; bytes and ints failed inside the matcher; +inf bias became NaN logits
    alone = llmplace.generate(smollm2, "Hi", max_tokens=3, temperature=0).tokens
    assert llmplace.generate(smollm2, "Hi", max_tokens=3, temperature=0, stop=None).tokens == alone
    for stop in (b"x", [5], 5):
        with pytest.raises(llmplace.InvalidParameterError, match="stop must be"):
            llmplace.generate(smollm2, "Hi", max_tokens=3, stop=stop)
    with pytest.raises(llmplace.InvalidParameterError, match="below \\+inf"):
        llmplace.generate(smollm2, "Hi", max_tokens=3, logit_bias={30: math.inf})
    banned = llmplace.generate(smollm2, "Hi", max_tokens=3, temperature=0, logit_bias={alone[0]: -math.inf})
    assert banned.tokens[0] != alone[0]


def test_ordinary_grammars_and_schemas_still_convert():
    from llmplace.compat.llama_grammar import LlamaGrammar, json_schema_to_gbnf

    nested = '{"type":"array","items":' * 20 + '{"type":"string"}' + "}" * 20
    assert "root" in json_schema_to_gbnf(nested)
    LlamaGrammar.from_string('root ::= ' + "(" * 50 + '"a" [()]' + ")" * 50 + ' # (((( in a comment')


def test_penalty_last_n_minus_one_penalizes_the_whole_context(smollm2):
    # llama.cpp itself reads -1 as "off"; upstream documents it as the whole context
    from llmplace import Context
    from llmplace.sampling import Sampler, SamplingParams

    prompt = smollm2.tokenize("one two three four five six seven eight nine ten")
    with Context(smollm2, n_ctx=128) as context:
        context.decode(prompt)
        greedy = Sampler(smollm2.n_vocab, SamplingParams(temperature=0)).sample(context)
        penalized = Sampler(smollm2.n_vocab, SamplingParams(temperature=0, repeat_penalty=100.0,
                                                            penalty_last_n=-1))
        off = Sampler(smollm2.n_vocab, SamplingParams(temperature=0, repeat_penalty=100.0, penalty_last_n=0))
        for sampler in (penalized, off):
            for token in prompt + [greedy]:
                sampler.accept(token)
        assert off.sample(context) == greedy
        assert penalized.sample(context) not in prompt + [greedy]


@pytest.mark.parametrize("value", [0, 64, 2**24])
def test_penalty_windows_within_bounds_are_taken(value):
    from llmplace.sampling import SamplingParams

    assert SamplingParams(penalty_last_n=value, repeat_penalty=1.1).penalty_last_n == value
    assert math.isfinite(SamplingParams().temperature)
