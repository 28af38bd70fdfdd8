"""Bounds on the tensor-name patterns of placement rules, checked before a pattern reaches std::regex.

libstdc++'s std::regex (what llama.cpp and the shim match placement patterns with) compiles and matches by
recursion and backtracking, with no limit of its own:
- a long pattern or deep nesting overflows the C stack while compiling (a 30k-deep group, a 300k-character
  literal: SIGSEGV; on a thread with a small stack already at a few thousand characters);
- a pattern with nested or stacked quantifiers backtracks for minutes on every tensor name (`(.*)*x`,
  `([a-z._0-9]+)+!`, `.*.*.*.*!`);
- a NUL byte ends the C string, silently matching with a shorter pattern than the one given.

So a pattern is refused, with PlacementError naming the rule it breaks, when it is longer than MAX_PATTERN_CHARS,
nests groups deeper than MAX_GROUP_DEPTH, repeats more than MAX_REPEAT times, expands to more than MAX_STATES
regex states, or when an upper bound of the paths a
backtracking matcher can try on a tensor name (names are at most 63 bytes) exceeds MAX_MATCH_PATHS. The bound is
computed from the pattern's structure alone (`_Estimate`), so it is deterministic and costs microseconds; it over-
estimates, so a refused pattern may run quickly in practice: the message says how to write it more simply
(structured selectors: layers=, role=, or several rules).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PlacementError

MAX_PATTERN_CHARS = 1024  # a 4k-character literal already overflows a 256 KiB thread stack in std::regex
MAX_GROUP_DEPTH = 16
MAX_REPEAT = 1000         # a{n} is compiled into n copies of its body
MAX_MATCH_PATHS = 1_000_000
NAME_CHARS = 64           # tensor names are at most 63 bytes (GGML_MAX_NAME), plus the empty end position
# A variable-width item followed by a literal character can only end where that character occurs: in a tensor
# name a character repeats a handful of times ('blk.10.ffn_gate_exps.weight': '.' 3 times, 'e' 4 times).
LITERAL_OCCURRENCES = 8
_CAP = 10 ** 30           # estimates beyond any budget are kept at this

HOW_TO_FIX = ("write a simpler pattern (e.g. 'blk\\.\\d+\\.ffn_.*_exps' instead of nested or stacked "
              "quantifiers), split it into several rules, or select with Rule(layers=..., role=..., dtype=...)")


@dataclass(frozen=True)
class _Estimate:
    """What one piece of a pattern can do: `paths`, an upper bound of the ways a backtracking matcher can
    match it from one position; the fewest and most characters it consumes; `literal`, whether it is one
    fixed character (which prunes the paths of a variable-width item just before it); `states`, its
    compiled size."""

    paths: int
    min_len: int
    max_len: int
    literal: bool = False
    states: int = 1     # roughly the NFA states std::regex builds for it (a{n} holds n copies of a)


_CHAR = _Estimate(1, 1, 1, literal=True)
_CLASS = _Estimate(1, 1, 1)
_EMPTY = _Estimate(1, 0, 0)
MAX_STATES = 10_000  # the shim compiles the pattern once per tensor name: keep each compile small


def _refuse(pattern: str, rule: str) -> PlacementError:
    shown = pattern if len(pattern) <= 80 else pattern[:60] + f"... ({len(pattern)} characters)"
    return PlacementError(f"tensor pattern {shown!r} is refused: {rule}; {HOW_TO_FIX}")


def check_pattern(pattern) -> None:
    """Raise PlacementError if `pattern` could crash or stall std::regex (see the module docstring)."""
    if not isinstance(pattern, str):
        raise PlacementError(f"a tensor pattern must be a str (a regular expression), not {type(pattern).__name__}")
    if "\0" in pattern:
        raise _refuse(pattern.replace("\0", "\\0"), "it holds a NUL byte, which would cut it short where "
                                                    "llama.cpp reads it")
    if len(pattern.encode("utf-8", errors="surrogatepass")) > MAX_PATTERN_CHARS:
        raise _refuse(pattern, f"it is longer than {MAX_PATTERN_CHARS} bytes (tensor names are at most 63)")
    depth = _group_depth(pattern)
    if depth > MAX_GROUP_DEPTH:
        raise _refuse(pattern, f"it nests groups {depth} deep (at most {MAX_GROUP_DEPTH})")
    estimate = _Parser(pattern).parse()
    if estimate.states > MAX_STATES:
        raise _refuse(pattern, f"its repetitions expand to about {estimate.states} regex states (at most "
                               f"{MAX_STATES})")
    paths = min(estimate.paths * NAME_CHARS, _CAP)  # regex_search tries every start position
    if paths > MAX_MATCH_PATHS:
        raise _refuse(pattern, f"matching it can backtrack through about {_magnitude(paths)} paths per tensor "
                               f"name (at most {_magnitude(MAX_MATCH_PATHS)}), which can stall the load for "
                               "minutes")


def _magnitude(n: int) -> str:
    return f"10^{len(str(n)) - 1}"


def _group_depth(pattern: str) -> int:
    """The deepest group nesting, counted without recursion (outside character classes, escapes skipped)."""
    depth = deepest = 0
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


class _Parser:
    """ECMAScript regex structure (as std::regex reads it), enough to bound backtracking; std::regex itself
    still judges validity afterwards. Recursion follows group nesting, bounded by MAX_GROUP_DEPTH."""

    def __init__(self, pattern: str) -> None:
        self.p, self.i = pattern, 0

    def parse(self) -> _Estimate:
        result = self._alternation()
        # an unbalanced ')' is left for std::regex to refuse; analyse the rest all the same
        while self.i < len(self.p):
            self.i += 1
            result = _sequence([result, self._alternation()])
        return result

    def _alternation(self) -> _Estimate:
        branches = [self._sequence()]
        while self.i < len(self.p) and self.p[self.i] == "|":
            self.i += 1
            branches.append(self._sequence())
        if len(branches) == 1:
            return branches[0]
        return _Estimate(min(sum(b.paths for b in branches), _CAP), min(b.min_len for b in branches),
                         max(b.max_len for b in branches), states=sum(b.states for b in branches) + 1)

    def _sequence(self) -> _Estimate:
        items = []
        while self.i < len(self.p) and self.p[self.i] not in "|)":
            atom = self._atom()
            items.append(self._quantified(atom))
        return _sequence(items)

    def _atom(self) -> _Estimate:
        p, c = self.p, self.p[self.i]
        self.i += 1
        if c == "(":
            lookahead = p.startswith("?=", self.i) or p.startswith("?!", self.i)
            if p.startswith("?:", self.i) or lookahead:
                self.i += 2
            inner = self._alternation()
            if self.i < len(p) and p[self.i] == ")":
                self.i += 1
            # a lookahead runs its whole body at this position and consumes nothing
            return _Estimate(inner.paths, 0, 0, states=inner.states) if lookahead else inner
        if c == "[":
            if self.i < len(p) and p[self.i] == "^":
                self.i += 1
            while self.i < len(p) and p[self.i] != "]":
                self.i += 2 if p[self.i] == "\\" else 1
            self.i += 1
            return _CLASS
        if c in "^$":
            return _EMPTY
        if c == ".":
            return _CLASS
        if c == "\\" and self.i < len(p):
            e = p[self.i]
            self.i += 1
            if e in "bB":
                return _EMPTY
            if e in "dDwWsS":
                return _CLASS
            if e in "123456789":  # a back-reference: any earlier capture, up to a whole name
                return _Estimate(1, 0, NAME_CHARS)
            return _CHAR
        return _CHAR

    def _quantified(self, atom: _Estimate) -> _Estimate:
        p = self.p
        if self.i >= len(p):
            return atom
        c = p[self.i]
        if c == "*":
            low, high = 0, None
            self.i += 1
        elif c == "+":
            low, high = 1, None
            self.i += 1
        elif c == "?":
            low, high = 0, 1
            self.i += 1
        elif c == "{":
            bounds = self._braces()
            if bounds is None:
                return atom
            low, high = bounds
        else:
            return atom
        if self.i < len(p) and p[self.i] == "?":  # lazy: tries the same paths in another order
            self.i += 1
        for count in (low, high):
            if count is not None and count > MAX_REPEAT:
                raise _refuse(p, f"it repeats {count} times (at most {MAX_REPEAT})")
        return _repeat(atom, low, high)

    def _braces(self) -> tuple[int, int | None] | None:
        """{n}, {n,} or {n,m} at self.i; None (and nothing consumed) if it is not a quantifier."""
        end = self.p.find("}", self.i)
        if end < 0:
            return None
        low, comma, high = self.p[self.i + 1:end].partition(",")
        if not low.isdigit() or not (high.isdigit() or not high):
            return None
        self.i = end + 1
        low_n = int(low) if len(low) <= 9 else MAX_REPEAT + 1
        if not comma:
            return low_n, low_n
        return low_n, (int(high) if len(high) <= 9 else MAX_REPEAT + 1) if high else None


def _sequence(items: list[_Estimate]) -> _Estimate:
    if not items:
        return _EMPTY
    paths, min_len, max_len, states = 1, 0, 0, 0
    for item, following in zip(items, items[1:] + [None]):
        item_paths = item.paths
        lengths = item.max_len - item.min_len + 1
        if following is not None and following.literal and lengths > LITERAL_OCCURRENCES:
            # the paths of each end position (at least one) times the few ends the literal lets through
            item_paths = min(item_paths, -(-item_paths // lengths) * LITERAL_OCCURRENCES)
        paths = min(paths * item_paths, _CAP)
        min_len, max_len = min_len + item.min_len, min(max_len + item.max_len, NAME_CHARS)
        states += item.states
    if len(items) == 1:
        return items[0]
    return _Estimate(paths, min_len, max_len, states=states)


def _repeat(body: _Estimate, low: int, high: int | None) -> _Estimate:
    states = min(body.states * max(low, high if high is not None else low + 1, 1), _CAP)
    if body.max_len == 0:  # repeating something that consumes nothing changes nothing
        return _Estimate(body.paths, 0, 0, states=states)
    most = NAME_CHARS // max(body.min_len, 1)
    high_n = most if high is None else min(high, most)
    if high_n < low:
        return _Estimate(1, low * body.min_len, low * body.min_len, states=states)  # longer than any name
    paths = 0
    for k in range(low, high_n + 1):
        paths = min(paths + body.paths ** k if body.paths < _CAP else _CAP, _CAP)
        if paths >= _CAP:
            break
    return _Estimate(max(paths, 1), body.min_len * low, min(NAME_CHARS, body.max_len * high_n), states=states)
