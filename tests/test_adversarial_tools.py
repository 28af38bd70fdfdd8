"""Bad tool-calling input (issue 16 item 5): tool schemas the grammar builder refuses, tool calls the parser cannot
read, malformed tools / tool_choice / reasoning_format values and conversations whose tool turns do not fit
together. Each class is tried in every surface that takes it (chat_tools' ChatTemplates and parsers, the drop-in's
create_chat_completion, Chat) in isolated processes (tests/adversarial.py): every case must end as a typed
LlmplaceError naming what was wrong, never a crash, a hang or an untyped exception. The server's 400 answers
are in test_chat_tools.py (its server fixture)."""

from __future__ import annotations

from adversarial import outcomes, summary

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}


def tool(parameters, name: str = "f") -> str:
    """Source of a tools list with one function of these parameters."""
    return f"[{{'type': 'function', 'function': {{'name': {name!r}, 'parameters': {parameters}}}}}]"


# A tool's parameters schema: what the grammar builder refuses, or what could exhaust it.
SCHEMAS = {
    "unknown_type": "{'type': 'nonsense'}",
    "type_not_a_string": "{'type': 5}",
    "dangling_ref": "{'type': 'object', 'properties': {'a': {'$ref': '#/$defs/missing'}}}",
    "remote_ref": "{'type': 'object', 'properties': {'a': {'$ref': 'https://example.invalid/s.json'}}}",
    "ref_not_a_string": "{'type': 'object', 'properties': {'a': {'$ref': 7}}}",
    "recursive_ref_to_root": "{'type': 'object', 'properties': {'child': {'$ref': '#'}}}",
    "mutually_recursive_defs": "{'$defs': {'a': {'$ref': '#/$defs/b'}, 'b': {'$ref': '#/$defs/a'}}, "
                               "'type': 'object', 'properties': {'x': {'$ref': '#/$defs/a'}}}",
    "self_referencing_def": "{'$defs': {'a': {'$ref': '#/$defs/a'}}, 'type': 'object', "
                            "'properties': {'x': {'$ref': '#/$defs/a'}}}",
    "bad_pattern": "{'type': 'object', 'properties': {'a': {'type': 'string', 'pattern': '(unclosed'}}}",
    "lookbehind_pattern": "{'type': 'object', 'properties': {'a': {'type': 'string', 'pattern': '(?<=x)y'}}}",
    "negative_min_length": "{'type': 'object', 'properties': {'a': {'type': 'string', 'minLength': -3}}}",
    "huge_max_items": "{'type': 'object', 'properties': {'a': {'type': 'array', 'maxItems': 10**12}}}",
    # (llama.cpp's grammar parser allocated without end for these: the process hung, then was killed)
    "min_above_max_items": "{'type': 'object', 'properties': {'a': {'type': 'array', 'minItems': 5, "
                           "'maxItems': 2}}}",
    "min_above_max_length": "{'type': 'object', 'properties': {'a': {'type': 'string', 'minLength': 9, "
                            "'maxLength': 1}}}",
    "enum_not_a_list": "{'type': 'object', 'properties': {'a': {'enum': 'abc'}}}",
    "properties_not_a_dict": "{'type': 'object', 'properties': ['a', 'b']}",
    "required_not_a_list": "{'type': 'object', 'properties': {'a': {}}, 'required': 'a'}",
    "deep_200": "deep(200)",
    "deep_100k": "deep(100000)",
    "wide_anyof_5000": "{'anyOf': [{'const': i} for i in range(5000)]}",
    "self_containing_dict": "self_containing()",
    "parameters_a_list": "['a']",
    "parameters_a_string": "'object'",
    "parameters_a_number": "5",
    "not_json_serializable": "{'type': 'object', 'default': object()}",
}

