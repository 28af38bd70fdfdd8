"""Jinja rendering under limits. Jinja's sandbox stops a template from escaping (no attributes starting with
'_', no unsafe callables) but not from exhausting the process: `range(10**5)` nested in itself loops 10**10
times, `'x' * 10**10` or `'{:>999999999}'.format(1)` asks for gigabytes, a macro that calls itself recurses.
A chat template comes from the model file, so llmplace renders it here: every loop iteration, call, filter
and generated item is a step charged to a per-render budget (steps and wall time), and every value that can
grow (repetition, concatenation, formatting widths, padding, integers, captured blocks, output) is checked
before or right after it is made. Past a limit, LimitExceeded.

How: an environment subclass whose parse step rewrites the template (for-loops iterate through a counting
wrapper, '~' and {% set %} blocks through bounded functions), with the sandbox's hooks for calls and
operators, and every builtin filter wrapped; no constant folding at compile time (optimized=False), where no
budget applies.
"""

from __future__ import annotations

import functools
import re
import string
import threading
import time
from functools import lru_cache

# Generous for any real chat template (they render in milliseconds, loop over the messages, and write a prompt
# no context could hold beyond a few million characters); small enough that no template exhausts the process.
RENDER_SECONDS = 5.0          # wall time of one render
MAX_TEMPLATE_CHARS = 1 << 20  # template source (real ones: a few KB to ~20 KB)
MAX_TEXT = 4_000_000          # characters of the output, and of any one string the template makes
MAX_ITEMS = 100_000           # items of any one list, range or generated sequence the template makes
MAX_STEPS = 2_000_000         # loop iterations + calls + filter calls + generated items in one render
MAX_INT_BITS = 1 << 16        # size of any integer the template computes
MAX_CALL_DEPTH = 64           # nested macro / function calls (real templates nest a few)
MAX_WIDTH = 10_000            # a width or precision in a format spec, a tojson/indent indentation


class LimitExceeded(Exception):
    """A template went past one of the limits above (chat_template and the drop-in's Jinja2ChatFormatter turn it
    into a TemplateError)."""


