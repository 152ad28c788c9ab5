"""The RFC 6479 replay window: vectors in the RFC's style plus a model-based property test."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ipop.crypto.replay import COUNTER_LIMIT, RING_BLOCKS, WINDOW_SIZE, ReplayWindow


def run(window: ReplayWindow, steps: list[tuple[int, bool]]) -> None:
    for i, (counter, expected) in enumerate(steps):
        assert window.check_and_update(counter) is expected, f"step {i}: counter {counter}"


def test_constants() -> None:
    assert RING_BLOCKS == 32
    assert WINDOW_SIZE == 1984


def test_in_order_and_duplicates() -> None:
    w = ReplayWindow()
    assert w.highest is None
    run(w, [(0, True), (0, False), (1, True), (1, False), (2, True), (3, True), (2, False)])
    assert w.highest == 3


def test_out_of_order_inside_window() -> None:
    w = ReplayWindow()
    run(w, [(10, True), (5, True), (9, True), (5, False), (0, True), (11, True), (7, True)])
    run(w, [(7, False), (10, False), (6, True), (6, False)])


def test_too_old() -> None:
    w = ReplayWindow()
    run(w, [(0, True), (WINDOW_SIZE, True)])
    # WINDOW_SIZE counters behind the highest is outside; one less is inside.
    run(w, [(0, False), (1, True), (1, False)])
    run(w, [(WINDOW_SIZE + 1, True), (1, False), (2, True)])


def test_big_jump_clears_stale_bits() -> None:
    w = ReplayWindow()
    run(w, [(i, True) for i in range(200)])
    jump = 200 + RING_BLOCKS * 64 * 5 + 17
    run(w, [(jump, True), (jump, False), (199, False)])
    # Counters just behind the jump were never seen: the ring must not remember old bits there.
    run(w, [(jump - 1, True), (jump - 64, True), (jump - WINDOW_SIZE + 1, True)])
    run(w, [(jump - WINDOW_SIZE, False)])


def test_jump_by_exactly_one_block() -> None:
    w = ReplayWindow()
    run(w, [(63, True), (64, True), (63, False), (127, True), (128, True), (64, False)])


def test_counter_limit() -> None:
    w = ReplayWindow()
    assert COUNTER_LIMIT == 2**64 - 1
    run(w, [(COUNTER_LIMIT, False), (2**64, False), (-1, False)])
    run(w, [(COUNTER_LIMIT - 1, True), (COUNTER_LIMIT - 1, False), (COUNTER_LIMIT, False)])
    run(w, [(COUNTER_LIMIT - 2, True), (COUNTER_LIMIT - 1 - WINDOW_SIZE, False)])


def test_check_does_not_change_state() -> None:
    w = ReplayWindow()
    assert w.check(5)
    assert w.check(5)
    assert w.highest is None
    assert w.update(5)
    assert not w.check(5)
    assert not w.update(5)


@given(st.lists(st.integers(min_value=0, max_value=6000), max_size=300))
def test_matches_a_simple_model(counters: list[int]) -> None:
    """A set-based model: fresh iff unseen and within WINDOW_SIZE of the highest seen."""
    w = ReplayWindow()
    seen: set[int] = set()
    highest = -1
    for c in counters:
        fresh = c not in seen and (c > highest or highest - c < WINDOW_SIZE)
        got = w.check_and_update(c)
        assert got is fresh, c
        if got:
            seen.add(c)
            highest = max(highest, c)