# Malformed tools lists (the function and its name), tool_choice and reasoning_format values.
TOOLS = {
    "tools_a_dict": "{'type': 'function'}",
    "tools_a_string": "'get_weather'",
    "tool_not_a_dict": "['get_weather']",
    "tool_wrong_type": "[{'type': 'retrieval', 'function': {'name': 'f'}}]",
    "tool_without_function": "[{'type': 'function'}]",
    "function_not_a_dict": "[{'type': 'function', 'function': 'f'}]",
    "name_missing": "[{'type': 'function', 'function': {'parameters': {}}}]",
    "name_empty": tool("{}", name=""),
    "name_a_number": "[{'type': 'function', 'function': {'name': 5}}]",
    "name_with_space": tool("{}", name="get weather"),
    "name_with_quote": tool("{}", name='get"weather'),
    "name_with_newline": tool("{}", name="get\nweather"),
    "name_with_tag": tool("{}", name="</tool_call>"),
    "name_with_nul": tool("{}", name="get\x00weather"),
    "name_non_ascii": tool("{}", name="météo"),
    "name_too_long": tool("{}", name="f" * 65),
    "names_duplicated": "[WEATHER, WEATHER]",
    "description_a_number": "[{'type': 'function', 'function': {'name': 'f', 'description': 5}}]",
}
TOOL_CHOICES = {
    "choice_unknown_word": "'sometimes'",
    "choice_a_number": "5",
    "choice_a_list": "['auto']",
    "choice_without_function": "{'type': 'function'}",
    "choice_name_a_number": "{'type': 'function', 'function': {'name': 5}}",
    "choice_missing_function": "{'type': 'function', 'function': {'name': 'nope'}}",
}
REASONING = {
    "reasoning_unknown": "'sideways'",
    "reasoning_a_number": "3",
    "reasoning_upper_case": "'AUTO'",
}

# Conversations whose tool turns do not fit together.
CALL = "{'id': 'call_1', 'type': 'function', 'function': {'name': 'get_weather', 'arguments': '{\"city\": \"P\"}'}}"
MESSAGES = {
    "tool_result_without_call": "[USER, {'role': 'tool', 'tool_call_id': 'call_1', 'content': 'Sunny'}]",
    "tool_result_first": "[{'role': 'tool', 'content': 'Sunny'}, USER]",
    "tool_result_after_user": f"[USER, {{'role': 'assistant', 'content': None, 'tool_calls': [{CALL}]}}, USER, "
                              "{'role': 'tool', 'tool_call_id': 'call_1', 'content': 'Sunny'}]",
    "tool_result_unknown_id": f"[USER, {{'role': 'assistant', 'content': None, 'tool_calls': [{CALL}]}}, "
                              "{'role': 'tool', 'tool_call_id': 'call_9', 'content': 'Sunny'}]",
    "tool_call_id_a_number": f"[USER, {{'role': 'assistant', 'content': None, 'tool_calls': [{CALL}]}}, "
                             "{'role': 'tool', 'tool_call_id': 1, 'content': 'Sunny'}]",
    "tool_calls_not_a_list": "[USER, {'role': 'assistant', 'content': None, 'tool_calls': 'get_weather'}]",
    "tool_call_without_function": "[USER, {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c'}]}]",
    "tool_call_arguments_a_number": "[USER, {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c', "
                                    "'type': 'function', 'function': {'name': 'f', 'arguments': 5}}]}]",
    "tool_call_arguments_not_json": "[USER, {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c', "
                                    "'type': 'function', 'function': {'name': 'f', 'arguments': '{'}}]}]",
    "tool_calls_on_a_user_message": f"[{{'role': 'user', 'content': 'Hi', 'tool_calls': [{CALL}]}}]",
    "lone_surrogate_in_content": "[{'role': 'user', 'content': 'Hi \\udcff'}]",
    "lone_surrogate_in_arguments": "[USER, {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c', "
                                   "'type': 'function', 'function': {'name': 'f', 'arguments': '{\\udcff'}}]}]",
}

# Replies the parser for a Hermes-style template (Qwen 2.5's) cannot read as content and tool calls.
REPLIES = {
    "unknown_function": '<tool_call>\n{"name": "no_such_tool", "arguments": {}}\n</tool_call>',
    "arguments_not_json": '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>',
    "no_name": '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',
    "not_json_at_all": "<tool_call>\nget_weather(city=Paris)\n</tool_call>",
    "unclosed_call": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "arguments_wrong_type": '<tool_call>\n{"name": "get_weather", "arguments": {"city": 5}}\n</tool_call>',
    # (source, not text: written out they would not fit a command line)
    "deep_arguments_100k": "CALL + '[' * 100000 + ']' * 100000 + '}' + END",
    "huge_string": "CALL + '{\"city\": \"' + 'x' * 2_000_000 + '\"}}' + END",
    "invalid_utf8_replacement": '<tool_call>\n{"name": "get_weather\udcff", "arguments": {}}\n</tool_call>',
}

