"""Chat: templates rendered as llama.cpp renders them, multi-turn KV-cache reuse, interruption, overflow, the REPL.

Greedy (temperature=0) throughout, so replies are reproducible; one CPU thread per context, because this
machine's two cores are shared with other test runs and ggml's spinning thread pools slow down badly when
oversubscribed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import llmplace
from llmplace import Chat
from llmplace.chat import format_chat
from llmplace.chat_template import ChatTemplate
from llmplace.errors import ClosedError, ContextOverflowError, InvalidParameterError, TemplateError

GREEDY = dict(temperature=0, n_threads=1)
SYSTEM = "You are a helpful assistant."
# SmolLM2's template inserts this system prompt when the conversation has none; llama.cpp's built-in ChatML
# formatting does not.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = {
    "system+user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    "multi-turn": [{"role": "system", "content": "  Answer in French.\n"},
                   {"role": "user", "content": "What is the capital of France?"},
                   {"role": "assistant", "content": " Paris. \n"},
                   {"role": "user", "content": "And of Italy? Use 'quotes' & <tags>, ünïcödé 🙂"}],
    "user only": [{"role": "user", "content": "Hello"}],
    "user, assistant": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"}],
}


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    with llmplace.load(gemma3_path, progress=False) as model:
        yield model


# ---- templates ----

@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_renders_as_llama_cpp(smollm2, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    jinja = format_chat(smollm2, messages, add_generation_prompt=add_generation_prompt)
    builtin = format_chat(smollm2, messages, add_generation_prompt=add_generation_prompt, engine="llama.cpp")
    if messages[0]["role"] == "system":
        assert jinja == builtin
    else:
        # The one legitimate difference: SmolLM2's own (Jinja) template adds its default system prompt when
        # the conversation has none; llama.cpp's hand-written ChatML does not. With that prompt made explicit
        # the two agree.
        assert jinja.startswith(f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n")
        explicit = [{"role": "system", "content": SMOLLM2_DEFAULT_SYSTEM}, *messages]
        assert jinja == format_chat(smollm2, explicit, add_generation_prompt=add_generation_prompt,
                                    engine="llama.cpp")
    assert jinja.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma3_template_renders_as_llama_cpp(gemma3, name, add_generation_prompt):
    # This Gemma 3 GGUF ships no template; both engines use their "gemma" formatting (chosen by architecture).
    messages = CONVERSATIONS[name]
    jinja_template = ChatTemplate.resolve(gemma3)
    builtin_template = ChatTemplate.resolve(gemma3, engine="llama.cpp")
    assert (jinja_template.engine, jinja_template.name) == ("jinja", "gemma")
    jinja = jinja_template.render(messages, add_generation_prompt=add_generation_prompt)
    builtin = builtin_template.render(messages, add_generation_prompt=add_generation_prompt)
    # The legitimate difference: Hugging Face's Gemma templates write "<bos>" into the text, llama.cpp leaves
    # BOS to the tokenizer. Both fold the system prompt into the first user turn and trim contents.
    assert jinja == "<bos>" + builtin
    assert jinja_template.tokens(gemma3, jinja) == builtin_template.tokens(gemma3, builtin)
    if name == "multi-turn":
        assert "<start_of_turn>user\nAnswer in French.\n\nWhat is the capital" in jinja
        assert "<start_of_turn>model\nParis.<end_of_turn>" in jinja


def test_bos_is_added_exactly_once(smollm2, gemma3):
    template = ChatTemplate.resolve(gemma3)
    text = template.render(CONVERSATIONS["user only"])
    tokens = template.tokens(gemma3, text)
    assert tokens[0] == gemma3.vocab.bos and tokens[1] != gemma3.vocab.bos
    # Text without BOS (llama.cpp's engine, or a template that omits it) gets the token prepended once.
    assert template.tokens(gemma3, text[len("<bos>"):]) == tokens
    # SmolLM2 does not ask for BOS: nothing is added.
    smol = ChatTemplate.resolve(smollm2)
    assert smol.tokens(smollm2, "Hello") == smollm2.tokenize("Hello", add_special=False)


def test_template_helpers_work_in_the_sandbox(smollm2):
    source = ("{{ bos_token }}|{{ eos_token }}|{{ strftime_now('%Y') | length }}|{{ {'k': '<ü>'} | tojson }}|"
              "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}|"
              "{{ add_generation_prompt }}")
    text = format_chat(smollm2, CONVERSATIONS["multi-turn"], template=source)
    bos, eos = smollm2.vocab.token_text(smollm2.vocab.bos), smollm2.vocab.token_text(smollm2.vocab.eos)
    assert text == f'{bos}|{eos}|4|{{"k": "<ü>"}}|  Answer in French.\n|True'
    # The sandbox refuses to reach Python internals.
    with pytest.raises(TemplateError):
        format_chat(smollm2, CONVERSATIONS["user only"], template="{{ messages.__class__.__mro__ }}{{ ''.mro() }}")


def test_template_raise_exception_is_a_template_error(gemma3):
    with pytest.raises(TemplateError, match="alternate user and assistant"):
        format_chat(gemma3, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with Chat(gemma3, **GREEDY) as chat:
        with pytest.raises(TemplateError, match="alternate"):
            chat.load_history([{"role": "assistant", "content": "I speak first"}])
        assert chat.history == []
        assert chat.submit("Hi", max_tokens=2).generated_tokens >= 1   # still usable


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{{ m.content }", "not valid Jinja"),
    ("no-such-template", "unknown chat template name"),
    ("", "template must be"),
])
def test_a_bad_template_raises_and_the_next_chat_works(smollm2, template, match):
    with pytest.raises(TemplateError, match=match):
        Chat(smollm2, template=template, **GREEDY)
    with Chat(smollm2, template="chatml", **GREEDY) as chat:
        assert chat.template.engine == "jinja"
        assert chat.submit("Hi", max_tokens=2).generated_tokens >= 1


def test_named_template_without_jinja_source_uses_llama_cpp(smollm2):
    template = ChatTemplate.resolve(smollm2, "llama3")
    assert template.engine == "llama.cpp"
    assert "<|start_header_id|>user<|end_header_id|>" in template.render(CONVERSATIONS["user only"])


# ---- turns ----

def test_submit_answers_and_records_history(smollm2):
    with Chat(smollm2, SYSTEM, max_tokens=24, **GREEDY) as chat:
        reply = chat.submit("What is the capital of France?")
        assert "Paris" in reply.text and str(reply) == reply.text
        assert reply.finish_reason == "stop"
        assert chat.history == [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": "What is the capital of France?"},
                                {"role": "assistant", "content": reply.text}]
        assert reply.prompt_evaluated == reply.prompt_tokens  # first turn: nothing cached


def test_second_turn_evaluates_only_the_new_message(smollm2):
    with Chat(smollm2, SYSTEM, max_tokens=24, **GREEDY) as chat:
        chat.submit("What is the capital of France?")
        second = chat.submit("And of Italy?")
        new_message = len(smollm2.tokenize("And of Italy?", add_special=False))
        # The new message plus the template's markup around it (<|im_end|>\n<|im_start|>user\n ... \n
        # <|im_start|>assistant\n, about 10 tokens), never the history again.
        assert second.prompt_evaluated <= new_message + 12
        assert second.prompt_evaluated < second.prompt_tokens / 2
        assert chat.last_prompt_evaluated == second.prompt_evaluated
        history = chat.history
    # The reused cache gives the same greedy reply as computing the whole conversation afresh.
    with Chat.from_history(smollm2, history[:-2], max_tokens=24, **GREEDY) as fresh:
        again = fresh.submit("And of Italy?")
        assert again.prompt_evaluated == again.prompt_tokens == second.prompt_tokens
        assert again.text == second.text


def test_gemma3_turns_reuse_the_cache_and_match_a_fresh_chat(gemma3):
    with Chat(gemma3, "Be brief.", max_tokens=12, **GREEDY) as chat:
        chat.submit("Name a colour.")
        second = chat.submit("Name another one.")
        assert second.prompt_evaluated < second.prompt_tokens / 2
        history = chat.history
    with Chat.from_history(gemma3, history[:-2], max_tokens=12, **GREEDY) as fresh:
        assert fresh.submit("Name another one.").text == second.text


def test_stream_yields_the_reply_in_pieces(smollm2):
    with Chat(smollm2, SYSTEM, max_tokens=16, **GREEDY) as chat:
        pieces = list(chat.stream("Count from one to five."))
        assert len(pieces) > 1 and all(pieces)
        assert "".join(pieces) == chat.last.text == chat.history[-1]["content"]
        assert chat.last.generated_tokens >= len(pieces)


def test_stop_strings_max_tokens_and_sampling_pass_through(smollm2):
    with Chat(smollm2, SYSTEM, max_tokens=24, **GREEDY) as chat:
        short = chat.submit("What is the capital of France?", max_tokens=3)
        assert short.generated_tokens == 3 and short.finish_reason == "length"
        chat.reset()
        stopped = chat.submit("What is the capital of France?", stop=["Paris"])
        assert stopped.finish_reason == "stop" and "Paris" not in stopped.text
        assert stopped.text.startswith("The capital of France is")
        sampled = []
        for _ in range(2):
            chat.reset()
            sampled.append(chat.submit("Say a word.", temperature=1.0, seed=7, max_tokens=6).text)
        assert sampled[0] == sampled[1]  # same seed, same reply


def test_reset_keeps_the_system_prompt_and_its_cache(smollm2):
    with Chat(smollm2, SYSTEM, max_tokens=8, **GREEDY) as chat:
        chat.submit("Hello!")
        chat.reset()
        assert chat.history == [{"role": "system", "content": SYSTEM}] and chat.last is None
        reply = chat.submit("What is 2 + 2?")
        n_system = len(smollm2.tokenize(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", parse_special=True))
        assert reply.prompt_evaluated <= reply.prompt_tokens - n_system + 1


def test_history_saves_and_loads_as_json(smollm2, tmp_path):
    path = tmp_path / "chat.json"
    with Chat(smollm2, SYSTEM, max_tokens=8, **GREEDY) as chat:
        chat.submit("Hello!")
        chat.save(path)
        history = chat.history
    data = json.loads(path.read_text())
    assert data["format"] == "llmplace.chat/1" and data["messages"] == history
    with Chat(smollm2, max_tokens=8, **GREEDY) as other:
        other.load(path)
        assert other.history == history and other.system_prompt == SYSTEM
        other.submit("Bye!")
        assert len(other.history) == 5
    # A plain list of messages works too.
    path.write_text(json.dumps(history))
    with Chat(smollm2, **GREEDY) as other:
        other.load(path)
        assert other.history == history


# ---- interruption ----

def _assert_consistent(chat, model, message="What is 2 + 2?"):
    """The next turn works and gives what a fresh chat with the same history gives (the cache is sound)."""
    history = chat.history
    reply = chat.submit(message, max_tokens=8)
    assert reply.finish_reason in ("stop", "length") and reply.text
    with Chat.from_history(model, history, **GREEDY) as fresh:
        assert fresh.submit(message, max_tokens=8).text == reply.text


def test_breaking_out_of_stream_keeps_the_partial_reply(smollm2):
    with Chat(smollm2, SYSTEM, max_tokens=200, **GREEDY) as chat:
        pieces = []
        for piece in chat.stream("Write a long story about a cat."):
            pieces.append(piece)
            if len(pieces) == 4:
                break
        assert chat.last.finish_reason == "abort"
        assert chat.history[-1] == {"role": "assistant", "content": "".join(pieces)}
        assert chat.history[-2]["content"] == "Write a long story about a cat."
        _assert_consistent(chat, smollm2)


def test_abort_from_another_thread_stops_the_reply(smollm2):
    with Chat(smollm2, SYSTEM, max_tokens=200, **GREEDY) as chat:
        started = threading.Event()
        aborter = threading.Thread(target=lambda: started.wait(60) and chat.abort())
        aborter.start()
        text = ""
        for piece in chat.stream("Write a long story about a cat."):
            text += piece
            started.set()
        aborter.join()
        assert chat.last.finish_reason == "abort"
        assert chat.last.generated_tokens < 200 and chat.history[-1]["content"] == text
        _assert_consistent(chat, smollm2)
        chat.abort()  # with no reply in progress: no effect on the next one
        assert chat.submit("Hi", max_tokens=4).finish_reason in ("stop", "length")


def test_ctrl_c_during_generation_leaves_the_chat_usable(smollm2):
    with Chat(smollm2, SYSTEM, max_tokens=200, **GREEDY) as chat:
        started = threading.Event()

        def interrupt():
            if started.wait(60):
                os.kill(os.getpid(), signal.SIGINT)

        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        thread = threading.Thread(target=interrupt)
        thread.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                for _ in chat.stream("Write a long story about a cat."):
                    started.set()
        finally:
            started.set()
            thread.join()
            signal.signal(signal.SIGINT, previous)
        assert chat.last.finish_reason == "abort"
        assert chat.history[-2]["content"] == "Write a long story about a cat."
        _assert_consistent(chat, smollm2)


# ---- context overflow ----

def test_a_full_context_raises_and_leaves_the_history_unchanged(smollm2):
    with Chat(smollm2, SYSTEM, n_ctx=128, max_tokens=8, **GREEDY) as chat:
        chat.submit("Hi")
        before = chat.history
        with pytest.raises(ContextOverflowError, match="truncate=True"):
            chat.submit("word " * (chat.n_ctx + 10))  # llama.cpp rounds n_ctx up (to 256 here)
        assert chat.history == before
        assert chat.submit("Hello again", max_tokens=4).generated_tokens >= 1


def test_truncate_drops_the_oldest_turns_and_keeps_the_system_prompt(smollm2):
    old = []
    for i in range(12):
        old += [{"role": "user", "content": f"Tell me fact number {i} about the sea, in detail please."},
                {"role": "assistant", "content": f"Fact {i}: the sea is large, salty and deep in many places."}]
    with Chat.from_history(smollm2, [{"role": "system", "content": SYSTEM}, *old], n_ctx=256, max_tokens=16,
                           truncate=True, **GREEDY) as chat:
        reply = chat.submit("Thanks!")
        assert reply.dropped > 0 and reply.dropped % 2 == 0
        history = chat.history
        assert history[0] == {"role": "system", "content": SYSTEM}
        assert history[1]["role"] == "user" and history[-2:][0]["content"] == "Thanks!"
        assert len(history) == 1 + len(old) - reply.dropped + 2
        assert reply.prompt_tokens + 16 <= chat.n_ctx
    with Chat(smollm2, SYSTEM, n_ctx=64, truncate=True, **GREEDY) as chat:
        with pytest.raises(ContextOverflowError, match="shorten"):
            chat.submit("word " * (chat.n_ctx + 10))


# ---- bad inputs: a typed error that says what to do, and the chat still works ----

@pytest.mark.parametrize("messages,match", [
    ([{"content": "no role"}], "has no 'role'"),
    ([{"role": "user"}], "has no 'content'"),
    ([{"role": 5, "content": "x"}], "one of system, user, assistant"),
    ([{"role": "wizard", "content": "x"}], "one of system, user, assistant"),
    ([{"role": "user", "content": None}], "content must be a str"),
    (["just a string"], "must be a dict"),
    ("not a list", "must be a list"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "only come first"),
])
def test_bad_history_raises_and_the_chat_still_works(smollm2, messages, match):
    with Chat(smollm2, SYSTEM, max_tokens=4, **GREEDY) as chat:
        with pytest.raises(InvalidParameterError, match=match):
            chat.load_history(messages)
        assert chat.history == [{"role": "system", "content": SYSTEM}]
        assert chat.submit("Hi").generated_tokens >= 1


@pytest.mark.parametrize("text,options,match", [
    ("", {}, "empty"),
    ("   \n", {}, "empty"),
    (None, {}, "must be a str"),
    ("Hi", {"temperature": -1}, "temperature"),
    ("Hi", {"max_tokens": 0}, "max_tokens"),
    ("Hi", {"stop": 5}, "stop must be"),
    ("Hi", {"temprature": 0.5}, "unknown option"),
])
def test_bad_turn_raises_and_the_next_turn_works(smollm2, text, options, match):
    with Chat(smollm2, SYSTEM, max_tokens=4, **GREEDY) as chat:
        with pytest.raises(InvalidParameterError, match=match):
            chat.submit(text, **options)
        with pytest.raises(InvalidParameterError, match=match):
            chat.stream(text, **options)  # checked at the call, not at the first piece
        assert len(chat.history) == 1
        assert chat.submit("Hi").generated_tokens >= 1


def test_bad_chat_arguments_raise(smollm2):
    with pytest.raises(InvalidParameterError, match="system_prompt"):
        Chat(smollm2, "   ", **GREEDY)
    with pytest.raises(InvalidParameterError, match="model must be"):
        Chat(42)
    with pytest.raises(InvalidParameterError, match="temperature"):
        Chat(smollm2, temperature=-2)


def test_a_closed_chat_says_so(smollm2):
    chat = Chat(smollm2, SYSTEM, max_tokens=4, **GREEDY)
    chat.close()
    chat.close()  # twice is fine
    assert chat.closed
    for call in (lambda: chat.submit("Hi"), lambda: chat.stream("Hi"), chat.reset,
                 lambda: chat.load_history([])):
        with pytest.raises(ClosedError, match="create a new Chat"):
            call()
    with Chat(smollm2, SYSTEM, max_tokens=4, **GREEDY) as chat:
        assert chat.submit("Hi").generated_tokens >= 1


def test_a_second_stream_while_one_is_open_is_refused(smollm2):
    with Chat(smollm2, SYSTEM, max_tokens=50, **GREEDY) as chat:
        first = chat.stream("Write a long story about a cat.")
        next(first)
        with pytest.raises(InvalidParameterError, match="still streaming"):
            chat.submit("Hi")
        first.close()
        assert chat.last.finish_reason == "abort"
        assert chat.submit("Hi", max_tokens=4).generated_tokens >= 1


def test_chat_owns_a_model_given_by_path(smollm2_path):
    with Chat(smollm2_path, SYSTEM, max_tokens=24, **GREEDY) as chat:
        assert "Paris" in chat.submit("What is the capital of France?").text
        model = chat.model
    assert model.closed


# ---- speculative decoding through Chat ----

def test_chat_with_a_draft_or_prompt_lookup_replies_as_without(smollm2):
    pytest.importorskip("llmplace.speculative")
    with Chat(smollm2, SYSTEM, max_tokens=24, **GREEDY) as plain:
        expected = [plain.submit(q).text for q in ("What is the capital of France?", "And of Italy?")]
    for speculation in (dict(draft=smollm2, depth=3), dict(lookup=True)):
        with Chat(smollm2, SYSTEM, max_tokens=24, **speculation, **GREEDY) as chat:
            got = [chat.submit(q).text for q in ("What is the capital of France?", "And of Italy?")]
            assert got == expected, speculation
            assert chat.last.speculative is not None


# ---- the REPL ----

def run_cli(*args: str, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    # From outside the checkout, as tests/test_cli.py does (the source folder has no compiled module).
    # One thread: ggml's spinning thread pools crawl when the shared 2-core machine is oversubscribed.
    return subprocess.run([sys.executable, "-m", "llmplace.cli", *args, "--threads", "1"], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=Path(tempfile.gettempdir()))


def test_repl_streams_replies_runs_its_commands_and_reports_errors(smollm2_path, tmp_path):
    saved = tmp_path / "conversation.json"
    script = (f"What is the capital of France?\n/stats\n/save {saved}\n/save\n/nonsense\n"
              + "word " * 600 + "\n"           # longer than the context: reported, and the chat goes on
              + "/reset\n/stats\nWhat is the capital of France?\n/quit\nnever read\n")
    out = run_cli("chat", str(smollm2_path), "--max-tokens", "24", "--ctx", "512", stdin=script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Paris") == 2
    assert "KV cache:" in out.stderr and "evaluated" in out.stderr
    assert "usage: /save FILE" in out.stderr and "commands: /reset" in out.stderr
    assert "llmplace: the conversation with this message is" in out.stderr and "shorten" in out.stderr
    assert "[conversation cleared]" in out.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert "Paris" in messages[2]["content"]
    assert "Traceback" not in out.stderr


def test_repl_ctrl_c_stops_the_reply_and_the_chat_goes_on(smollm2_path):
    process = subprocess.Popen([sys.executable, "-m", "llmplace.cli", "chat", str(smollm2_path), "--max-tokens", "400",
                                "--ctx", "1024", "--threads", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=Path(tempfile.gettempdir()))
    try:
        process.stdin.write(b"Write a very long story about a cat.\n")
        process.stdin.flush()
        assert process.stdout.read(20)  # the reply is streaming
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(b"/stats\nWhat is the capital of France?\n", timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    err = err.decode()
    assert process.returncode == 0, err
    assert b" [stopped]\n" in out and b"Paris" in out.split(b" [stopped]\n", 1)[1]
    assert "(abort)" in err and "Traceback" not in err


def test_abort_during_a_long_prompt_stops_the_decode(smollm2):
    import time

    with Chat(smollm2, SYSTEM, n_ctx=4096, max_tokens=8, **GREEDY) as chat:
        def abort_soon():
            while not chat.streaming:
                time.sleep(0.001)
            time.sleep(0.2)
            chat.abort()

        thread = threading.Thread(target=abort_soon)
        thread.start()
        long_message = "Summarise this: " + "the cat sat on the mat and looked at the sea. " * 300
        start = time.perf_counter()
        reply = chat.submit(long_message)
        thread.join()
        assert reply.finish_reason == "abort" and reply.text == ""
        # Stopped inside the prompt's llama_decode: only part of it reached the cache, and quickly.
        assert chat.n_cached < reply.prompt_tokens
        assert time.perf_counter() - start < 0.2 + 5
        chat.reset()
        _assert_consistent(chat, smollm2)


def test_speculation_arguments_are_checked_when_the_chat_is_made(smollm2, gemma3):
    pytest.importorskip("llmplace.speculative")
    from llmplace.errors import IncompatibleDraftError

    with pytest.raises(IncompatibleDraftError, match="token"):
        Chat(smollm2, draft=gemma3, **GREEDY)
    with pytest.raises(InvalidParameterError, match="depth"):
        Chat(smollm2, lookup=True, depth=0, **GREEDY)
    with pytest.raises(InvalidParameterError, match="not both"):
        Chat(smollm2, draft=smollm2, lookup=True, **GREEDY)
    with pytest.raises(InvalidParameterError, match="repetition penalties"):
        Chat(smollm2, lookup=True, repeat_penalty=1.1, **GREEDY)
    with Chat(smollm2, SYSTEM, lookup=True, max_tokens=8, **GREEDY) as chat:
        with pytest.raises(InvalidParameterError, match="repetition penalties"):
            chat.submit("Hi", repeat_penalty=1.2)
        assert chat.submit("Hi").generated_tokens >= 1


def test_repl_with_a_draft_model_reports_its_acceptance(smollm2_path):
    pytest.importorskip("llmplace.speculative")
    out = run_cli("chat", str(smollm2_path), "--draft", str(smollm2_path), "--depth", "3", "--max-tokens", "24",
                  stdin="What is the capital of France?\n/stats\n")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "speculative:" in out.stderr and "accepted" in out.stderr


def test_abort_with_a_draft_model_stops_the_reply(smollm2):
    pytest.importorskip("llmplace.speculative")
    with Chat(smollm2, SYSTEM, draft=smollm2, depth=3, max_tokens=200, **GREEDY) as chat:
        text = ""
        for piece in chat.stream("Write a long story about a cat."):
            text += piece
            if len(text) > 20:
                chat.abort()
        assert chat.last.finish_reason == "abort" and chat.last.generated_tokens < 200
        assert chat.history[-1]["content"] == text
        assert chat.submit("Hi", max_tokens=4).finish_reason in ("stop", "length")


def test_chat_names_are_exported():
    assert llmplace.Chat is Chat and llmplace.format_chat is format_chat
    assert issubclass(llmplace.TemplateError, llmplace.InvalidParameterError)
    assert {"Chat", "Reply", "TemplateError", "format_chat"} <= set(llmplace.__all__)
