"""Placement patterns that crash or stall std::regex (issue 17, class 3): very long or deeply nested patterns
(stack overflow while compiling), backtracking patterns (minutes per load), NUL bytes (silently cut short).
Each must be refused with PlacementError naming the rule it breaks, before it reaches std::regex."""

from __future__ import annotations

import time

import pytest

from adversarial import outcomes, summary
from llmplace.errors import PlacementError
from llmplace.pattern_limits import check_pattern
from llmplace.placement import Placement, Rule

# Built inside the case's interpreter: the 300k-character patterns stay out of the command line.
CRASHING = {
    "nested_groups_30k": "'(' * 30000 + 'a' + ')' * 30000",
    "nested_groups_40": "'(' * 40 + 'a' + ')' * 40",
    "noncapturing_groups_20k": "'(?:' * 20000 + 'a' + ')' * 20000",
    "literal_300k": "'blk' * 100000",
    "classes_100k": "'[a-z]' * 100000",
    "alternation_60k": "'|'.join(['a'] * 60000)",
    "lookaheads_10k": "'(?=a)' * 10000",
    "nested_repeats_states": "'((((a{9}){9}){9}){9}){9}'",
    "repeat_count_huge": "'a{99999999999}'",
}
STALLING = {
    "star_of_star": r"(.*)*x",
    "plus_of_class_plus": r"([a-z._0-9]+)+!",
    "overlapping_alternation": r"(a|a)*!",
    "any_or_any": r"(.|.)*!",
    "stacked_stars": r".*.*.*.*.*.*!",
    "word_dot_groups": r"(\w+\.?)+$!",
    "double_plus": r"(x+x+)+y",
    "counted_star_group": r"(.*a){20}",
    "prefix_alternation": r"(a|aa)+",
    "triple_nesting": r"((a+)+)+",
    "optional_star": r"(x?)*y",
    "classes_stacked": r"[a-z]*[a-z]*[a-z]*[a-z]*!",
    "lazy_nested": r"(.*?)*?!",
    "lookahead_nested": r"(?=(a+)+!)",
}
NUL = {"nul_in_middle": "'blk\\x00.ffn'", "nul_at_end": "'exps\\x00'", "nul_only": "'\\x00'"}


def _cases() -> dict[str, str]:
    cases = {}
    for name, source in {**CRASHING, **NUL, **{k: repr(v) for k, v in STALLING.items()}}.items():
        cases[f"rule_{name}"] = f"Rule('cpu', pattern={source})"
    # every way in: a load with (pattern, target) pairs, llama.cpp's -ot string, explain
    for name in ("nested_groups_30k", "literal_300k", "nul_in_middle"):
        source = {**CRASHING, **NUL}[name]
        cases[f"load_{name}"] = f"llmplace.load(MODEL, placement=[({source}, 'cpu')], progress=False)"
    for name in ("star_of_star", "plus_of_class_plus", "stacked_stars"):
        cases[f"load_{name}"] = f"llmplace.load(MODEL, placement=[({STALLING[name]!r}, 'cpu')], progress=False)"
        cases[f"ot_{name}"] = f"llmplace.load(MODEL, placement={STALLING[name] + '=CPU'!r}, progress=False)"
    cases["explain_classes_100k"] = f"llmplace.explain(MODEL, placement=[({CRASHING['classes_100k']}, 'cpu')])"
    cases["pattern_not_a_string"] = "Rule('cpu', pattern=b'exps')"
    return cases


def test_patterns_that_crash_or_stall_std_regex_are_refused(tiny_llama_path):
    cases = _cases()
    started = time.monotonic()
    results = outcomes(f"from llmplace.placement import Rule\nMODEL = {str(tiny_llama_path)!r}\n", cases,
                       timeout=120)
    print(summary(results))
    assert {name: r.kind for name, r in results.items()} == dict.fromkeys(cases, "typed"), summary(results)
    assert all(r.error == "PlacementError" for r in results.values()), summary(results)
    assert time.monotonic() - started < 60  # refused up front, not after minutes of matching
    assert "NUL" in results["rule_nul_in_middle"].message
    assert "nests groups" in results["rule_nested_groups_40"].message
    assert "backtrack" in results["rule_star_of_star"].message
    assert len(results["rule_literal_300k"].message) < 600  # the pattern is not echoed whole


@pytest.mark.parametrize("pattern", [
    r"exps", r"\.ffn_(up|down|gate)_exps", r"blk\.(1[0-9]|2[0-9])\.", r"blk\.\d+\.ffn_.*_exps\.weight",
    r"^blk\.([0-9]|1[0-5])\.ffn_.*", r".*attn.*weight.*", r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps",
    r"^(?!output).*", r"[^.]+\.weight$", r"\d{1,2}", r"(?:attn_q|attn_k)\.weight",
    r"blk\.(" + "|".join(str(i) for i in range(128)) + r")\.ffn_up", r"a{1000}",
])
def test_ordinary_patterns_pass_the_limits(pattern):
    check_pattern(pattern)
    Rule("cpu", pattern=pattern)


def test_a_placement_of_ordinary_patterns_matches_as_before(tiny_llama_path):
    from llmplace.gguf_info import read

    tensors = read(tiny_llama_path).tensors
    placement = Placement.parse(r"blk\.\d+\.ffn_(up|down|gate)=CPU,.*attn.*weight.*=CPU")
    assigned = {a.tensor.name for a in placement.assign(tensors)}
    assert any(".ffn_up." in name for name in assigned) and any(".attn_q." in name for name in assigned)
    assert "token_embd.weight" not in assigned


def test_the_limit_messages_name_the_rule():
    with pytest.raises(PlacementError, match="longer than 1024"):
        check_pattern("a" * 1025)
    with pytest.raises(PlacementError, match="repeats 5000 times"):
        check_pattern("a{5000}")
    with pytest.raises(PlacementError, match="regex states"):
        check_pattern("((a{50}){50}){50}")