SETUP = """
import json
import llmplace
from llmplace.chat_tools import ChatTemplates, ToolCallGrammar
from llmplace.compat import Llama, LlamaGrammar

WEATHER = {weather!r}
TOOLS = [WEATHER]
USER = {{'role': 'user', 'content': 'What is the weather in Paris?'}}
ASK = [USER]
SOURCE = open({template!r}, encoding='utf-8').read()
TEMPLATES = ChatTemplates(template=SOURCE, eos_token='<|im_end|>')
MODEL = llmplace.load({model!r}, progress=False)

def deep(depth):
    schema = {{'type': 'string'}}
    for _ in range(depth):
        schema = {{'type': 'object', 'properties': {{'x': schema}}}}
    return schema

def self_containing():
    schema = {{'type': 'object', 'properties': {{}}}}
    schema['properties']['x'] = schema
    return schema

def render(messages=ASK, **options):
    '''Render, and build the grammar on a real vocabulary (where a refused grammar shows).'''
    rendered = TEMPLATES.render(messages, **options)
    if rendered.grammar:
        ToolCallGrammar(MODEL, rendered).close()
    return len(rendered.prompt)

CALL, END = '<tool_call>\\n{{"name": "get_weather", "arguments": ', '\\n</tool_call>'

def parse(text, partial=False):
    with TEMPLATES.render(ASK, tools=TOOLS).reply_parser() as parser:
        return parser.parse(text, partial=partial)
"""

DROP_IN_SETUP = """
LLM = Llama({model!r}, chat_format='chatml-function-calling', n_ctx=512, n_threads=1, verbose=False)

def drop_in(messages=ASK, stream=False, **options):
    reply = LLM.create_chat_completion(messages, max_tokens=2, temperature=0, stream=stream, **options)
    return list(reply) if stream else reply

CHAT = llmplace.Chat(MODEL, template=SOURCE, n_ctx=512, n_threads=1, max_tokens=2, temperature=0)

def chat(messages=None, **options):
    if messages is not None:  # a conversation given whole: checked as the Chat's history
        return CHAT.load_history(messages)
    CHAT.reset()
    return CHAT.submit('What is the weather in Paris?', **options)
"""


def _setup(smollm2_path, template_path, drop_in: bool = False) -> str:
    setup = SETUP.format(weather=WEATHER, template=str(template_path), model=str(smollm2_path))
    return setup + (DROP_IN_SETUP.format(model=str(smollm2_path)) if drop_in else "")


def _typed(results: dict, allowed_ok: frozenset = frozenset()) -> None:
    print(summary(results))
    bad = {name: r for name, r in results.items()
           if not (r.kind == "typed" or (r.kind == "ok" and name.split(":")[-1] in allowed_ok))}
    assert not bad, summary(bad)


# Schemas llama.cpp's converter turns into a grammar (recursion through $ref is a recursive rule, a wide anyOf a
# long alternation): a call may be refused for them, or work, but never crash.
MAY_WORK = frozenset({"recursive_ref_to_root", "lookbehind_pattern", "bad_pattern", "huge_max_items",
                      "wide_anyof_5000", "negative_min_length", "enum_not_a_list", "required_not_a_list",
                      "properties_not_a_dict", "deep_200", "mutually_recursive_defs", "self_referencing_def"})


def test_bad_tools_schemas_choices_and_reasoning_formats_are_typed_errors(smollm2_path, pinned_templates):
    cases = {}
    for name, source in SCHEMAS.items():
        for choice in ("auto", "required"):
            cases[f"{choice}:{name}"] = f"render(tools={tool(source)}, tool_choice={choice!r})"
    for name, source in TOOLS.items():
        cases[name] = f"render(tools={source})"
    for name, source in TOOL_CHOICES.items():
        cases[name] = f"render(tools=TOOLS, tool_choice={source})"
    cases["choice_named_without_tools"] = "render(tool_choice={'type': 'function', 'function': {'name': 'f'}})"
    for name, source in REASONING.items():
        cases[name] = f"render(reasoning_format={source})"
    for name, source in MESSAGES.items():
        cases[name] = f"render({source}, tools=TOOLS)"
    cases["messages_not_a_list"] = "render('hello')"
    results = outcomes(_setup(smollm2_path, pinned_templates["Qwen-Qwen2.5-7B-Instruct"]), cases, timeout=300)
    _typed(results, MAY_WORK)
    # what the typed errors say: the reason, not only that something failed
    assert results["required:unknown_type"].error == "ToolSchemaError"
    assert results["required:min_above_max_items"].error == "ToolSchemaError"
    assert "nonsense" in results["required:unknown_type"].message
    assert results["auto:deep_100k"].error == "ToolSchemaError" and "deeper" in results["auto:deep_100k"].message
    assert results["auto:parameters_a_list"].error == "ToolSchemaError"
    assert "function name" in results["name_with_quote"].message
    assert "Tool choice 'nope' not found" in results["choice_missing_function"].message
    assert "answers no tool call" in results["tool_result_without_call"].message
    assert "call_9" in results["tool_result_unknown_id"].message
    assert "arguments as JSON" in results["tool_call_arguments_not_json"].message


