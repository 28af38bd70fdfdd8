"""JSON schemas and forced tool calls in the llama-cpp-python layer (llmplace.compat): llama.cpp's
schema-to-grammar converter behind LlamaGrammar.from_json_schema, response_format schemas, and
tool_choice / function_call naming a function, on the real SmolLM2 at temperature 0."""

from __future__ import annotations

import json
import random

import pytest

import llmplace
from llmplace._ffi import C, ffi
from llmplace.compat import llama_chat_format
from llmplace.compat.llama_grammar import (
    GrammarConstraint,
    JsonSchemaError,
    LlamaGrammar,
    json_schema_to_gbnf,
)

COMMON = {"verbose": False, "n_threads": 1, "n_threads_batch": 1, "n_ctx": 512}

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
ASK_PERSON = [{"role": "user", "content": "Describe a person called Alice who is 30 years old, as JSON."}]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def me(smollm2_path):
    with llmplace.Llama(str(smollm2_path), **COMMON) as llm:
        yield llm


def check_person(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"name", "age"}
    assert isinstance(value["name"], str) and type(value["age"]) is int


def check_weather_arguments(arguments: str) -> dict:
    value = json.loads(arguments)
    assert {"city", "unit"} <= set(value)
    assert isinstance(value["city"], str) and value["unit"] in ("celsius", "fahrenheit")
    return value


# ---- the converter ----
SCHEMAS = [
    PERSON,
    {},
    {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
    {"enum": ["red", "green", 3, None]},
    {"anyOf": [{"type": "string", "format": "date"}, {"type": "boolean"}]},
    {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}},
     "$defs": {"node": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}}},
    {"type": "string", "pattern": "^[a-z]{2,5}$"},
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"type": "string", "minLength": 1, "maxLength": 8},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:40])
def test_converted_grammars_are_accepted_by_llama_cpp(me, schema):
    grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    assert "root ::=" in grammar._grammar
    GrammarConstraint(me._model, grammar).close()  # llama.cpp's GBNF parser takes it


def test_a_converted_grammar_constrains_a_completion(me):
    grammar = LlamaGrammar.from_json_schema(json.dumps(PERSON))
    out = me("A person as JSON:", max_tokens=48, temperature=0, grammar=grammar)
    check_person(out["choices"][0]["text"])


def test_prop_order_puts_properties_first():
    gbnf = json_schema_to_gbnf(json.dumps(PERSON), prop_order=["age"])
    root = next(line for line in gbnf.splitlines() if line.startswith("root ::="))
    assert root.index("age-kv") < root.index("name-kv")


def test_a_large_grammar_is_read_whole():
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(300)},
              "required": [f"field_{i}" for i in range(300)]}
    gbnf = json_schema_to_gbnf(schema)  # a dict is taken too
    assert len(gbnf) > 4096 and "field-299-kv" in gbnf and gbnf.endswith("\n")


@pytest.mark.parametrize("schema, reason", [
    ("{", "not JSON"),
    ('{"type": "nonsense"}', "unrecognized type nonsense"),
    ("[]", "must be an object"),
    ('{"$ref": "#/$defs/missing"}', "missing"),
    ("a\0b", "NUL"),
])
def test_a_bad_schema_raises_a_typed_value_error(schema, reason):
    with pytest.raises(JsonSchemaError, match="invalid JSON schema") as info:
        LlamaGrammar.from_json_schema(schema)
    assert isinstance(info.value, ValueError) and reason in str(info.value)


def test_the_converter_survives_garbage():
    rng = random.Random(7)
    pieces = ['{', '}', '[', ']', '"type"', ':', ',', '"object"', '"properties"', '"$ref"', '"#/x"', '"anyOf"',
              '"items"', '"pattern"', '"^(a|"', '"minimum"', '1e999', '-', 'null', '"required"', '"enum"', '\\u0000']
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        try:
            json_schema_to_gbnf(text)
        except JsonSchemaError:
            pass
    buf = ffi.new("char[]", 1)  # a buffer too small for anything: the needed length still comes back
    assert C.llmplace_json_schema_to_grammar(json.dumps(PERSON).encode(), buf, 1) > 1
    assert C.llmplace_json_schema_to_grammar(ffi.NULL, ffi.NULL, 0) < 0
    assert json_schema_to_gbnf(PERSON).startswith("age-kv")  # still working


