"""Security (issue 17, class 6), outside the server (tests/test_adversarial_server.py has the server):

- LlamaDiskCache never executes what it finds in its folder: a planted pickle whose unpickling would create a
  file is skipped unopened, and damaged entries (truncated, altered bytes, a forged header, garbage) are refused
  with a warning instead of reaching llama.cpp or crashing. An entry forged with a valid checksum whose state
  llama.cpp refuses makes the completion warn, drop it and compute the prompt (the uncached text).
- Chat templates render under limits: huge ranges, nested loops, repetition, formatting widths, recursion,
  big numbers and output floods end in a TemplateError within a few seconds, never an untyped
  MemoryError/RecursionError/OverflowError or a hang; in the drop-in's Jinja2ChatFormatter too.

Each batch runs in a subprocess of its own (tests/adversarial.py): a crash or hang fails its case, not pytest.
"""

from __future__ import annotations

from adversarial import outcomes, summary

# ---- LlamaDiskCache ----
CACHE_SETUP = """
import hashlib, json, os, pickle, struct, tempfile, pathlib
import numpy as np
from llmplace.compat import LlamaDiskCache, LlamaState

folder = pathlib.Path(tempfile.mkdtemp())
marker = folder / "PWNED"

class Payload:  # unpickling this runs open(marker, "w"): the file appears if anything unpickles
    def __reduce__(self):
        return (open, (str(marker), "w"))

planted = folder / ("0" * 32 + ".llamastate")
planted.write_bytes(pickle.dumps(([1, 2, 3], Payload())))
(folder / ("1" * 32 + ".llamastate")).write_bytes(pickle.dumps(Payload()))  # the payload at the top level

def state(tokens, blob=b"\\x05\\x00\\x00\\x00llama" + bytes(range(200))):
    return LlamaState(np.asarray(tokens, dtype=np.intc), np.empty((0, 7), dtype=np.single), len(tokens), blob,
                      len(blob), 42)

def written(tokens):
    '''A fresh folder with one real entry for tokens; returns (folder, the entry's path).'''
    where = pathlib.Path(tempfile.mkdtemp())
    LlamaDiskCache(str(where))[tokens] = state(tokens)
    return where, next(where.glob("*.llamastate"))

def damaged(change):
    '''Write an entry, change its bytes, and look it up from a new cache: what the lookup gives.'''
    where, path = written([7, 8, 9])
    path.write_bytes(change(path.read_bytes()))
    try:
        return LlamaDiskCache(str(where))[[7, 8, 9]].n_tokens
    except KeyError:  # what a lookup that finds nothing usable raises (the completion then runs uncached)
        return "refused"

def forged_header(edit):
    '''Rewrite the JSON header (fixing the length prefix, keeping the checksum valid for the payload).'''
    def change(data):
        n = struct.unpack_from("<I", data, 8)[0]
        header = json.loads(data[12:12 + n])
        edit(header)
        raw = json.dumps(header).encode()
        return data[:8] + struct.pack("<I", len(raw)) + raw + data[12 + n:]
    return damaged(change)

def rechecksummed(change_payload):
    '''Alter the payload and recompute its checksum: an attacker who knows the format.'''
    def change(data):
        n = struct.unpack_from("<I", data, 8)[0]
        header = json.loads(data[12:12 + n])
        payload = change_payload(data[12 + n:])
        header["sha256"] = hashlib.sha256(payload).hexdigest()
        raw = json.dumps(header).encode()
        return data[:8] + struct.pack("<I", len(raw)) + raw + payload
    return damaged(change)

def planted_is_inert():
    cache = LlamaDiskCache(str(folder))
    found = [1, 2, 3] in cache
    try:
        cache[[1, 2, 3]]
    except KeyError:
        pass
    return ("ran" if marker.exists() else "inert", found)

def roundtrip():
    where, _ = written([4, 5, 6])
    got = LlamaDiskCache(str(where))[[4, 5, 6, 99]]
    return (got.input_ids.tolist(), got.n_tokens, got.seed, got.scores.shape, got.llama_state[:9])
"""

