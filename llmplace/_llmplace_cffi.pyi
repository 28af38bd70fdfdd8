# The compiled cffi module (built by llmplace/_native/build_cffi.py). Its `ffi` and `lib` are typed Any on purpose:
# cffi objects are dynamic (lib's attributes are llama.cpp's C functions and constants, ffi.new returns CData of
# any C type), so calls into C are checked by cffi at run time, not by mypy. Only llmplace/_ffi.py imports it.
from typing import Any

ffi: Any
lib: Any