class _Budget:
    """What one render has spent so far (thread-local: renders in other threads have their own)."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.steps = 0
        self.depth = 0


_local = threading.local()


def _tick() -> None:
    """One unit of template work: fails once the render is out of steps or time."""
    budget = getattr(_local, "budget", None)
    if budget is None:
        return
    budget.steps += 1
    if budget.steps > MAX_STEPS:
        raise LimitExceeded(f"it took more than {MAX_STEPS} steps (loop iterations and calls)")
    if time.monotonic() > budget.deadline:
        raise LimitExceeded(f"it ran longer than {RENDER_SECONDS:g} s")


def _bounded(value):
    """Refuse a value the template made that is larger than the limits allow; return it otherwise."""
    if isinstance(value, (str, bytes)):
        if len(value) > MAX_TEXT:
            raise LimitExceeded(f"it made a string of {len(value)} characters (the limit is {MAX_TEXT})")
    elif isinstance(value, (list, tuple, dict, set, frozenset, range)):
        if len(value) > MAX_ITEMS:
            raise LimitExceeded(f"it made a sequence of {len(value)} items (the limit is {MAX_ITEMS})")
    elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise LimitExceeded(f"it computed an integer of {value.bit_length()} bits (the limit is {MAX_INT_BITS})")
    return value


def _check_text_size(value) -> None:
    """Before a container becomes text (output, str(), tojson, formatting): refuse one whose text would pass
    MAX_TEXT. A list can hold the same long string many times (['...' * 10**6] * 10**5 is small), and its
    repr or JSON would be built in one C call no step or deadline can interrupt. Iterative, stops early."""
    if not isinstance(value, (list, tuple, dict, set, frozenset)):
        return
    size, nodes, stack = 0, 0, [value]
    while stack:
        item = stack.pop()
        nodes += 1
        if isinstance(item, (str, bytes)):
            size += len(item) + 4
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
            size += 2
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
            size += 2
        else:
            size += 8
        if size > MAX_TEXT or nodes > MAX_ITEMS * 10:
            raise LimitExceeded(f"it turned a structure of more than {MAX_TEXT} characters into text")


class _Counted:
    """An iterable the template loops over or a filter generates: every item is a step, at most MAX_ITEMS
    come from a generator. Keeps len() where the underlying has one (loop.length, loop.last)."""

    def __init__(self, iterable, sized: bool) -> None:
        self._iterable, self._iterator, self._sized, self._count = iterable, iter(iterable), sized, 0

    def __iter__(self):
        return self

    def __next__(self):
        _tick()
        self._count += 1
        if not self._sized and self._count > MAX_ITEMS:
            raise LimitExceeded(f"a generated sequence went past {MAX_ITEMS} items")
        return next(self._iterator)

    def __len__(self) -> int:
        if not self._sized:
            raise TypeError("a generated sequence has no length")
        return len(self._iterable)


def _counted(iterable):
    return _Counted(iterable, hasattr(iterable, "__len__"))


def _check_percent_format(fmt) -> None:
    """printf-style formatting ('%09d' % x, the format filter): no width or precision past MAX_WIDTH, no '*'."""
    if not isinstance(fmt, str):
        return
    for match in re.finditer(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?", fmt):
        for number in match.groups():
            if number == "*" or (number and int(number) > MAX_WIDTH):
                raise LimitExceeded(f"a format width or precision in {match.group(0)!r} exceeds {MAX_WIDTH}")


def _check_brace_format(fmt: str) -> None:
    """str.format specs: no width or precision past MAX_WIDTH, no nested fields in a spec."""
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec and ("{" in spec or any(int(n) > MAX_WIDTH for n in re.findall(r"\d+", spec))):
            raise LimitExceeded(f"the format spec {spec!r} is too wide (or nests fields)")


def _check_replace(text, old, new) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        most = len(text) + (len(text) // len(old) if old else len(text) + 1) * len(new)
        if most > MAX_TEXT:
            raise LimitExceeded(f"replace could make {most} characters (the limit is {MAX_TEXT})")


def _check_width(width, what: str) -> None:
    if isinstance(width, int) and width > MAX_TEXT or isinstance(width, str) and len(width) > MAX_WIDTH:
        raise LimitExceeded(f"{what} {width if isinstance(width, int) else len(width)} is too large")


def _check_str_method(method, args, kwargs) -> None:
    """Bound the str methods whose result grows with an argument."""
    text, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(text, str):
        return
    if name in ("ljust", "rjust", "center", "zfill") and args:
        _check_width(args[0], f"str.{name} width")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int) and tab > 0 and text.count("\t") * tab > MAX_TEXT:
            raise LimitExceeded(f"expandtabs({tab}) would make too long a string")
    elif name == "replace" and len(args) >= 2:
        _check_replace(text, args[0], args[1])


def _check_filter(name: str, value, args, kwargs) -> None:
    """Bound the builtin filters whose result (or work) grows with an argument rather than with the input."""
    arg = lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    if name == "center":
        _check_width(arg(0, "width", 80), "center width")
    elif name == "indent":
        width = arg(0, "width", 4)
        _check_width(width, "indent width")
        size = width if isinstance(width, int) else len(str(width))
        if size * (str(value).count("\n") + 1) > MAX_TEXT:
            raise LimitExceeded("indent would make too long a string")
    elif name == "format":
        _check_percent_format(value)
    elif name == "replace":
        _check_replace(value, arg(0, "old"), arg(1, "new"))
    elif name in ("batch", "slice"):
        count = arg(0, "linecount" if name == "batch" else "slices")
        if isinstance(count, int) and count > MAX_ITEMS:
            raise LimitExceeded(f"{name}({count}) exceeds {MAX_ITEMS}")
    elif name == "sum":
        start = arg(1, "start", 0)
        if not isinstance(start, (int, float)):  # sum of lists or strings takes quadratic time
            raise LimitExceeded("the sum filter's start must be a number")
    elif name == "tojson":
        _check_indent(arg(1, "indent"))
    elif name == "wordwrap":
        width = arg(0, "width", 79)
        if isinstance(width, int) and width < 1:
            raise ValueError(f"wordwrap width must be positive, not {width}")


def _check_indent(indent) -> None:
    if isinstance(indent, int) and indent > MAX_WIDTH or isinstance(indent, str) and len(indent) > MAX_WIDTH:
        raise LimitExceeded("the JSON indentation is too large")


# Filters that only pick or reorder items (no text is made of a container): their inputs need no size check.
_ITEM_FILTERS = frozenset({"list", "first", "last", "length", "count", "reverse", "sort", "unique", "map", "select",
                           "reject", "selectattr", "rejectattr", "batch", "slice", "dictsort", "groupby", "items",
                           "random", "min", "max", "sum", "attr", "default", "d", "llmplace_counted"})


def _limited_filter(name: str, function):
    """A builtin filter that checks its arguments, counts as a step, and has its result bounded."""
    from jinja2.utils import _PassArg

    skip = 1 if _PassArg.from_obj(function) is not None else 0  # context/environment comes before the value

    @functools.wraps(function)
    def limited(*args, **kwargs):
        _tick()
        if len(args) > skip:
            _check_filter(name, args[skip], args[skip + 1:], kwargs)
        if name not in _ITEM_FILTERS:
            for value in (*args[skip:], *kwargs.values()):
                _check_text_size(value)
        result = function(*args, **kwargs)
        if hasattr(result, "__next__") and not isinstance(result, _Counted):
            return _Counted(result, False)
        return _bounded(result)

    return limited


def _concat(values) -> str:
    """The '~' operator (and any other Jinja string concatenation), bounded."""
    for value in values:
        _check_text_size(value)
    parts = [str(v) for v in values]
    if sum(map(len, parts)) > MAX_TEXT:
        raise LimitExceeded(f"it concatenated more than {MAX_TEXT} characters")
    return "".join(parts)


def _limited_lipsum(lipsum):
    def limited(*args, **kwargs):
        if any(isinstance(v, int) and v > 1000 for v in (*args, *kwargs.values())):
            raise LimitExceeded("lipsum asked for more than 1000 paragraphs or words")
        return lipsum(*args, **kwargs)
    return limited


def _finalize(value):
    _check_text_size(value)
    return value


def _limited_range(*args):
    values = range(*args)
    if len(values) > MAX_ITEMS:
        raise LimitExceeded(f"range of {len(values)} items (the limit is {MAX_ITEMS})")
    return values


def _check_binop(operator: str, left, right) -> None:
    """Before an arithmetic operator runs: bound repetition, big numbers and printf formatting."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple, bytes)) and isinstance(times, int) and times > 0:
                limit = MAX_TEXT if isinstance(seq, (str, bytes)) else MAX_ITEMS
                if len(seq) * times > limit:
                    raise LimitExceeded(f"repetition to {len(seq) * times} items (the limit is {limit})")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise LimitExceeded("the product is too large an integer")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
                and left.bit_length() * right > MAX_INT_BITS:
            raise LimitExceeded("the power is too large an integer")
    elif operator == "%":
        _check_percent_format(left)
        if isinstance(left, str):
            _check_text_size(right)
    elif operator == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, type(left)):
            limit = MAX_TEXT if isinstance(left, str) else MAX_ITEMS
            if len(left) + len(right) > limit:
                raise LimitExceeded(f"concatenation to {len(left) + len(right)} items (the limit is {limit})")