CACHE_CASES = {
    "planted_pickle_is_never_unpickled": "planted_is_inert()",
    "roundtrip_of_a_good_entry": "roundtrip()",
    "truncated_in_the_payload": "damaged(lambda d: d[:-10])",
    "truncated_in_the_header": "damaged(lambda d: d[:20])",
    "truncated_to_nothing": "damaged(lambda d: b'')",
    "one_state_byte_flipped": "damaged(lambda d: d[:-1] + bytes([d[-1] ^ 0xFF]))",
    "garbage_file": "damaged(lambda d: os.urandom(4096))",
    "header_length_huge": "damaged(lambda d: d[:8] + struct.pack('<I', 0xFFFFFFFF) + d[12:])",
    "header_not_json": ("damaged(lambda d: d[:12] + b'\\xff' * (struct.unpack_from('<I', d, 8)[0])"
                        " + d[12 + struct.unpack_from('<I', d, 8)[0]:])"),
    "header_deeply_nested": "damaged(lambda d: d[:8] + struct.pack('<I', 200000) + b'[' * 100000 + b']' * 100000)",
    "header_state_size_inflated": "forged_header(lambda h: h.update(state_size=h['state_size'] + 10**12))",
    "header_key_not_ints": "forged_header(lambda h: h.update(key=['a', None, 1.5]))",
    "header_key_huge_ints": "forged_header(lambda h: h.update(key=[7, 8, 10**30]))",
    "header_wrong_version": "forged_header(lambda h: h.update(version=99))",
    "header_scores_shape_negative": "forged_header(lambda h: h.update(scores_shape=[-1, -4]))",
    "header_n_tokens_beyond_ids": "forged_header(lambda h: h.update(n_tokens=10**6))",
    "header_is_a_list": "forged_header(lambda h: (h.clear(), None))",
    "state_arch_altered_with_a_fresh_checksum": "rechecksummed(lambda p: p[:16] + b'qwen3' + p[21:])",
}


def test_the_disk_cache_runs_no_planted_code_and_refuses_damaged_entries():
    results = outcomes(CACHE_SETUP, CACHE_CASES)
    print(summary(results))
    assert all(r.kind == "ok" for r in results.values()), summary(results)
    assert results["planted_pickle_is_never_unpickled"].message == "('inert', False)"
    assert results["roundtrip_of_a_good_entry"].message == \
        "([4, 5, 6], 3, 42, (0, 7), b'\\x05\\x00\\x00\\x00llama')"
    refused = [name for name in CACHE_CASES if name not in ("planted_pickle_is_never_unpickled",
                                                             "roundtrip_of_a_good_entry")]
    # The lookup never returns a damaged entry's state.
    assert {name: results[name].message for name in refused} == dict.fromkeys(refused, "'refused'"), \
        summary(results)


REAL_STATE_SETUP = """
import hashlib, json, struct, tempfile, pathlib, warnings
import llmplace
from llmplace.compat import LlamaDiskCache
from llmplace.compat.llama_cache import _StateFile

FIRST, LONGER = "The capital of France is", "The capital of France is a city"
folder = pathlib.Path(tempfile.mkdtemp())
llm = llmplace.Llama(PATH, verbose=False, n_ctx=256, n_threads=1)
uncached = llm(LONGER, max_tokens=4, temperature=0)["choices"][0]["text"]
llm.reset()
llm.set_cache(LlamaDiskCache(str(folder)))
llm(FIRST, max_tokens=4, temperature=0)
entry = next(folder.glob("*.llamastate"))
good = entry.read_bytes()

def complete_longer_with_a_new_cache():
    '''LONGER (which shares FIRST's tokens with the entry) from an empty context, with a new cache over the
    folder: (equal to the uncached completion, the RuntimeWarnings it gave).'''
    llm.reset()
    llm.set_cache(LlamaDiskCache(str(folder)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = llm(LONGER, max_tokens=4, temperature=0)["choices"][0]["text"]
    return text == uncached, [str(w.message) for w in caught if w.category is RuntimeWarning]

def with_state(change):
    '''Replace the real entry's llama.cpp state bytes (checksum recomputed), alone in the folder, then complete
    a longer prompt with a new cache over the folder: the state reaches llama_state_set_data, which refuses
    it. The completion must warn once, delete the entry and compute the prompt; a second completion loads the
    state the first one cached, without a warning. Returns (first equal to uncached, its warnings, they say
    why, the forged file still there, second equal, its warnings).'''
    for other in folder.glob("*.llamastate"):
        other.unlink()
    n = struct.unpack_from("<I", good, 8)[0]
    header = json.loads(good[12:12 + n])
    start = 12 + n + 4 * header["input_ids"]
    state = change(good[start:])
    payload = good[12 + n:start] + state
    # a forger who knows the format: the header agrees with the bytes, so only llama.cpp can refuse them
    header.update(state_size=len(state), sha256=hashlib.sha256(payload).hexdigest(),
                  arch=_StateFile.state_arch(state))
    raw = json.dumps(header).encode()
    entry.write_bytes(good[:8] + struct.pack("<I", len(raw)) + raw + payload)
    same, warned = complete_longer_with_a_new_cache()
    kept = entry.exists()
    again, warned_again = complete_longer_with_a_new_cache()
    return (same, len(warned), all("unusable and is ignored" in w for w in warned), kept, again,
            len(warned_again))
""".replace("PATH", "{path!r}")

