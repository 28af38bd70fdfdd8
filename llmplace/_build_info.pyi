# _build_info.py is written by the build from _build_info.py.in (CMakeLists.txt); a source checkout has none, so
# this stub gives type checkers its names.
LLAMA_CPP_COMMIT: str
CPU_ALL_VARIANTS: bool
CPU_FEATURES: str
