"""llama.cpp's chat layer (common/chat) through the shim: templates rendered with tools, the tool-call grammar and
its triggers, and replies parsed back into content, reasoning_content and tool calls, for the families whose
format common/chat recognises. The family templates below are minimal ones written here from each format's
published description (how tools, calls and thinking are laid out); common/chat analyses a template by rendering
it, so these exercise the same detection as the real ones. The real templates come from the test GGUFs."""

from __future__ import annotations

import json

import pytest

import llmplace
from llmplace.chat_tools import (
    ChatTemplates,
    ReplyStream,
    ToolCallGrammar,
    ToolCallParseError,
    ToolSchemaError,
    resolve_tool_choice,
)
from llmplace.errors import InvalidParameterError, TemplateError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                       "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# Hermes 2 Pro: tools in <tools>, each call a JSON object {"name", "arguments"} inside <tool_call>...</tool_call>.
HERMES = """{%- if tools %}<|im_start|>system
You may call functions. <tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>
Answer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}{%- for m in messages -%}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{{ m.content or '' }}{% for tc in m.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Mistral Nemo: tools in [AVAILABLE_TOOLS], calls as a JSON list after [TOOL_CALLS], each with a 9-character id.
MISTRAL_NEMO = """{{ bos_token }}{%- for m in messages %}{%- if m.role == 'user' %}{%- if loop.last and tools %}\
[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}[INST]{{ m.content }}[/INST]\
{%- elif m.role == 'assistant' %}{%- if m.tool_calls %}[TOOL_CALLS][{%- for tc in m.tool_calls %}\
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}, "id": "{{ tc.id }}"}\
{%- if not loop.last %}, {% endif %}{%- endfor %}]{%- else %}{{ m.content }}{%- endif %}{{ eos_token }}\
{%- elif m.role == 'tool' %}[TOOL_RESULTS]{"content": {{ m.content | tojson }}, "call_id": "{{ m.tool_call_id }}"}\
[/TOOL_RESULTS]{%- endif %}{%- endfor %}"""

# Llama 3.x: header blocks; a call is <|python_tag|>{"name", "parameters"} ended by <|eom_id|>.
LLAMA3 = """{{ bos_token }}{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{% if m.tool_calls %}{%- for tc in m.tool_calls %}<|python_tag|>{"name": "{{ tc.function.name }}", \
"parameters": {{ tc.function.arguments | tojson }}}{%- endfor %}<|eom_id|>{% else %}{{ m.content }}<|eot_id|>\
{% endif %}{%- endfor %}{%- if tools %}<|start_header_id|>system<|end_header_id|>

Tools: {{ tools | tojson }}<|eot_id|>{%- endif %}{%- if add_generation_prompt %}<|start_header_id|>assistant\
<|end_header_id|>

{% endif %}"""

# Qwen3 (and DeepSeek R1's <think> convention): thinking in <think>...</think> before the answer, Hermes-style
# calls, and enable_thinking=false writing an empty thinking block.
QWEN3 = """{%- if tools %}<|im_start|>system
# Tools
<tools>{%- for t in tools %}
{{ t | tojson }}{%- endfor %}
</tools><|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.role == 'assistant' %}{% if m.reasoning_content %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content }}{%- if m.tool_calls %}{%- for tc in m.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{%- endfor %}{%- endif %}{% else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""

FAMILIES = {
    "hermes": (HERMES, {"eos_token": "<|im_end|>"}, "<tool_call>"),
    "mistral-nemo": (MISTRAL_NEMO, {"bos_token": "<s>", "eos_token": "</s>"}, "[TOOL_CALLS]"),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|python_tag|>"),
    "qwen3": (QWEN3, {"eos_token": "<|im_end|>"}, "<tool_call>"),
}


def call_text(family: str, calls: list[tuple[str, dict]]) -> str:
    """A reply with these calls, written as the family writes them."""
    if family == "mistral-nemo":
        return "[TOOL_CALLS][" + ", ".join(json.dumps({"name": n, "arguments": a, "id": f"call{i:05d}"})
                                           for i, (n, a) in enumerate(calls)) + "]"
    if family == "llama3":
        [(name, arguments)] = calls
        return "<|python_tag|>" + json.dumps({"name": name, "parameters": arguments})
    return "".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>\n" for n, a in calls)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    source, tokens, trigger = FAMILIES[request.param]
    with ChatTemplates(template=source, **tokens) as templates:
        yield request.param, templates, trigger


def test_each_family_renders_its_tools_and_a_lazy_grammar_starting_at_its_trigger(family):
    name, templates, trigger = family
    rendered = templates.render(ASK, tools=TOOLS)
    assert "get_weather" in rendered.prompt and "get_time" in rendered.prompt
    assert rendered.caps["supports_tool_calls"]
    assert rendered.grammar and rendered.grammar_lazy
    assert [t.value.strip() for t in rendered.grammar_triggers][0] == trigger
    assert trigger in rendered.preserved_tokens or name == "llama3" and "<|python_tag|>" in rendered.preserved_tokens


def test_each_family_parses_a_call_with_its_arguments(family):
    name, templates, _ = family
    parser = templates.render(ASK, tools=TOOLS).reply_parser()
    reply = parser.parse(call_text(name, [("get_weather", {"city": "Paris"})]))
    [call] = reply.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert reply.content.strip() == ""
    if name == "mistral-nemo":
        assert call.id == "call00000"  # the id the model wrote is kept


def test_each_family_parses_plain_text_as_content(family):
    _, templates, _ = family
    reply = templates.render(ASK, tools=TOOLS).reply_parser().parse("It is sunny in Paris.")
    assert reply.content == "It is sunny in Paris." and reply.tool_calls == ()


@pytest.mark.parametrize("name", ["hermes", "mistral-nemo", "qwen3"])
def test_several_calls_in_one_reply(name):
    source, tokens, _ = FAMILIES[name]
    with ChatTemplates(template=source, **tokens) as templates:
        parser = templates.render(ASK, tools=TOOLS, parallel_tool_calls=True).reply_parser()
        reply = parser.parse(call_text(name, [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]))
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]


def test_content_before_a_call_stays_content():
    with ChatTemplates(template=HERMES, eos_token="<|im_end|>") as templates:
        reply = templates.render(ASK, tools=TOOLS).reply_parser().parse(
            'Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert reply.content.strip() == "Let me look that up."
    assert [c.name for c in reply.tool_calls] == ["get_weather"]


def test_reasoning_is_split_from_content_or_kept_inline():
    reply_text = ('<think>\nThe user wants the weather.\n</think>\n\nChecking.\n<tool_call>\n'
                  '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    with ChatTemplates(template=QWEN3, eos_token="<|im_end|>") as templates:
        rendered = templates.render(ASK, tools=TOOLS, reasoning_format="auto")
        assert rendered.supports_thinking and rendered.thinking_start_tag == "<think>"
        assert rendered.thinking_end_tags == ("</think>",)
        reply = rendered.reply_parser().parse(reply_text)
        assert reply.reasoning_content.strip() == "The user wants the weather."
        assert reply.content.strip() == "Checking." and reply.tool_calls[0].name == "get_weather"
        # reasoning_format="none": the thinking stays in the content, as the model wrote it.
        inline = templates.render(ASK, reasoning_format="none").reply_parser().parse(
            "<think>\nhm\n</think>\n\nSunny.")
        assert inline.reasoning_content == "" and inline.content.startswith("<think>")
        # No thinking where the template supports switching it off: the prompt closes an empty block.
        assert templates.render(ASK, enable_thinking=False).prompt.endswith("<think>\n\n</think>\n\n")
        assert rendered.supports_enable_thinking


def test_partial_output_while_streaming_gives_growing_deltas():
    with ChatTemplates(template=QWEN3, eos_token="<|im_end|>") as templates:
        rendered = templates.render(ASK, tools=TOOLS)
        with rendered.reply_parser() as parser:
            assert parser.parse("<think>\nLet me", partial=True).reasoning_content == "Let me"
            partial = parser.parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', partial=True)
            assert partial.tool_calls[0].name == "get_weather"
            assert partial.tool_calls[0].arguments.startswith('{"city": "Pa')
            full = ('<think>\nWeather.\n</think>\n\nSure.\n<tool_call>\n'
                    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
            stream = ReplyStream(parser)
            deltas = [d for i in range(0, len(full), 3) for d in stream.feed(full[i:i + 3])]
            final, last = stream.finish()
            deltas += last
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert reasoning.strip() == "Weather." and content.strip() == "Sure."
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert all(c["index"] == 0 for c in calls)
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    assert final.tool_calls[0].id == calls[0]["id"]  # the same id whole and streamed


def test_required_and_named_choices_give_a_grammar_that_is_not_lazy():
    with ChatTemplates(template=HERMES, eos_token="<|im_end|>") as templates:
        required = templates.render(ASK, tools=TOOLS, tool_choice="required")
        assert required.grammar and not required.grammar_lazy and required.grammar_triggers == ()
        named = templates.render(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
        assert not named.grammar_lazy and "get_time" in named.grammar and "get_weather" not in named.grammar
        none = templates.render(ASK, tools=TOOLS, tool_choice="none")
        assert not none.grammar


# ---- every family of the pinned source's models/templates/ ----
# Families whose real template llama.cpp's chat layer reads tool calls from, but whose parser, as the pinned
# llama.cpp derives it from the template, does not read the call the template itself writes: a gap of the pinned
# llama.cpp, kept here so that a newer pin that closes it shows (the test fails until the entry is removed).
PINNED_CALL_PARSER_GAPS = {
    "Mistral-Small-3.2-24B-Instruct-2506": "its grammar and parser expect '[ARGS]' twice around the call id",
    "upstage-Solar-Open-100B": "its grammar and parser take the example call id ('call00001') as a literal",
}
# ... and whose thinking the derived parser does not separate (start and end tags as the chat layer reports them).
PINNED_THINKING_GAPS = {
    "Apriel-1.6-15b-Thinker-fixed": "its thinking ends at '[BEGIN FINAL RESPONSE]' but starts without a tag",
    "Cohere2MoE": "a reply starting with <|START_THINKING|> is not read as its format",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": "a reply starting with <|START_THINKING|> is not read",
    "LFM2-8B-A1B": "reported as thinking, but its parser keeps <think> blocks in the content",
    "LFM2.5-Instruct": "reported as thinking, but its parser keeps <think> blocks in the content",
}
# What comes between the thinking's end tag and the answer, for families whose answer has its own header.
THINKING_ANSWER_OPENINGS = {"openai-gpt-oss-120b": "<|start|>assistant<|channel|>final<|message|>"}
CALL_MESSAGE = {"role": "assistant", "content": "", "tool_calls": [{
    "id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}


def written_calls(templates, rendered) -> list[str]:
    """What a model of the family writes for CALL_MESSAGE, derived from its template (as llama.cpp's chat layer
    derives its parser): the rendered call after the prompt, from where the prompt ends or from the family's
    trigger, after a thinking end tag (the generation prompt may open the thinking), cut before the end-of-turn
    markers."""
    import re

    whole = templates.render(ASK + [CALL_MESSAGE], tools=[WEATHER], add_generation_prompt=False).prompt
    prompt = rendered.prompt
    common = next((i for i, (a, b) in enumerate(zip(whole, prompt)) if a != b), min(len(whole), len(prompt)))
    starts = [whole[common:]]
    window = max(0, common - 40)
    for trigger in rendered.grammar_triggers:
        if trigger.kind == "word" and trigger.value in whole[window:]:
            starts.append(whole[whole.index(trigger.value, window):])
        elif trigger.kind in ("pattern", "pattern_full"):
            try:
                found = re.search(trigger.value.lstrip("^"), whole[window:])
            except re.error:  # std::regex syntax Python's re does not take
                found = None
            if found:
                starts.append(whole[window + found.start():])
    if rendered.supports_thinking and rendered.thinking_end_tags:  # thinking the generation prompt may open
        starts += [rendered.thinking_end_tags[0] + "\n" + start.lstrip() for start in starts]
    texts = []
    for text in starts:
        texts.append(text)
        for _ in range(12):  # the call, without what ends the turn after it (<|im_end|>, </s> ...)
            text = text.rstrip()
            cut = max(text.rfind("<"), text.rfind("["), text.rfind("\n"))
            if cut <= 0:
                break
            text = text[:cut]
            texts.append(text)
    return texts


def test_every_pinned_template_family_gets_its_calls_and_thinking_parsed(pinned_templates):
    """For each real template of the pinned source: a family whose tool calls llama.cpp's chat layer reads gets
    the call its template writes parsed back (name and arguments); one that thinks gets its thinking separated
    from the answer; one without tools gets plain text as content."""
    tool_families, call_gaps, thinking_gaps, checked_thinking = [], {}, {}, 0
    for name, path in pinned_templates.items():
        try:
            templates = ChatTemplates(template=path.read_text(encoding="utf-8"), bos_token="<s>", eos_token="</s>")
        except TemplateError:
            continue  # a template llama.cpp's chat layer cannot read at all (none in the pinned set today)
        with templates:
            rendered = templates.render(ASK, tools=[WEATHER])
            with rendered.reply_parser() as parser:
                if rendered.caps["supports_tool_calls"]:
                    tool_families.append(name)
                    for text in written_calls(templates, rendered):
                        try:
                            calls = parser.parse(text).tool_calls
                        except ToolCallParseError:
                            continue
                        if [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]:
                            break
                    else:
                        call_gaps[name] = "no call read back"
                else:
                    plain = parser.parse("Sunny.")  # (thinking, where the generation prompt opens it)
                    assert (plain.content or plain.reasoning_content).strip() == "Sunny." and not plain.tool_calls, name
            thinking = templates.render(ASK, reasoning_format="auto")
            prompt_end = thinking.generation_prompt.rstrip()
            # (a generation prompt that closes the thinking block asks for a reply without thinking)
            if thinking.supports_thinking and thinking.thinking_start_tag and thinking.thinking_end_tags and \
                    not prompt_end.endswith(thinking.thinking_end_tags):
                checked_thinking += 1
                opened = prompt_end.endswith(thinking.thinking_start_tag)
                text = (("" if opened else thinking.thinking_start_tag) + "The user asks about Paris." +
                        thinking.thinking_end_tags[0] + THINKING_ANSWER_OPENINGS.get(name, "") + "Sunny.")
                try:
                    with thinking.reply_parser() as parser:
                        reply = parser.parse(text)
                    if (reply.reasoning_content.strip(), reply.content.strip()) != ("The user asks about Paris.",
                                                                                    "Sunny."):
                        thinking_gaps[name] = repr(reply)
                except ToolCallParseError as exc:
                    thinking_gaps[name] = str(exc)
    assert len(tool_families) >= 60 and checked_thinking >= 40  # the pinned set: 62 and 44 today
    assert set(call_gaps) == set(PINNED_CALL_PARSER_GAPS), call_gaps
    assert set(thinking_gaps) == set(PINNED_THINKING_GAPS), thinking_gaps


def test_templates_without_tool_support_render_plain_chat(smollm2):
    """SmolLM2's template describes no tools: common/chat gives no grammar and parses everything as content."""
    with ChatTemplates(smollm2) as templates:
        rendered = templates.render(ASK, tools=TOOLS, tool_choice="auto")
        assert rendered.prompt.endswith("<|im_start|>assistant\n") and not rendered.grammar
        assert not rendered.caps["supports_tool_calls"]
        assert rendered.reply_parser().parse("Sunny.").content == "Sunny."


def test_gemma3_without_a_template_falls_back_to_chatml(gemma3_path):
    with llmplace.load(gemma3_path, progress=False) as model, ChatTemplates(model) as templates:
        rendered = templates.render(ASK, tools=TOOLS)
    assert "What is the weather in Paris?" in rendered.prompt and not rendered.grammar


def test_a_lazy_grammar_builds_on_a_real_vocabulary(smollm2):
    with ChatTemplates(template=HERMES, eos_token="<|im_end|>") as templates:
        for choice in ("auto", "required"):
            with ToolCallGrammar(smollm2, templates.render(ASK, tools=TOOLS, tool_choice=choice)) as grammar:
                import numpy as np
                logits = np.zeros(smollm2.n_vocab, dtype=np.float32)
                grammar.apply(logits)
                allowed = np.isfinite(logits).sum()
                # Lazy: everything is allowed before the trigger; forced: only what starts a call.
                assert allowed == smollm2.n_vocab if choice == "auto" else 0 < allowed < smollm2.n_vocab


# ---- bad input ----
def test_a_schema_the_grammar_builder_refuses_is_a_typed_error():
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    dangling = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}
    with ChatTemplates(template=HERMES, eos_token="<|im_end|>") as templates:
        with pytest.raises(ToolSchemaError, match="unrecognized type nonsense"):
            templates.render(ASK, tools=[bad], tool_choice="required")
        with pytest.raises(ToolSchemaError, match="cannot resolve \\$ref"):
            templates.render(ASK, tools=[dangling])
        with pytest.raises(ToolSchemaError, match="nests deeper"):
            deep: dict = {"type": "object"}
            for _ in range(200):
                deep = {"type": "object", "properties": {"x": deep}}
            templates.render(ASK, tools=[{"type": "function", "function": {"name": "d", "parameters": deep}}])
        assert isinstance(ToolSchemaError("x"), ValueError)


def test_an_unparsable_call_is_a_typed_error_with_the_reason():
    with ChatTemplates(template=HERMES, eos_token="<|im_end|>") as templates:
        parser = templates.render(ASK, tools=TOOLS).reply_parser()
        with pytest.raises(ToolCallParseError, match="does not match the expected peg-native format"):
            parser.parse('<tool_call>\n{"name": "no_such_tool", "arguments": {}}\n</tool_call>')
        assert isinstance(ToolCallParseError("x"), ValueError)


def test_bad_requests_are_invalid_parameters():
    with ChatTemplates(template=HERMES, eos_token="<|im_end|>") as templates:
        with pytest.raises(InvalidParameterError, match="tools\\[0\\]"):
            templates.render(ASK, tools=[{"type": "function"}])
        with pytest.raises(InvalidParameterError, match="tool_choice must be"):
            templates.render(ASK, tools=TOOLS, tool_choice="sometimes")
        with pytest.raises(InvalidParameterError, match="Tool choice 'nope' not found"):
            templates.render(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
        with pytest.raises(InvalidParameterError, match="reasoning_format"):
            templates.render(ASK, reasoning_format="sideways")
        with pytest.raises(InvalidParameterError, match="Missing 'role'"):
            templates.render([{"content": "hi"}])
    with pytest.raises(TemplateError):
        ChatTemplates(template="{% for %}")
    assert resolve_tool_choice(TOOLS, None) == (TOOLS, "auto")


# ---- Llama.create_chat_completion (the drop-in) ----
COMMON = {"verbose": False, "n_threads": 1, "n_threads_batch": 1, "n_ctx": 1024}
# Two earlier turns in which the assistant called the tool: a 135M model then writes the call itself (and the
# history renders assistant tool_calls and tool results through the template).
FEW_SHOT = [
    {"role": "user", "content": "What is the weather in London?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "London"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Rain, 12 C"},
    {"role": "assistant", "content": "It rains in London (12 C)."},
    {"role": "user", "content": "What is the weather in Berlin?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_2", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Berlin"}'}}]},
    {"role": "tool", "tool_call_id": "call_2", "content": "Sun, 20 C"},
    {"role": "assistant", "content": "It is sunny in Berlin (20 C)."},
] + ASK


def check_weather_call(call: dict) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)


def joined_stream(chunks: list[dict]) -> dict:
    """The streamed deltas joined: {"content", "reasoning_content", "calls": [{id, name, arguments}]}."""
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    out: dict = {"content": "", "reasoning_content": "", "calls": []}
    for chunk in chunks[1:]:
        delta = chunk["choices"][0]["delta"]
        out["content"] += delta.get("content", "")
        out["reasoning_content"] += delta.get("reasoning_content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] == len(out["calls"]):
                out["calls"].append({"id": call["id"], "name": call["function"]["name"], "arguments": ""})
            out["calls"][call["index"]]["arguments"] += call["function"]["arguments"]
    out["finish_reason"] = chunks[-1]["choices"][0]["finish_reason"]
    return out


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with llmplace.Llama(str(smollm2_path), **COMMON) as llm:
        yield llm


@pytest.fixture
def with_template(llm):
    """Give the Llama another template in llama.cpp's chat layer (as a GGUF whose template describes tools)."""
    from llmplace.compat._chat_tools import template_traits

    own = template_traits(llm)

    def use(source: str, **tokens):
        templates = ChatTemplates(template=source, **tokens)
        probe = templates.render(ASK, reasoning_format="auto")
        traits = type(own)(templates, probe.caps["supports_tool_calls"], probe.supports_thinking)
        llm.__dict__["_llmplace_template_traits"] = traits
    yield use
    llm.__dict__["_llmplace_template_traits"] = own


def test_required_on_a_template_without_tools_still_forces_a_call(llm):
    """SmolLM2's own template cannot describe tools: "required" describes them in a system message and
    constrains the reply to {"name", "arguments"} matching a tool's schema."""
    reply = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=60)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    check_weather_call(call)
    streamed = joined_stream(list(llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="required",
                                                              temperature=0, max_tokens=60, stream=True)))
    assert streamed["finish_reason"] == "tool_calls"
    [call] = streamed["calls"]
    assert (call["name"], call["arguments"]) == ("get_weather", choice["message"]["tool_calls"][0]["function"][
        "arguments"])


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_template_with_tools_gets_the_call_parsed_whole_and_streamed(llm, with_template, tool_choice):
    with_template(HERMES, eos_token="<|im_end|>")
    reply = llm.create_chat_completion(FEW_SHOT, tools=TOOLS, tool_choice=tool_choice, temperature=0,
                                       max_tokens=60)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    check_weather_call(call)
    assert "function_call" not in choice["message"]
    streamed = joined_stream(list(llm.create_chat_completion(FEW_SHOT, tools=TOOLS, tool_choice=tool_choice,
                                                              temperature=0, max_tokens=60, stream=True)))
    assert streamed["finish_reason"] == "tool_calls" and streamed["content"].strip() == ""
    [streamed_call] = streamed["calls"]
    assert streamed_call["name"] == "get_weather"
    assert json.loads(streamed_call["arguments"]) == json.loads(call["function"]["arguments"])


def test_tool_choice_none_and_legacy_functions(llm, with_template):
    with_template(HERMES, eos_token="<|im_end|>")
    reply = llm.create_chat_completion(FEW_SHOT, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=12)
    assert "tool_calls" not in reply["choices"][0]["message"]
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    reply = llm.create_chat_completion(FEW_SHOT, functions=[WEATHER["function"]],
                                       function_call={"name": "get_weather"}, temperature=0, max_tokens=60)
    message = reply["choices"][0]["message"]
    assert message["function_call"] == message["tool_calls"][0]["function"]


class ForceText:
    """A logits processor that makes the model write `text` (then end): a reply chosen by the test."""

    def __init__(self, llm, text: str) -> None:
        self.tokens = llm.tokenize(text.encode(), add_bos=False, special=True) + [llm.token_eos()]
        self.start: int | None = None

    def __call__(self, input_ids, scores):
        import numpy as np

        if self.start is None:
            self.start = len(input_ids)
        i = min(len(input_ids) - self.start, len(self.tokens) - 1)
        forced = np.full_like(scores, -np.inf)
        forced[self.tokens[i]] = 0.0
        return forced


THOUGHT = "<think>\nThe user wants Paris.\n</think>\n\nIt is sunny in Paris."


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_is_split_out_of_content_or_kept_inline(llm, with_template, stream):
    with_template(QWEN3, eos_token="<|im_end|>")

    def ask(**options):
        from llmplace.compat import LogitsProcessorList

        reply = llm.create_chat_completion(ASK, temperature=0, max_tokens=40, stream=stream,
                                           logits_processor=LogitsProcessorList([ForceText(llm, THOUGHT)]), **options)
        if stream:
            joined = joined_stream(list(reply))
            return joined["content"], joined["reasoning_content"] or None
        message = reply["choices"][0]["message"]
        return message["content"], message.get("reasoning_content")

    content, reasoning = ask()
    assert reasoning.strip() == "The user wants Paris." and content.strip() == "It is sunny in Paris."
    content, reasoning = ask(reasoning_format="none")
    assert reasoning is None and content.startswith("<think>")


LONG_THOUGHT = ("<think>\nParis is in France and the weather there changes often, so I should look it up carefully "
                "before answering the question.\n</think>\n\nIt is sunny in Paris.")


@pytest.mark.parametrize("budget", [0, 4])
def test_a_reasoning_budget_ends_the_thinking(llm, with_template, budget):
    from llmplace.compat import LogitsProcessorList

    with_template(QWEN3, eos_token="<|im_end|>")
    force = ForceText(llm, LONG_THOUGHT)
    reply = llm.create_chat_completion(ASK, temperature=0, max_tokens=80, reasoning_budget_tokens=budget,
                                       logits_processor=LogitsProcessorList([force]))
    message = reply["choices"][0]["message"]
    # At most `budget` tokens of the thought (counted from the start tag), then the forced </think>: the rest of
    # the forced text is content.
    reasoning = message.get("reasoning_content", "")
    assert "Paris is in France and the weather".startswith(reasoning.strip())
    assert len(llm.tokenize(reasoning.encode(), add_bos=False)) <= budget
    assert (reasoning.strip() != "") == (budget > 1)
    assert "before answering" in message["content"]  # (the test's forcing processor writes its own </think> too)
    unlimited = llm.create_chat_completion(ASK, temperature=0, max_tokens=80, reasoning_budget_tokens=-1,
                                           logits_processor=LogitsProcessorList([ForceText(llm, LONG_THOUGHT)]))
    assert unlimited["choices"][0]["message"]["reasoning_content"].startswith("Paris is in France")
    with pytest.raises(ValueError, match="reasoning_budget_tokens"):
        llm.create_chat_completion(ASK, max_tokens=2, reasoning_budget_tokens=-5)


def test_drop_in_bad_options(llm):
    with pytest.raises(ValueError, match="reasoning_format"):
        llm.create_chat_completion(ASK, reasoning_format="sideways", max_tokens=2)
    with pytest.raises(ValueError, match="reasoning_format"):
        llmplace.Llama("nowhere.gguf", reasoning_format="sideways")


# ---- llmplace serve, with the openai client ----
@pytest.fixture(scope="module")
def hermes_gguf(smollm2_path, tmp_path_factory):
    """SmolLM2 with a template that describes tools (gguf's own metadata copier): a model that chooses tools."""
    import sys

    from gguf.scripts import gguf_new_metadata

    path = tmp_path_factory.mktemp("tools") / "smollm2-hermes.gguf"
    argv = sys.argv
    sys.argv = ["gguf_new_metadata", str(smollm2_path), str(path), "--chat-template", HERMES, "--force"]
    try:
        gguf_new_metadata.main()
    finally:
        sys.argv = argv
    return path


def test_chat_format_functionary_v2_reads_the_gguf_s_functionary_template(smollm2_path, pinned_templates, tmp_path):
    """chat_format="functionary-v2" (llama-cpp-python reads the template through a Hugging Face tokenizer): the
    GGUF's own template, here functionary medium v3.2's from the pinned source, and its calls (>>>name) parsed."""
    import sys

    from gguf.scripts import gguf_new_metadata

    path = tmp_path / "smollm2-functionary.gguf"
    argv = sys.argv
    sys.argv = ["gguf_new_metadata", str(smollm2_path), str(path), "--chat-template",
                pinned_templates["meetkai-functionary-medium-v3.2"].read_text(encoding="utf-8"), "--force"]
    try:
        gguf_new_metadata.main()
    finally:
        sys.argv = argv
    with llmplace.Llama(str(path), chat_format="functionary-v2", **COMMON) as llm:
        reply = llm.create_chat_completion(FEW_SHOT, tools=TOOLS, tool_choice="required", temperature=0,
                                           max_tokens=40)
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    check_weather_call(reply["choices"][0]["message"]["tool_calls"][0])


@pytest.fixture(scope="module")
def tools_client(hermes_gguf):
    import subprocess
    import sys
    import tempfile

    openai = pytest.importorskip("openai")
    from processes import free_port, stop, wait_until_serving

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llmplace.cli", "serve", str(hermes_gguf), "--port", str(port),
                                "--api-key", "k", "--threads", "1", "--n-ctx", "1024"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    wait_until_serving(process, port)
    yield openai, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120)
    stop(process)


def test_a_gguf_whose_template_describes_tools_gets_calls_from_the_drop_in(hermes_gguf):
    with llmplace.Llama(str(hermes_gguf), **COMMON) as llm:
        reply = llm.create_chat_completion(FEW_SHOT, tools=TOOLS, temperature=0, max_tokens=60)
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    check_weather_call(reply["choices"][0]["message"]["tool_calls"][0])


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_the_server_answers_tool_calls_to_the_openai_client(tools_client, tool_choice):
    _, client = tools_client
    reply = client.chat.completions.create(model="m", messages=FEW_SHOT, tools=TOOLS, tool_choice=tool_choice,
                                           temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    check_weather_call(call.model_dump())
    stream = client.chat.completions.create(model="m", messages=FEW_SHOT, tools=TOOLS, tool_choice=tool_choice,
                                            temperature=0, max_tokens=60, stream=True)
    joined = joined_stream([chunk.model_dump(exclude_none=True) for chunk in stream])
    assert joined["finish_reason"] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in joined["calls"]] == [
        (call.function.name, json.loads(call.function.arguments))]


def test_the_server_answers_400_to_a_tool_schema_the_grammar_builder_refuses(tools_client):
    openai, client = tools_client
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match="unrecognized type nonsense"):
        client.chat.completions.create(model="m", messages=ASK, tools=[bad], tool_choice="required", max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="reasoning_format"):
        client.chat.completions.create(model="m", messages=ASK, max_tokens=8,
                                       extra_body={"reasoning_format": "sideways"})
    with pytest.raises(openai.BadRequestError, match="reasoning_budget_tokens"):
        client.chat.completions.create(model="m", messages=ASK, max_tokens=8,
                                       extra_body={"reasoning_budget_tokens": -5})
    # a schema no value meets: llama.cpp's grammar sampler threw through its C API here, ending the server
    no_int = {"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 6}
    with pytest.raises(openai.BadRequestError, match="allows no text"):
        client.chat.completions.create(model="m", messages=ASK, max_tokens=8, temperature=0.8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": no_int}})
    assert client.chat.completions.create(model="m", messages=ASK, max_tokens=2).choices[0].finish_reason


# ---- llmplace.Chat with tools, on the real templates of the pinned source ----
HERMES_2_PRO = "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use"


def tool_chat(smollm2, pinned_templates, name: str, **options):
    return llmplace.Chat(smollm2, template=pinned_templates[name].read_text(), n_ctx=1024, n_threads=1,
                         **{"temperature": 0, "max_tokens": 60, **options})


@pytest.fixture(scope="module")
def hermes_chat(smollm2, pinned_templates):
    with tool_chat(smollm2, pinned_templates, HERMES_2_PRO, tools=TOOLS, max_tokens=40) as chat:
        yield chat


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}, "auto"])
def test_chat_calls_a_tool_whole_and_streamed_and_reads_its_result(hermes_chat, pinned_templates, tool_choice):
    """Hermes 2 Pro's template (ChatML, <tool_call> JSON) with SmolLM2: the reply's call lands in the history in
    OpenAI's shape, the tool's result follows it, and the next turn renders both as the template writes them."""
    chat = hermes_chat  # one Chat for every choice: the conversation's cached prefix is reused (CI's time)
    chat.load_history(FEW_SHOT[:-1])
    reply = chat.submit(ASK[0]["content"], tool_choice=tool_choice)
    assert reply.finish_reason == "tool_calls"
    [call] = reply.tool_calls
    check_weather_call(call.to_openai())
    assert chat.history[-1] == {"role": "assistant", "content": reply.text, "tool_calls": [call.to_openai()]}
    if tool_choice != "auto":
        return  # (the rest is the same for every choice: run once, for CI's time)
    chat.add_tool_result(call.id, "Sunny, 25 C")
    answer = chat.submit(tool_choice="none", max_tokens=12)
    assert answer.tool_calls == () and answer.finish_reason in ("stop", "length") and answer.text
    history = chat.history
    # streamed: the same call, in deltas
    chat.load_history(FEW_SHOT[:-1])
    deltas = list(chat.stream_deltas(ASK[0]["content"]))
    assert chat.last.tool_calls[0].arguments == call.arguments
    streamed = joined_stream([{"choices": [{"delta": {"role": "assistant"}}]}] +
                             [{"choices": [{"delta": d, "finish_reason": None}]} for d in deltas])
    assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == [(call.name, call.arguments)]
    assert history[-2] == {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": "Sunny, 25 C"}
    with ChatTemplates(template=pinned_templates[HERMES_2_PRO].read_text()) as templates:
        prompt = templates.render(history, tools=TOOLS, add_generation_prompt=False).prompt
    last_turn = prompt[prompt.rindex(ASK[0]["content"]):]
    assert "<tool_call>" in last_turn and call.arguments in last_turn
    assert last_turn.index(call.arguments) < last_turn.index("<tool_response>") < last_turn.index("Sunny, 25 C")


def test_chat_keeps_a_tool_turn_stopped_midway_and_goes_on(hermes_chat):
    """Breaking out of a tool turn's stream keeps what was written with finish_reason "abort", without the call
    being written (its arguments are not whole JSON: it could not be answered or rendered); the next turn works."""
    chat = hermes_chat
    chat.load_history(FEW_SHOT[:-1])
    for delta in chat.stream_deltas(ASK[0]["content"], tool_choice="required"):
        if "tool_calls" in delta:
            break
    assert chat.last.finish_reason == "abort" and chat.last.tool_calls == ()
    assert chat.history[-1]["role"] == "assistant" and "tool_calls" not in chat.history[-1]
    assert chat.submit("And in Rome?", tool_choice="none", max_tokens=4).generated_tokens >= 1


def test_chat_separates_thinking_limits_it_or_keeps_it_inline(smollm2, pinned_templates):
    """DeepSeek R1's template opens the thinking block in the generation prompt: what SmolLM2 writes first is
    thinking. A budget of 4 tokens closes it; reasoning_format="none" keeps it in the text."""
    with tool_chat(smollm2, pinned_templates, "llama-cpp-deepseek-r1", max_tokens=24) as chat:
        limited = chat.submit("What is the capital of France?", reasoning_budget=4)
        assert limited.reasoning_content.strip() and "</think>" not in limited.text
        assert len(smollm2.tokenize(limited.reasoning_content, add_special=False)) <= 5
        assert chat.history[-1]["reasoning_content"] == limited.reasoning_content
        chat.reset()
        streamed = list(chat.stream_deltas("What is the capital of France?", reasoning_budget=4))
        assert "".join(d.get("reasoning_content", "") for d in streamed) == limited.reasoning_content
        assert "".join(d.get("content", "") for d in streamed) == limited.text
        chat.reset()
        inline = chat.submit("What is the capital of France?", reasoning_budget=4, reasoning_format="none")
        assert inline.reasoning_content == "" and limited.reasoning_content.strip() in inline.text
    with tool_chat(smollm2, pinned_templates, "Qwen-Qwen3-0.6B", max_tokens=8) as chat:
        chat.submit("Hi", enable_thinking=False)
        assert chat.last.reasoning_content == ""


def test_chat_tool_errors_are_typed_and_leave_the_history_alone(smollm2, pinned_templates):
    from llmplace.chat_tools import ToolSchemaError

    with llmplace.Chat(smollm2, n_ctx=512, n_threads=1, max_tokens=4) as chat:
        with pytest.raises(InvalidParameterError, match="cannot describe tools"):
            chat.submit("Hi", tools=TOOLS)  # SmolLM2's own template has no tool calls
        assert chat.history == []
    with tool_chat(smollm2, pinned_templates, "Qwen-Qwen2.5-7B-Instruct", max_tokens=4) as chat:
        bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
        with pytest.raises(ToolSchemaError, match="unrecognized type nonsense"):
            chat.submit("Hi", tools=[bad], tool_choice="required")
        with pytest.raises(InvalidParameterError, match="Tool choice 'nope' not found"):
            chat.submit("Hi", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
        with pytest.raises(InvalidParameterError, match="reasoning_format"):
            chat.submit("Hi", reasoning_format="sideways")
        with pytest.raises(InvalidParameterError, match="no tool call 'call_x'"):
            chat.add_tool_result("call_x", "result")
        with pytest.raises(InvalidParameterError, match="no message"):
            chat.submit()
        with pytest.raises(InvalidParameterError, match="answers no tool call"):
            chat.load_history([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}])
        with pytest.raises(InvalidParameterError, match="tools must be a list"):
            llmplace.Chat(smollm2, tools={"name": "f"})
        assert chat.history == []


ODD_NAME = {"type": "function", "function": {"name": 'get"weather', "parameters": {"type": "object"}}}
BAD_REQUESTS = {
    "schema_unknown_type": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "nonsense"}}}], "tool_choice": "required"},
    "schema_dangling_ref": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}]},
    "schema_a_list": {"tools": [{"type": "function", "function": {"name": "f", "parameters": ["a"]}}]},
    "schema_too_deep": {"tools": [{"type": "function", "function": {"name": "f", "parameters": json.loads(
        '{"type": "object", "properties": {"x": ' * 40 + "{}" + "}}" * 40)}}]},
    "tool_not_a_function": {"tools": [{"type": "retrieval"}]},
    "name_with_a_quote": {"tools": [ODD_NAME]},
    "names_duplicated": {"tools": [WEATHER, WEATHER]},
    "choice_unknown_word": {"tools": TOOLS, "tool_choice": "sometimes"},
    "choice_missing_function": {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    "tool_result_without_call": {"tools": TOOLS, "messages": ASK + [
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]},
    "tool_result_for_another_call": {"tools": TOOLS, "messages": FEW_SHOT[:2] + [
        {"role": "tool", "tool_call_id": "call_9", "content": "Sunny"}]},
    "reasoning_format_unknown": {"reasoning_format": "sideways"},
    "reasoning_budget_negative": {"reasoning_budget_tokens": -5},
}


@pytest.mark.parametrize("stream", [False, True])
def test_the_server_answers_each_class_of_bad_tool_input_with_an_openai_400(tools_client, stream):
    import urllib.error
    import urllib.request

    _, client = tools_client
    for name, fields in BAD_REQUESTS.items():
        payload = {"model": "m", "messages": ASK, "max_tokens": 4, "stream": stream, **fields}
        request = urllib.request.Request(f"{client.base_url}chat/completions", json.dumps(payload).encode(),
                                         {"Authorization": "Bearer k", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=60).read()
        assert answer.value.code == 400, name
        error = json.loads(answer.value.read())["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", name
        assert len(error["message"]) > 20, (name, error)  # says what was wrong