REAL_STATE_CASES = {
    "state_cut_in_half": "with_state(lambda s: s[:len(s) // 2])",
    "state_cell_count_huge": "with_state(lambda s: s[:9] + b'\\xff\\xff\\xff\\x7f' + s[13:])",
    "state_arch_length_huge": "with_state(lambda s: b'\\xff\\xff\\xff\\xff' + s[4:])",
    "state_zeroed_after_the_arch": "with_state(lambda s: s[:9] + bytes(len(s) - 9))",
    "state_random_tail": "with_state(lambda s: s[:64] + bytes((i * 37) % 251 for i in range(len(s) - 64)))",
}


def test_forged_states_with_valid_checksums_fall_back_to_computing_the_prompt(smollm2_path):
    """Past the file checks, llama.cpp's own state reader sees the bytes: it must refuse, not crash, and the
    completion goes on without the cache (a RuntimeWarning, the entry dropped, the uncached greedy text)."""
    results = outcomes(REAL_STATE_SETUP.format(path=str(smollm2_path)), REAL_STATE_CASES)
    print(summary(results))
    assert {name: (r.kind, r.message) for name, r in results.items()} == \
        dict.fromkeys(REAL_STATE_CASES, ("ok", "(True, 1, True, False, True, 0)")), summary(results)


# ---- chat templates ----
TEMPLATE_SETUP = """
import time
import llmplace
from llmplace.chat_template import format_chat

model = llmplace.load({path!r}, vocab_only=True, progress=False)
MESSAGES = [{{"role": "user", "content": "hi"}}]
LONG = [{{"role": "user", "content": "x" * 3000000}}]  # a long message: within limits by itself

def render(template, messages=MESSAGES):
    started = time.monotonic()
    try:
        return format_chat(model, messages, template=template)
    finally:
        if time.monotonic() - started > 15:
            raise SystemExit("took %.1f s" % (time.monotonic() - started))  # a near-hang: fails as untyped
"""