def test_replies_the_parser_cannot_read_are_typed_errors(smollm2_path, pinned_templates):
    cases = {}
    for name, text in REPLIES.items():
        source = text if name in ("deep_arguments_100k", "huge_string") else repr(text)
        cases[name] = f"parse({source})"
        cases[f"partial:{name}"] = f"parse({source}, partial=True)"
    results = outcomes(_setup(smollm2_path, pinned_templates["Qwen-Qwen2.5-7B-Instruct"]), cases, timeout=300)
    # A partial reply may be read as far as it goes (that is what streaming does); an unclosed call is a call
    # still being written. Whole replies the format does not allow must be refused.
    # The parser reads a call's arguments as JSON, not against the schema (the grammar enforces that while the
    # model writes), so {"city": 5} is a call.
    partial_ok = frozenset(REPLIES) | {"unclosed_call", "arguments_wrong_type"}
    _typed(results, partial_ok)
    for name in ("unknown_function", "arguments_not_json", "no_name", "not_json_at_all", "deep_arguments_100k"):
        assert results[name].error == "ToolCallParseError", summary(results)
    assert results["invalid_utf8_replacement"].error == "InvalidParameterError"


def test_the_drop_in_and_chat_refuse_the_same_input_with_typed_errors(smollm2_path, pinned_templates):
    cases = {}
    picks = {"schema_unknown_type": tool(SCHEMAS["unknown_type"]), "schema_deep": tool("deep(100000)"),
             "schema_dangling_ref": tool(SCHEMAS["dangling_ref"]), "schema_a_list": tool("['a']"),
             "schema_self_containing": tool("self_containing()"),
             "name_with_quote": TOOLS["name_with_quote"], "tools_a_dict": TOOLS["tools_a_dict"],
             "names_duplicated": TOOLS["names_duplicated"]}
    for surface in ("drop_in", "chat"):
        for name, source in picks.items():
            cases[f"{surface}:{name}"] = f"{surface}(tools={source}, tool_choice='required')"
        for name, source in TOOL_CHOICES.items():
            cases[f"{surface}:{name}"] = f"{surface}(tools=TOOLS, tool_choice={source})"
        for name, source in REASONING.items():
            cases[f"{surface}:{name}"] = f"{surface}(reasoning_format={source})"
        for name, source in MESSAGES.items():
            if surface == "chat" and name == "lone_surrogate_in_content":
                continue  # a plain history: rendered by the Chat's own template, not the chat layer
            cases[f"{surface}:{name}"] = f"{surface}({source}, tools=TOOLS)"
    cases["drop_in:stream_schema_unknown_type"] = f"drop_in(tools={picks['schema_unknown_type']}, " \
                                                  "tool_choice='required', stream=True)"
    cases["chat:budget_negative"] = "chat(reasoning_budget=-1)"
    cases["chat:enable_thinking_a_string"] = "chat(enable_thinking='no')"
    cases["chat:tool_result_unknown_call"] = "CHAT.add_tool_result('call_1', 'Sunny')"
    cases["chat:submit_without_text"] = "CHAT.submit()"
    cases["drop_in:budget_negative"] = "drop_in(reasoning_budget_tokens=-5)"
    # the same reversed repetition through the drop-in's own grammars
    cases["drop_in:response_format_min_above_max"] = (
        "drop_in(response_format={'type': 'json_object', 'schema': {'type': 'array', 'minItems': 5, 'maxItems': 2}})")
    cases["llama_grammar_reversed_bounds"] = "LlamaGrammar.from_string('root ::= \"a\"{5,2}')"
    results = outcomes(_setup(smollm2_path, pinned_templates["Qwen-Qwen2.5-7B-Instruct"], drop_in=True), cases,
                       timeout=400)
    _typed(results)
    for surface in ("drop_in", "chat"):
        assert results[f"{surface}:schema_unknown_type"].error == "ToolSchemaError"
        assert "Tool choice 'nope' not found" in results[f"{surface}:choice_missing_function"].message
        assert "reasoning_format" in results[f"{surface}:reasoning_unknown"].message
        assert "answers no tool call" in results[f"{surface}:tool_result_without_call"].message
