"""The public surface of the installed llama-cpp-python, read from its source (tests/test_compat_surface.py).

A public name of a module is one the module binds at its top level (class, def, assignment) or imports from
another llama_cpp module, and that does not begin with "_". Names it imports from elsewhere (`os`, `List`,
`np`) are not its surface even though `dir()` lists them. Reading the source, not importing, also covers the
modules that need packages not installed here (the server's FastAPI app, llava's library).
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PACKAGE = "llama_cpp"


@dataclass(frozen=True)
class PublicName:
    module: str  # where upstream exposes it: "llama_cpp.llama_types"
    name: str
    home: str  # the public module that defines it (module itself, or where a re-export comes from)

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    return Path(next(iter(spec.submodule_search_locations)))


def public_modules() -> list[str]:
    """Every module llama-cpp-python ships whose dotted name has no private part (no `_internals`, no
    `__main__`); the package itself first."""
    root = package_dir()
    modules = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        modules.append(".".join((PACKAGE, *parts)))
    return sorted(modules, key=lambda m: (m.count("."), m))


def _source_path(module: str) -> Path:
    parts = module.split(".")[1:]
    base = package_dir().joinpath(*parts)
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _is_private(module: str) -> bool:
    return any(part.startswith("_") for part in module.split("."))


def _resolve(current: str, node: ast.ImportFrom) -> str | None:
    """The absolute module an ImportFrom names, when it is inside llama_cpp; None otherwise."""
    if node.level:
        package = current if _source_path(current).name == "__init__.py" else current.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        return f"{package}.{node.module}" if node.module else package
    if node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
        return node.module
    return None


def _top_level_statements(body):
    """Statements at module level, including those inside if/try blocks (both branches)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _top_level_statements(node.body)
            yield from _top_level_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _top_level_statements(block)
        else:
            yield node


def _assigned_names(target):
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _assigned_names(element)


@cache
def surface(module: str) -> dict[str, str]:
    """{public name: home module} of one llama_cpp module."""
    tree = ast.parse(_source_path(module).read_text(encoding="utf-8"))
    names: dict[str, str] = {}
    for node in _top_level_statements(tree.body):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = module
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(dict.fromkeys(_assigned_names(target), module))
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            names.update(dict.fromkeys(_assigned_names(node.target), module))
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if source is None or source == "__future__":
                continue
            if _source_path(source).is_file() is False:  # `from llama_cpp.x import submodule`
                continue
            if _is_private(source):
                # a private module's names become this module's own (set_verbose, suppress_stdout_stderr)
                names.update({a.asname or a.name: module for a in node.names if a.name != "*"})
                continue
            exported = surface(source)
            for alias in node.names:
                if alias.name == "*":
                    names.update(exported)
                elif alias.name in exported:
                    names[alias.asname or alias.name] = exported[alias.name]
    return {name: home for name, home in names.items() if not name.startswith("_") and name != "annotations"}


def public_names() -> list[PublicName]:
    return [PublicName(module, name, home) for module in public_modules() for name, home in
            sorted(surface(module).items())]
