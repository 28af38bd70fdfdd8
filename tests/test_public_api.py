"""The public names as type checkers see them: llmplace/__init__.py's `if TYPE_CHECKING:` imports must name exactly
what _EXPORTS (the lazy __getattr__'s table) names, each from the same module, and the package must ship py.typed."""

from __future__ import annotations

import ast
from pathlib import Path

import llmplace

PACKAGE = Path(llmplace.__file__).parent


def _type_checking_imports() -> dict[str, str]:
    """name → module (relative to llmplace) of every import inside the module-level `if TYPE_CHECKING:` block."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    blocks = [node for node in tree.body
              if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"]
    assert len(blocks) == 1, "llmplace/__init__.py should have one `if TYPE_CHECKING:` block"
    imported: dict[str, str] = {}
    for statement in blocks[0].body:
        assert isinstance(statement, ast.ImportFrom) and statement.level == 1 and statement.module, \
            f"line {statement.lineno}: only `from .module import name as name` belongs in the block"
        for alias in statement.names:
            # `name as name` is what marks a name as re-exported for mypy --strict (no implicit re-export)
            assert alias.asname == alias.name, f"line {statement.lineno}: write `{alias.name} as {alias.name}`"
            assert alias.name not in imported, f"{alias.name} is imported twice"
            imported[alias.name] = statement.module
    return imported


def test_type_checking_block_matches_exports():
    assert _type_checking_imports() == llmplace._EXPORTS


def test_every_export_resolves_to_what_type_checkers_see():
    for name, module in _type_checking_imports().items():
        defining = __import__(f"llmplace.{module}", fromlist=[name])
        assert getattr(llmplace, name) is getattr(defining, name), name


def test_package_is_marked_typed():
    assert (PACKAGE / "py.typed").is_file()
