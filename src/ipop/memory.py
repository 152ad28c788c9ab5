"""Give the C heap's free pages back to the system once a burst of work has settled.

A node's set-up (imports, config validation, handshakes, ICE gathers) frees most of what it
allocated, but glibc keeps the freed pages of its heap; ``malloc_trim(0)`` returns them.  Only
where glibc is the C library; elsewhere nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from typing import Any

log = logging.getLogger("ipop.memory")

_trim: Any = None  # the libc function once found; False: not available


def give_back(collect: bool = True) -> bool:
    """Collect cyclic garbage (when ``collect``), then trim the C heap; False where the C
    library has no ``malloc_trim``."""
    global _trim
    if collect:
        gc.collect()
    if _trim is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _trim = libc.malloc_trim
            _trim.argtypes = [ctypes.c_size_t]
            _trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            _trim = False
    if _trim is False:
        return False
    _trim(0)
    return True
