"""Python values checked against the C types they are stored into, before cffi stores them.

cffi raises OverflowError for an int that does not fit a field (`main_gpu=10**30`), TypeError for a value of the
wrong kind, and stores any int into an enum field, even one no enumerator has (`flash_attn_type=7`), which
llama.cpp then trusts (an assertion that aborts the process, or memory read out of bounds). Every int llmplace
hands to a C field or call goes through `integer`, and the struct fields a caller may set by name go through
`set_fields`, so all of these become InvalidParameterError saying which value was wrong and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from ._ffi import C, ffi
from .errors import InvalidParameterError

INT32 = (-(1 << 31), (1 << 31) - 1)
UINT32 = (0, (1 << 32) - 1)
INT64 = (-(1 << 63), (1 << 63) - 1)
_RANGES = {"int8_t": (-(1 << 7), (1 << 7) - 1), "uint8_t": (0, (1 << 8) - 1), "int16_t": (-(1 << 15), (1 << 15) - 1),
           "uint16_t": (0, (1 << 16) - 1), "int32_t": INT32, "int": INT32, "uint32_t": UINT32, "int64_t": INT64,
           "uint64_t": (0, (1 << 64) - 1), "size_t": (0, (1 << 64) - 1)}

# llama_context_params.flash_attn_type for the `flash_attn` keyword of Context, estimate and fit. Here, below
# them all, so that memory.py (below the model) and context.py (above it) read the one map.
FLASH_ATTN_TYPES = {"auto": C.LLAMA_FLASH_ATTN_TYPE_AUTO, True: C.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                    False: C.LLAMA_FLASH_ATTN_TYPE_DISABLED}


def integer(name: str, value, low: int, high: int, hint: str = "") -> int:
    """`value` as a Python int if it is an integer (numpy's too, never a bool) in [low, high], else
    InvalidParameterError naming `name`, the range and `hint` (what the value means)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(f"{name} must be an int{hint}, not {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise InvalidParameterError(f"{name} must be between {low} and {high}{hint}, not {value}")
    return value


def token_id(name: str, value, n_vocab: int) -> int:
    """A token id of a vocabulary of n_vocab tokens (llama.cpp indexes its tables with it unchecked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < n_vocab:
        raise InvalidParameterError(f"{name} {value!r} is outside the vocabulary (token ids 0 .. {n_vocab - 1})")
    return int(value)


def set_fields(struct, values: Mapping[str, object], allowed: set[str], what: str) -> None:
    """Store `values` ({field name: value}) into the cffi struct `struct`, each checked against its C type:
    ints against their width, enums against their enumerators, floats finite, bools as bools. Only the fields
    in `allowed` may be set (the others are pointers, callbacks, or set through keywords of their own)."""
    if not isinstance(values, Mapping):
        raise InvalidParameterError(f"{what} must be a dict of field name -> value, not {type(values).__name__}")
    fields = dict(ffi.typeof(struct).fields)
    for name, value in values.items():
        if name not in allowed:
            known = "" if name in fields else " (no such field)"
            raise InvalidParameterError(f"{what} cannot set {name!r}{known}; it takes: {', '.join(sorted(allowed))}")
        ctype = fields[name].type
        if ctype.kind == "enum":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) not in ctype.elements:
                choices = ", ".join(f"{v} ({n})" for v, n in sorted(ctype.elements.items()) if not n.endswith("_COUNT"))
                raise InvalidParameterError(f"{what}[{name!r}] = {value!r} is not a value of {ctype.cname}; use one "
                                            f"of: {choices}")
            value = int(value)
        elif ctype.cname == "_Bool":
            if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
                raise InvalidParameterError(f"{what}[{name!r}] must be True or False, not {value!r}")
            value = bool(value)
        elif ctype.cname in ("float", "double"):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InvalidParameterError(f"{what}[{name!r}] must be a finite number, not {value!r}")
            value = float(value)
        else:
            low, high = _RANGES[ctype.cname]
            value = integer(f"{what}[{name!r}]", value, low, high)
        setattr(struct, name, value)
