"""Signaling under attack (issue 16, part 3): inbound limits, candidate caps, peer addresses,
and the per-address pacing of ICE checks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ipop.controller.siglimits import (
    GLOBAL_BURST,
    JID_BURST,
    InboundLimits,
    peer_address_problem,
)
from ipop.nat.params import CANDIDATE_CAPS, MAX_PER_ADDRESS, cap_candidates, parse_candidate

CREDS = "ice:AbCd:" + "x" * 24


def cand(i: int, host: str, kind: str = "host") -> str:
    tail = "" if kind == "host" else " raddr 0.0.0.0 rport 0"
    return f"candidate:{i} 1 udp {2130706431 - i} {host} {7000 + i} typ {kind}{tail}"


def test_one_sender_is_held_to_its_own_budget() -> None:
    lim = InboundLimits()
    got = [lim.admit("c@x", 100.0) for _ in range(1000)]
    assert got.count(None) == JID_BURST
    assert set(got[int(JID_BURST):]) == {"inbound_rate_limited_jid"}
    # another sender is not starved by the flood: the flooder never reached the global bucket
    assert lim.admit("b@x", 100.0) is None
    # one more a second afterwards
    assert lim.admit("c@x", 101.0) is None and lim.admit("c@x", 101.0) is not None


def test_many_senders_meet_the_global_ceiling() -> None:
    lim = InboundLimits()
    got = [lim.admit(f"u{i}@x", 5.0) for i in range(200)]
    assert got.count(None) == GLOBAL_BURST
    assert set(got[int(GLOBAL_BURST):]) == {"inbound_rate_limited_global"}


def test_sender_table_is_bounded() -> None:
    lim = InboundLimits()
    for i in range(10_000):
        lim.admit(f"u{i}@x", float(i))
    assert len(lim._by_sender) <= 4096


def test_reflection_list_is_capped() -> None:
    entries = [CREDS] + [cand(i, "198.19.1.9", "host" if i < 11 else "srflx" if i < 21
                              else "relay") for i in range(31)]
    kept, dropped = cap_candidates(entries)
    assert kept[0] == CREDS
    assert len(kept) == 1 + MAX_PER_ADDRESS and dropped == 29


@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from(["host", "srflx", "relay"])),
                max_size=31))
def test_caps_hold_for_any_list(spec: list[tuple[int, str]]) -> None:
    entries = [CREDS] + [cand(i, f"198.18.0.{n}", kind) for i, (n, kind) in enumerate(spec)]
    kept, dropped = cap_candidates(entries)
    infos = [parse_candidate(k[len("candidate:"):]) for k in kept[1:]]
    assert len(infos) + dropped == len(spec)
    for kind, cap in CANDIDATE_CAPS.items():
        assert sum(i.type == kind for i in infos) <= cap
    for host in {i.host for i in infos}:
        assert sum(i.host == host for i in infos) <= MAX_PER_ADDRESS
    assert kept == [e for e in entries if e in kept]  # order kept


def test_malformed_and_other_entries_pass_to_their_readers() -> None:
    kept, dropped = cap_candidates([CREDS, "host 198.18.0.1:5000", "candidate:garbage"])
    assert kept == [CREDS, "host 198.18.0.1:5000", "candidate:garbage"] and dropped == 0


def test_peer_addresses() -> None:
    own = "100.64.40.1"
    assert peer_address_problem("100.64.40.2", own, 24) is None
    assert "outside the overlay prefix 100.64.40.0/24" in str(
        peer_address_problem("8.8.8.8", own, 24))
    assert "own address" in str(peer_address_problem("100.64.40.1", own, 24))
    assert "network address" in str(peer_address_problem("100.64.40.0", own, 24))
    assert "broadcast" in str(peer_address_problem("100.64.40.255", own, 24))
    assert "not an IP" in str(peer_address_problem("x", own, 24))
    assert "outside" in str(peer_address_problem("2001:db8::2", own, 24))
    assert peer_address_problem("2001:db8::2", "2001:db8::1", 64) is None
    assert "own address" in str(peer_address_problem("2001:db8::1", "2001:db8::1", 64))
    assert "outside" in str(peer_address_problem("2001:db9::1", "2001:db8::1", 64))


def test_checks_to_a_silent_address_are_paced() -> None:
    """The real aioice STUN protocol's sends, paced: a few Binding requests to an address that
    never answered, then none until the budget refills; answers and answered addresses pass."""
    import asyncio

    async def body() -> None:
        paced_sends()

    asyncio.run(body())


def paced_sends() -> None:
    from aioice import stun
    from aioice.ice import StunProtocol

    from ipop.nat.conn import CHECK_BURST, IpopConnection

    conn = IpopConnection(addresses=[], excluded=[], gather_timeout=1,
                          on_check_complete=lambda: None, ice_controlling=True)
    sent: list[tuple[str, int]] = []
    proto = StunProtocol(conn)
    proto.send_stun = lambda _msg, addr: sent.append(addr)  # type: ignore[method-assign]
    conn._pace(proto)
    conn._pace(proto)  # once only
    req = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    resp = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE)
    for _ in range(40):
        proto.send_stun(req, ("198.19.1.9", 7000))
        proto.send_stun(resp, ("198.19.1.9", 7001))
    assert sent.count(("198.19.1.9", 7000)) == CHECK_BURST
    assert sent.count(("198.19.1.9", 7001)) == 40 and conn.checks_paced == 40 - CHECK_BURST
    conn.answered.add("198.19.1.10")
    for _ in range(40):
        proto.send_stun(req, ("198.19.1.10", 7000))
    assert sent.count(("198.19.1.10", 7000)) == 40
