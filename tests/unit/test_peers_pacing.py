"""Pacing and retry rules of the link life cycle (``ipop.controller.peers``), pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ipop.controller.peers import (
    PACE_HIGH,
    PACE_LOW,
    RETRY_MAX,
    RETRY_MIN,
    LinkState,
    Peer,
    first_request_delay,
    wins_collision,
)

LOW, HIGH = "11" * 20, "ee" * 20
jitters = st.floats(min_value=0.0, max_value=0.999999)


@given(jitters, jitters)
def test_the_lower_uid_always_asks_before_the_higher(j1: float, j2: float) -> None:
    low = first_request_delay(LOW, HIGH, j1)
    high = first_request_delay(HIGH, LOW, j2)
    assert PACE_LOW[0] <= low <= PACE_LOW[1]
    assert PACE_HIGH[0] <= high <= PACE_HIGH[1]
    assert low < high
    # the lower UID's request is also the one that wins a collision
    assert wins_collision(LOW, HIGH) and not wins_collision(HIGH, LOW)


def test_request_delay_spans_its_window() -> None:
    assert first_request_delay(LOW, HIGH, 0.0) == PACE_LOW[0]
    assert first_request_delay(HIGH, LOW, 0.999999) <= PACE_HIGH[1]
    assert first_request_delay(HIGH, LOW, 5.0) == PACE_HIGH[1]  # clamped


@given(st.lists(jitters, min_size=1, max_size=12))
def test_retry_waits_double_with_jitter_and_stay_capped(js: list[float]) -> None:
    peer = Peer(jid="p@x", uid=HIGH, online=True)
    now = 100.0
    nominal = RETRY_MIN
    for j in js:
        peer.enter(LinkState.REQUESTED, now)
        peer.failed(now, j)
        wait = peer.retry_at - now
        assert 0.5 * nominal - 1e-6 <= wait <= 1.5 * nominal + 1e-6
        assert wait <= 1.5 * RETRY_MAX + 1e-6
        assert peer.state is LinkState.IDLE and not peer.may_request(now)
        assert peer.may_request(peer.retry_at)
        nominal = min(RETRY_MAX, nominal * 2)
        now = peer.retry_at


def test_retry_without_jitter_is_the_plain_backoff() -> None:
    peer = Peer(jid="p@x", uid=HIGH, online=True)
    peer.failed(10.0)
    assert peer.retry_at == 10.0 + RETRY_MIN
    peer.failed(20.0)
    assert peer.retry_at == 20.0 + 2 * RETRY_MIN


def test_two_peers_failing_together_come_back_apart() -> None:
    a, b = Peer(jid="a@x", uid=LOW, online=True), Peer(jid="b@x", uid=HIGH, online=True)
    for _ in range(4):
        a.failed(0.0, 0.1)
        b.failed(0.0, 0.9)
    assert b.retry_at - a.retry_at > 0.7 * a.backoff / 2  # 8 s * (1.4 - 0.6)