@lru_cache(maxsize=1)
def _environment_class():
    """The sandboxed environment class with limits (built on first use: jinja2 is imported lazily)."""
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    class CountLoopsAndConcatenations(NodeTransformer):
        """Rewrites the parsed template so that every for-loop iterates through _counted (each iteration is a
        step, so nested loops run out of time or steps), every '~' goes through _concat and every captured
        {% set %} block through _bounded."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, "llmplace_counted", [], [], None, None, lineno=node.lineno)
            return node

        def visit_AssignBlock(self, node):  # {% set x %}...{% endset %} captures text: bounded like any string
            node = self.generic_visit(node)
            node.filter = nodes.Filter(node.filter, "llmplace_bounded", [], [], None, None, lineno=node.lineno)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "llmplace_concat", [], [], None, None,
                                lineno=node.lineno)

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def __init__(self, **kwargs) -> None:
            # optimized=False: no constant folding at compile time, where no budget applies. finalize sees
            # every {{ value }} before it becomes text.
            super().__init__(optimized=False, finalize=_finalize, **kwargs)
            self.filters = {name: _limited_filter(name, f) for name, f in self.filters.items()}
            self.filters["llmplace_counted"] = _counted
            self.filters["llmplace_concat"] = _concat
            self.filters["llmplace_bounded"] = _bounded
            self.globals["range"] = _limited_range
            lipsum = self.globals.get("lipsum")
            if lipsum is not None:
                self.globals["lipsum"] = _limited_lipsum(lipsum)

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            tree = CountLoopsAndConcatenations().visit(tree)
            tree.set_environment(self)
            return tree

        def call_binop(self, context, operator, left, right):
            _tick()
            _check_binop(operator, left, right)
            return _bounded(super().call_binop(context, operator, left, right))

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:
                _check_brace_format(value.__self__)
            return wrapped

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
            _tick()
            _check_str_method(__obj, args, kwargs)
            for value in (*args, *kwargs.values()):
                _check_text_size(value)
            budget = getattr(_local, "budget", None)
            if budget is not None:
                budget.depth += 1
                if budget.depth > MAX_CALL_DEPTH:
                    budget.depth -= 1
                    raise LimitExceeded(f"calls nested deeper than {MAX_CALL_DEPTH} (runaway recursion?)")
            try:
                return _bounded(super().call(__context, __obj, *args, **kwargs))
            finally:
                if budget is not None:
                    budget.depth -= 1

    return LimitedEnvironment


def environment(**options):
    """An ImmutableSandboxedEnvironment (same options) whose templates render under the limits above when
    rendered with `render`. Add filters with `limited_filter` so they are bounded too."""
    return _environment_class()(**options)


def limited_filter(name: str, function):
    """`function` as a filter that counts as a step and whose result is bounded (name: for argument checks of
    Jinja's builtin filters of that name)."""
    return _limited_filter(name, function)


def render(template, **variables) -> str:
    """Render a template of `environment()` under the limits: its text, LimitExceeded past one, or whatever
    the template's own code raised."""
    previous = getattr(_local, "budget", None)
    _local.budget = _Budget()
    try:
        parts, size = [], 0
        for part in template.generate(**variables):
            _tick()
            size += len(part)
            if size > MAX_TEXT:
                raise LimitExceeded(f"its output passed {MAX_TEXT} characters")
            parts.append(part)
        return "".join(parts)
    finally:
        _local.budget = previous
