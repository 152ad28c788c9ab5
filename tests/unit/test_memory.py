"""``ipop.memory``: giving the heap back is safe to call at any time and frees what it can."""

from __future__ import annotations

import platform

from ipop import memory


def test_give_back_runs_and_says_whether_it_could_trim() -> None:
    blob = [bytes(1000) for _ in range(20_000)]  # ~20 MB, then freed
    del blob
    trimmed = memory.give_back()
    assert trimmed == (platform.libc_ver()[0] == "glibc")
    assert memory.give_back(collect=False) == trimmed  # the second call reuses the lookup


def test_give_back_collects_cycles() -> None:
    import gc
    import weakref

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    ref = weakref.ref(a)
    gc.disable()
    try:
        del a, b
        assert ref() is not None
        memory.give_back()
        assert ref() is None
    finally:
        gc.enable()
