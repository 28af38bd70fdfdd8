"""llmplace's version, in a module of its own: modules that need it (the plugin check, `llmplace --version`)
import it from here, not from the package, whose __init__ sits above every module."""

__version__ = "0.1.0"  # the same as pyproject.toml's [project] version