TEMPLATES = {
    # loops and ranges
    "nested_range_1e10": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "range_1e10_as_list": "{{ range(10**10)|list }}",
    "range_1e12_length": "{{ range(10**12)|length }}",
    "slow_body_in_a_loop": "{% for i in range(99999) %}{{ range(99999)|list|sort|length }}{% endfor %}",
    "loop_over_a_big_repeat": "{% for c in 'x' * 3000000 %}{% for d in 'y' * 3000000 %}{% endfor %}{% endfor %}",
    "map_over_a_huge_slice": "{{ [1, 2]|slice(10**9)|list }}",
    "batch_fill_huge": "{{ [1]|batch(10**9, 'x')|list }}",
    "lipsum_huge": "{{ lipsum(10**9) }}",
    "sum_of_lists_quadratic": "{{ ([[1]] * 100000)|sum(start=[]) }}",
    # repetition, numbers
    "string_repeat_1e10": "{{ 'x' * 10**10 }}",
    "list_repeat_1e9": "{{ [1] * 10**9 }}",
    "content_repeat": "{{ messages[0].content * 10**9 }}",
    "list_repeat_of_a_range": "{{ (range(100000)|list) * 100000 }}",
    "integer_power_huge": "{{ 10 ** 100000000 }}",
    "integer_product_squaring": "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
                                "{% endfor %}{{ ns.x }}",
    "integer_too_long_to_print": "{{ 2 ** 60000 }}",
    "float_overflow": "{{ 10.0 ** 400 }}",
    "division_by_zero": "{{ 1 / 0 }}",
    # formatting widths
    "percent_width": "{{ '%0999999999d' % 1 }}",
    "percent_star_width": "{{ '%*d' % (10**9, 1) }}",
    "percent_precision": "{{ '%.999999999f' % 1.0 }}",
    "format_filter_width": "{{ '%999999999s'|format('x') }}",
    "str_format_width": "{{ '{:>999999999}'.format(1) }}",
    "str_format_nested_width": "{{ '{:{w}}'.format(1, w=10**9) }}",
    "str_format_map_width": "{{ '{a:>999999999}'.format_map({'a': 1}) }}",
    "center_filter": "{{ 'x'|center(10**10) }}",
    "ljust_method": "{{ 'x'.ljust(10**10) }}",
    "zfill_method": "{{ '1'.zfill(10**10) }}",
    "expandtabs_method": "{{ ('\\t' * 1000).expandtabs(10**6) }}",
    "indent_filter": "{{ ('x\\n' * 1000)|indent(10**6) }}",
    "replace_method_empty": "{{ ('x' * 100000).replace('', 'y' * 100000) }}",
    "replace_filter_empty": "{{ ('x' * 1000)|replace('', 'y' * 1000000) }}",
    "tojson_indent": "{{ messages|tojson(indent=10**9) }}",
    "wordwrap_zero": "{{ 'a b c'|wordwrap(0) }}",
    # growth by doubling, output floods
    "doubling_by_tilde": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                         "{% endfor %}{{ ns.s|length }}",
    "doubling_by_plus": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s|length }}",
    "doubling_by_join": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s]|join %}"
                        "{% endfor %}{{ ns.s|length }}",
    "doubling_by_macro": "{% macro d(s) %}{{ s }}{{ s }}{% endmacro %}{% set ns = namespace(s='x') %}"
                         "{% for i in range(64) %}{% set ns.s = d(ns.s) %}{% endfor %}{{ ns.s|length }}",
    "doubling_by_set_block": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set b %}{{ ns.s }}{{ ns.s }}"
                             "{% endset %}{% set ns.s = b %}{% endfor %}{{ ns.s|length }}",
    "output_flood": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "output_flood_of_one_big_value": "{% set big = 'x' * 3000000 %}{% for i in range(1000) %}{{ big }}{% endfor %}",
    # recursion
    "macro_recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "macro_binary_recursion": "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
                              "{{ f(0) }}",
    "recursive_loop": "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    "block_self_recursion": "{% block a %}{{ self.a() }}{% endblock %}",
    "caller_recursion": "{% macro m() %}{{ caller() }}{% endmacro %}{% macro f() %}{% call m() %}{{ f() }}"
                        "{% endcall %}{% endmacro %}{{ f() }}",
}
# Sources that stress the parser and Python's compiler: built in the case's process (too big for its argv).
BIG_TEMPLATES = {
    "parentheses_100k_deep": "'{{ ' + '(' * 100000 + '1' + ')' * 100000 + ' }}'",
    "not_100k_deep": "'{{ ' + 'not ' * 100000 + '1 }}'",
    "filters_100k_chained": "\"{{ 'x'\" + '|upper' * 100000 + ' }}'",
    "for_loops_1000_nested": "'{% for i in [1] %}' * 1000 + '{% endfor %}' * 1000",
    "source_of_2_mb": "'{{ 1 }}' + 'x' * (2 << 20)",
    "list_literal_of_a_million": "'{{ [' + '1,' * 1000000 + '] | length }}'",
    # a small list holding one long message many times: its text would be built in one C call
    "repeated_long_message_as_text": "'{{ messages * 100000 }}', LONG",
    "repeated_long_message_tojson": "'{{ (messages * 100000)|tojson }}', LONG",
    "repeated_long_message_formatted": "\"{{ '%s' % [messages * 100000] }}\", LONG",
    "repeated_long_message_joined": "'{{ (messages * 100000)|join }}', LONG",
    "list_nested_100k_as_text": "'{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}'"
                                " '{% endfor %}{{ ns.x }}'",
}


def test_hostile_chat_templates_raise_template_error_quickly(smollm2_path):
    import time

    started = time.monotonic()
    cases = {name: f"render({source!r})" for name, source in TEMPLATES.items()}
    cases.update({name: f"render({source})" for name, source in BIG_TEMPLATES.items()})
    results = outcomes(TEMPLATE_SETUP.format(path=str(smollm2_path)), cases, timeout=240)
    print(summary(results))
    print(f"{len(cases)} template cases in {time.monotonic() - started:.1f} s")
    assert {name: (r.kind, r.error) for name, r in results.items()} == \
        dict.fromkeys(cases, ("typed", "TemplateError")), summary(results)