# ---- response_format ----
@pytest.mark.parametrize("response_format", [
    {"type": "json_object", "schema": PERSON},
    {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
], ids=["json_object", "json_schema"])
def test_schema_constrained_chat_replies_validate(me, response_format):
    reply = me.create_chat_completion(ASK_PERSON, temperature=0, max_tokens=60, response_format=response_format)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    check_person(choice["message"]["content"])


def test_a_bad_response_format_schema_raises_and_the_next_call_works(me):
    for stream in (False, True):
        with pytest.raises(JsonSchemaError, match="unrecognized type"):
            me.create_chat_completion(ASK_PERSON, max_tokens=8, stream=stream,
                                      response_format={"type": "json_object", "schema": {"type": "nonsense"}})
    reply = me.create_chat_completion(ASK_PERSON, temperature=0, max_tokens=60,
                                      response_format={"type": "json_object", "schema": PERSON})
    check_person(reply["choices"][0]["message"]["content"])


# ---- forced tool calls ----
def test_a_forced_tool_call_returns_tool_calls(me):
    reply = me.create_chat_completion(ASK_WEATHER, tools=[WEATHER], tool_choice=FORCE_WEATHER, temperature=0,
                                      max_tokens=60)
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["index"] == 0
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    [call] = message["tool_calls"]
    assert set(call) == {"id", "type", "function"} and call["type"] == "function"
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert check_weather_arguments(call["function"]["arguments"])["city"] == "Paris"
    # The legacy field, as llama-cpp-python fills it alongside tool_calls.
    assert message["function_call"] == call["function"]
    assert reply["usage"]["completion_tokens"] > 0


def test_a_legacy_function_call_is_forced_too(me):
    reply = me.create_chat_completion(ASK_WEATHER, functions=[WEATHER["function"]],
                                      function_call={"name": "get_weather"}, temperature=0, max_tokens=60)
    message = reply["choices"][0]["message"]
    assert message["content"] is None and message["function_call"]["name"] == "get_weather"
    check_weather_arguments(message["function_call"]["arguments"])
    assert message["tool_calls"][0]["function"] == message["function_call"]


def test_a_streamed_forced_tool_call_joins_to_the_same_arguments(me):
    whole = me.create_chat_completion(ASK_WEATHER, tools=[WEATHER], tool_choice=FORCE_WEATHER, temperature=0,
                                      max_tokens=60)
    chunks = list(me.create_chat_completion(ASK_WEATHER, tools=[WEATHER], tool_choice=FORCE_WEATHER,
                                            temperature=0, max_tokens=60, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    first, pieces, last = chunks[0], chunks[1:-1], chunks[-1]
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert last["choices"][0]["finish_reason"] == "tool_calls"
    assert last["choices"][0]["delta"]["tool_calls"] is None
    assert pieces and all(c["choices"][0]["finish_reason"] is None for c in pieces)
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in pieces]
    assert all(len(call) == 1 and call[0]["index"] == 0 and call[0]["type"] == "function"
               and call[0]["function"]["name"] == "get_weather" for call in calls)
    assert len({call[0]["id"] for call in calls}) == 1 and calls[0][0]["id"].startswith("call_")
    arguments = "".join(call[0]["function"]["arguments"] for call in calls)
    assert arguments == whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    check_weather_arguments(arguments)


def test_a_cut_short_tool_call_says_length(me):
    reply = me.create_chat_completion(ASK_WEATHER, tools=[WEATHER], tool_choice=FORCE_WEATHER, temperature=0,
                                      max_tokens=3)
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"].startswith("{")


def test_tool_choice_errors_and_auto(me):
    with pytest.raises(ValueError, match="Tool choice 'nope' not found in tools"):
        me.create_chat_completion(ASK_WEATHER, tools=[WEATHER], max_tokens=4,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="tool_choice must be"):
        me.create_chat_completion(ASK_WEATHER, tools=[WEATHER], max_tokens=4, tool_choice={"type": "function"})
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    with pytest.raises(JsonSchemaError, match="function 'f'"):
        me.create_chat_completion(ASK_WEATHER, tools=[bad_tool], max_tokens=4,
                                  tool_choice={"type": "function", "function": {"name": "f"}})
    # "auto" forces nothing: a plain reply. And the model still works after the errors.
    reply = me.create_chat_completion(ASK_WEATHER, tools=[WEATHER], tool_choice="auto", temperature=0,
                                      max_tokens=4)
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert "tool_calls" not in reply["choices"][0]["message"]


def test_a_registered_chat_format_forces_tool_calls_too(smollm2_path):
    formatter = llama_chat_format.Jinja2ChatFormatter(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n", eos_token="<|im_end|>", bos_token="")
    with llmplace.Llama(str(smollm2_path), chat_handler=formatter.to_chat_handler(), **COMMON) as llm:
        reply = llm.create_chat_completion(ASK_WEATHER, tools=[WEATHER], tool_choice=FORCE_WEATHER,
                                           temperature=0, max_tokens=60)
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    check_weather_arguments(reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])


# ---- against llama-cpp-python 0.3.36 ----
def shape(value):
    """Keys and value types, recursively."""
    if isinstance(value, dict):
        return {key: shape(v) for key, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


@pytest.fixture(scope="module")
def up(smollm2_path):
    pytest.importorskip("llama_cpp", reason="the differential tests need llama-cpp-python 0.3.36")
    from reference import reference_llama

    llm = reference_llama(str(smollm2_path), **COMMON)
    yield llm
    llm.close()


@pytest.mark.parametrize("messages, options", [
    (ASK_WEATHER, {"tools": [WEATHER], "tool_choice": FORCE_WEATHER}),
    (ASK_WEATHER, {"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}}),
    (ASK_PERSON, {"response_format": {"type": "json_object", "schema": PERSON}}),
], ids=["tools", "functions", "schema"])
def test_same_dicts_and_json_as_llama_cpp_python(up, me, messages, options):
    """The same dict structure, whole and streamed, and the same JSON value. The texts differ in whitespace
    only: llama-cpp-python's Python converter writes a different grammar for the same schema."""
    def reply_json(reply):
        message = reply["choices"][0]["message"]
        return json.loads(message["content"] if message["content"] is not None
                          else message["tool_calls"][0]["function"]["arguments"])

    theirs = up.create_chat_completion(messages, temperature=0, max_tokens=60, **options)
    ours = me.create_chat_completion(messages, temperature=0, max_tokens=60, **options)
    assert shape(ours) == shape(theirs)
    assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"]
    assert reply_json(ours) == reply_json(theirs)
    theirs = list(up.create_chat_completion(messages, temperature=0, max_tokens=60, stream=True, **options))
    ours = list(me.create_chat_completion(messages, temperature=0, max_tokens=60, stream=True, **options))
    for i in (0, 1, -2, -1):
        assert shape(ours[i]) == shape(theirs[i])
