"""The package's import graph: no module imports, directly or through others, a module that imports it back.

A circle means a module sits below something it needs (issue 15: planning sat below the model it plans), and it
is what makes imports lazy, order-dependent and partly initialised. Every import counts here, top-level or
inside a function or an `if TYPE_CHECKING:` block: a lazy import hides a circle, it does not remove one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llmplace

PACKAGE = Path(llmplace.__file__).parent

# Circles that may stay, each with why. Keep this list as short as it can be.
ALLOWED_CYCLES = [
    # compat mirrors llama-cpp-python's modules, which import each other: Llama (llama.py) uses the chat
    # formats, the tokenizer and its completion/chat helpers, and those take a Llama (typed as one in _chat and
    # _completion, built by LlamaTokenizer.from_ggml_file) or use llama.py's StoppingCriteriaList, as upstream's
    # do. Each of them is upstream's public module (or one split off llama.py to keep it under ~600 lines), so
    # the circle is the shape code written against llama-cpp-python imports, kept so that it runs unchanged.
    # _chat_tools (tools and reasoning, split off _chat) takes a Llama and _chat's helpers like _chat does, and so
    # does _images (the multimodal chat handlers llama_chat_format names).
    {"llmplace.compat._chat", "llmplace.compat._chat_tools", "llmplace.compat._completion", "llmplace.compat.llama",
     "llmplace.compat.llama_chat_format", "llmplace.compat.llama_tokenizer", "llmplace.compat._images"},
]


# Extension modules the build compiles into the package (no .py source): leaves of the graph.
COMPILED_MODULES = {"_llmplace_cffi"}


def module_name(path: Path) -> str:
    parts = ["llmplace", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its source (functions and TYPE_CHECKING blocks
    included); `from . import x` counts as importing module x, `from .x import y` as importing x. The package
    __init__ files an import passes through are not edges: llmplace/__init__.py imports nothing when it runs
    (its public names are imported on first use)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from .x import y` imports module x.y when there is one, else module x (y is a name in it); the
            # compiled cffi extension is a module of its own, below everything
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                          for alias in node.names if alias.name not in COMPILED_MODULES]
        else:
            continue
        found.update(candidate for candidate in candidates if candidate in known and candidate != name)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def strongly_connected_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm; components of one module that does not import itself are left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "llmplace.errors" in graph["llmplace.model"]                # from .errors import ...
    assert "llmplace.logs" in graph["llmplace.model"]                  # from . import logs
    assert "llmplace.lora" in graph["llmplace.context"]                # inside a method
    assert "llmplace.model" in graph["llmplace.compat.llama"]          # from ..model import ...
    assert "llmplace.context" in graph["llmplace.runtime_cost"]        # inside a function


def test_no_import_circles_beyond_the_allowed_ones():
    cycles = strongly_connected_components(import_graph())
    unexpected = [sorted(c) for c in cycles if c not in ALLOWED_CYCLES]
    assert not unexpected, ("modules that import each other (directly or through others): "
                            f"{unexpected}; move what both need into a module below them both")


def test_only_code_that_writes_gguf_files_uses_the_gguf_package():
    """Files are read by gguf_validate alone (one parser, one ggml type table checked against the compiled ggml
    by tests/test_gguf_fuzz.py); the `gguf` package's reader parses again, with a stale type table."""
    # write the synthetic test and benchmark models (synthetic_vision: the tiny vision model and its projector)
    writers = {"llmplace.synthetic", "llmplace.synthetic_vision"}
    users = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "gguf" for a in node.names):
                users.add(name)
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "gguf":
                users.add(name)
    assert users <= writers, f"{sorted(users - writers)} import the gguf package: read with llmplace.gguf_validate"


def test_planning_is_above_what_it_plans():
    """model, memory, placement and runtime_cost do not reach planning (it imports them)."""
    graph = import_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return False

    assert graph["llmplace.planning"] >= {"llmplace.model", "llmplace.memory", "llmplace.placement"}
    for below in ("llmplace.model", "llmplace.memory", "llmplace.placement", "llmplace.runtime_cost",
                  "llmplace.context", "llmplace.lora", "llmplace.vocab", "llmplace.gguf_info",
                  "llmplace.gguf_validate"):
        assert not reaches(below, "llmplace.planning"), f"{below} imports planning (through others)"