def test_templates_within_the_limits_still_render(smollm2):
    from llmplace.chat_template import format_chat

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    template = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m.role|upper }}: {{ m.content }}"
                "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}|{{ range(3)|join(',') }}|{{ '%05d' % 42 }}|"
                "{{ '{:>4}'.format(7) }}|{{ 'ab' * 3 }}|{{ 2 ** 10 }}|{{ messages|tojson(indent=1)|length > 10 }}|"
                "{{ 'x'|center(5) }}|{{ [1, 2, 3]|map('string')|join('-') }}|{{ range(100000)|list|length }}")
    assert format_chat(smollm2, messages, template=template) == \
        "1/2 USER: hi\n2/2 ASSISTANT: hello|0,1,2|00042|   7|ababab|1024|True|  x  |1-2-3|100000"


# ---- the drop-in's Jinja2ChatFormatter (llama-cpp-python's class): the same limits ----
NATIVE_SETUP = """
import time
import llmplace
from llmplace.chat_tools import ChatTemplates

MESSAGES = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "x" * 3000000}]

def render(template, messages=MESSAGES):
    started = time.monotonic()
    try:
        with ChatTemplates(None, template=template) as templates:
            return templates.render(messages).prompt
    finally:
        if time.monotonic() - started > 15:
            raise SystemExit("took %.1f s" % (time.monotonic() - started))  # a near-hang: fails as untyped
"""


def test_hostile_templates_never_reach_llama_cpps_chat_layer():
    """Chat with tools or reasoning and the drop-in's chat render through llama.cpp's C++ Jinja engine, which has
    no limits: a recursive macro overflowed its stack (the process died), nested loops never returned. Every
    hostile template is refused before it gets there, or renders there harmlessly."""
    cases = {name: f"render({source!r})" for name, source in TEMPLATES.items()}
    cases.update({name: f"render({source})" for name, source in BIG_TEMPLATES.items()})
    results = outcomes(NATIVE_SETUP, cases, timeout=240)
    print(summary(results))
    assert all(r.kind in ("typed", "ok") for r in results.values()), summary(results)
    for name in ("macro_recursion", "nested_range_1e10"):
        assert (results[name].kind, results[name].error) == ("typed", "TemplateError"), summary(results)


FORMATTER_SETUP = """
import time
from llmplace.compat.llama_chat_format import Jinja2ChatFormatter

MESSAGES = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "x" * 3000000}]

def render(template, messages=MESSAGES):
    started = time.monotonic()
    try:
        return Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(messages=messages).prompt
    finally:
        if time.monotonic() - started > 15:
            raise SystemExit("took %.1f s" % (time.monotonic() - started))  # a near-hang: fails as untyped
"""
# Ordinary template bugs rather than exhaustion: the formatter raises what llama-cpp-python's raises.
PLAIN_FAILURES = {"division_by_zero": "ZeroDivisionError", "wordwrap_zero": "ValueError"}


def test_hostile_templates_in_the_drop_in_chat_formatter_raise_template_error_quickly():
    cases = {name: f"render({source!r})" for name, source in TEMPLATES.items()}
    cases.update({name: f"render({source})" for name, source in BIG_TEMPLATES.items()})
    results = outcomes(FORMATTER_SETUP, cases, timeout=240)
    print(summary(results))
    expected = {name: ("untyped", PLAIN_FAILURES[name]) if name in PLAIN_FAILURES else ("typed", "TemplateError")
                for name in cases}
    assert {name: (r.kind, r.error) for name, r in results.items()} == expected, summary(results)


def test_the_drop_in_chat_formatter_still_renders_templates_within_the_limits():
    import pytest

    from llmplace.compat.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "héllo"}]
    template = ("{{ bos_token }}{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m.role|upper }}: "
                "{{ m.content }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}|{{ '%05d' % 42 }}|"
                "{{ messages[1]|tojson }}|{{ range(100000)|list|length }}{{ eos_token }}")
    response = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(messages=messages)
    assert response.prompt == ('<s>1/2 USER: hi\n2/2 ASSISTANT: héllo|00042|{"role": "assistant", "content": '
                               '"héllo"}|100000</s>')
    assert response.stop == ["</s>"]
    refusing = Jinja2ChatFormatter("{{ raise_exception('no system role') }}", eos_token="", bos_token="")
    with pytest.raises(ValueError, match="^no system role$"):  # raise_exception's ValueError, as upstream's
        refusing(messages=messages)
