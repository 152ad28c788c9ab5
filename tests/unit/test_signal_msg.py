"""Signaling messages (ipop.wire.signal): vectors, strict validation, property tests.

At the end: the pure helpers of ipop.signal.base and the loopback backend.
"""

from __future__ import annotations

import asyncio
import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop.errors import LocalProtocolError, MalformedMessage
from ipop.signal.base import LogLimiter, SignalListener, TokenBucket
from ipop.signal.loopback import LoopbackHub
from ipop.wire.signal import (
    FEATURE_TRAINS,
    MAX_BODY,
    MAX_CANDIDATE_LEN,
    MAX_CANDIDATES,
    MAX_FEATURES,
    MAX_GROUP_LEN,
    MAX_GROUPS,
    SignalMessage,
)

UID_A = "3f1e" + "0" * 34 + "a9"
FPR = "sha-256 " + ":".join(f"{i:02X}" for i in range(32))

CON_REQ = SignalMessage(
    type="con_req",
    uid=UID_A,
    overlay_id="lab",
    ip4="100.64.0.2",
    fingerprint=FPR,
    security_groups=("dc1", "dc2"),
    candidates=("candidate:1 1 UDP 2130706431 198.18.0.2 40000 typ host",),
)

# the exact bytes we put on the wire for CON_REQ (field order is part of the vector)
CON_REQ_JSON = (
    '{"v":1,"type":"con_req","uid":"3f1e0000000000000000000000000000000000a9",'
    '"overlay_id":"lab","ip4":"100.64.0.2","fingerprint":"sha-256 00:01:02:03:04:05:06:07:08:'
    '09:0A:0B:0C:0D:0E:0F:10:11:12:13:14:15:16:17:18:19:1A:1B:1C:1D:1E:1F",'
    '"security_groups":["dc1","dc2"],'
    '"candidates":["candidate:1 1 UDP 2130706431 198.18.0.2 40000 typ host"]}'
)


def base(**over: object) -> dict[str, object]:
    d: dict[str, object] = json.loads(CON_REQ_JSON)
    d.update(over)
    return d


def parse_obj(obj: object) -> SignalMessage:
    return SignalMessage.parse(json.dumps(obj))


# -- vectors ------------------------------------------------------------------------------------


def test_con_req_vector_encodes_exactly() -> None:
    assert CON_REQ.to_json() == CON_REQ_JSON
    assert SignalMessage.parse(CON_REQ_JSON) == CON_REQ


def test_con_resp_with_verdict_and_mac() -> None:
    text = json.dumps(
        {
            "v": 1,
            "type": "con_resp",
            "uid": UID_A.upper(),
            "overlay_id": "lab",
            "ip4": "100.64.0.3",
            "mac": "02:AA:00:00:00:03",
            "fingerprint": "SHA-256 " + FPR[8:].lower(),
            "security_groups": [],
            "sec": False,
            "encrypt": True,
            "candidates": ["host 198.18.0.3:5800"],
        }
    )
    m = SignalMessage.parse(text)
    assert m.type == "con_resp"
    assert m.uid == UID_A  # canonical: lower case
    assert m.mac == "02:aa:00:00:00:03"
    assert m.fingerprint == FPR  # canonical: upper-case hex, "sha-256"
    assert m.security_groups == ()
    assert m.sec is False and m.encrypt is True
    assert SignalMessage.parse(m.to_json()) == m


def test_trim_needs_no_address_or_fingerprint() -> None:
    m = SignalMessage.parse(json.dumps({"v": 1, "type": "trim", "uid": UID_A, "overlay_id": "o"}))
    assert m == SignalMessage(type="trim", uid=UID_A, overlay_id="o")
    want = f'{{"v":1,"type":"trim","uid":"{UID_A}","overlay_id":"o","candidates":[]}}'
    assert m.to_json() == want


def test_missing_security_groups_is_none_not_empty() -> None:
    d = base()
    del d["security_groups"]
    assert parse_obj(d).security_groups is None
    assert parse_obj(base(security_groups=None)).security_groups is None
    assert parse_obj(base(security_groups=[])).security_groups == ()
    # and both survive a round trip distinctly
    none = parse_obj(d)
    empty = parse_obj(base(security_groups=[]))
    assert "security_groups" not in none.to_json()
    assert '"security_groups":[]' in empty.to_json()
    assert SignalMessage.parse(none.to_json()).security_groups is None
    assert SignalMessage.parse(empty.to_json()).security_groups == ()


def test_features_sorted_kept_and_missing_is_none() -> None:
    """A peer without ``features`` predates them (None: send it no trains); names are sorted,
    deduplicated, and unknown ones kept."""
    assert CON_REQ.features is None and "features" not in CON_REQ.to_json()
    assert not CON_REQ.offers(FEATURE_TRAINS)  # an older peer: no trains for it
    m = parse_obj(base(features=["zz-later", FEATURE_TRAINS, "trains"]))
    assert m.features == ("trains", "zz-later")
    assert m.offers(FEATURE_TRAINS) and not m.offers("other")
    assert m.to_json().endswith(',"features":["trains","zz-later"]}')
    assert SignalMessage.parse(m.to_json()) == m
    assert parse_obj(base(features=[])).features == ()
    assert parse_obj(base(features=None)).features is None
    with pytest.raises(LocalProtocolError):  # built by hand, it must be canonical (sorted)
        SignalMessage(type="trim", uid=UID_A, overlay_id="lab", features=("z", "a"))


def test_optional_fields_tolerated_and_unknown_fields_ignored() -> None:
    d = base(future_field={"x": [1, 2]}, another=None)
    del d["candidates"]
    m = parse_obj(d)
    assert m.candidates == () and m.mac is None and m.sec is None and m.encrypt is None


# -- rejections: each gives MalformedMessage ------------------------------------------------------

BAD = {
    "not json": "{",
    "array": "[]",
    "string": '"hi"',
    "number": "1",
    "nan": '{"v": NaN}',
    "empty": "",
    "deep nesting": "[" * 10000 + "]" * 10000,
    "huge int": "{" + '"v":' + "9" * 5000 + "}",
    "too large": '{"v":1,"pad":"' + "x" * MAX_BODY + '"}',
}


@pytest.mark.parametrize("text", BAD.values(), ids=BAD.keys())
def test_bad_text(text: str) -> None:
    with pytest.raises(MalformedMessage):
        SignalMessage.parse(text)


BAD_FIELDS: dict[str, dict[str, object]] = {
    "v missing": {"v": None},
    "v 2": {"v": 2},
    "v true": {"v": True},
    "v 1.0": {"v": 1.0},
    "v string": {"v": "1"},
    "type unknown": {"type": "hello"},
    "type missing": {"type": None},
    "type number": {"type": 3},
    "uid short": {"uid": "ab" * 19},
    "uid long": {"uid": "ab" * 21},
    "uid not hex": {"uid": "zz" * 20},
    "uid newline": {"uid": "ab" * 20 + "\n"},
    "uid unicode digits": {"uid": "\u0661" * 40},
    "uid missing": {"uid": None},
    "overlay_id empty": {"overlay_id": ""},
    "overlay_id long": {"overlay_id": "o" * 65},
    "overlay_id control": {"overlay_id": "a\x00b"},
    "overlay_id number": {"overlay_id": 5},
    "ip4 missing": {"ip4": None},
    "ip4 v6": {"ip4": "2001:db8::1"},
    "ip4 leading zero": {"ip4": "100.064.0.1"},
    "ip4 junk": {"ip4": "100.64.0.1/24"},
    "ip4 number": {"ip4": 1684013057},
    "fingerprint missing": {"fingerprint": None},
    "fingerprint sha-1": {"fingerprint": "sha-1 " + ":".join(["AB"] * 20)},
    "fingerprint short": {"fingerprint": "sha-256 " + ":".join(["AB"] * 31)},
    "fingerprint no sep": {"fingerprint": "sha-256 " + "AB" * 32},
    "mac short": {"mac": "02:00:00:00:00"},
    "mac number": {"mac": 2},
    "groups not list": {"security_groups": "dc1"},
    "groups object": {"security_groups": {"dc1": True}},
    "groups too many": {"security_groups": [f"g{i}" for i in range(MAX_GROUPS + 1)]},
    "group too long": {"security_groups": ["g" * (MAX_GROUP_LEN + 1)]},
    "group empty": {"security_groups": [""]},
    "group number": {"security_groups": [1]},
    "group surrogate": {"security_groups": ["\ud800"]},
    "sec number": {"sec": 1},
    "sec string": {"sec": "true"},
    "encrypt number": {"encrypt": 0},
    "candidates not list": {"candidates": "host 1.2.3.4:5"},
    "candidates too many": {"candidates": ["host 198.18.0.1:1"] * (MAX_CANDIDATES + 1)},
    "candidate too long": {"candidates": ["c" * (MAX_CANDIDATE_LEN + 1)]},
    "candidate non-ascii": {"candidates": ["host é:1"]},
    "candidate control": {"candidates": ["host\r\n1.2.3.4:5"]},
    "features not list": {"features": "trains"},
    "features too many": {"features": [f"f{i}" for i in range(MAX_FEATURES + 1)]},
    "feature upper case": {"features": ["Trains"]},
    "feature too long": {"features": ["t" * 33]},
    "feature empty": {"features": [""]},
    "feature space": {"features": ["two words"]},
    "feature number": {"features": [1]},
}


@pytest.mark.parametrize("over", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_field(over: dict[str, object]) -> None:
    with pytest.raises(MalformedMessage):
        parse_obj(base(**over))


def test_limits_are_inclusive() -> None:
    m = parse_obj(
        base(
            security_groups=[f"{i:02d}" + "g" * (MAX_GROUP_LEN - 2) for i in range(MAX_GROUPS)],
            candidates=["c" * MAX_CANDIDATE_LEN] * MAX_CANDIDATES,
        )
    )
    assert m.security_groups is not None and len(m.security_groups) == MAX_GROUPS
    assert len(m.candidates) == MAX_CANDIDATES


# -- building -----------------------------------------------------------------------------------


def test_building_invalid_or_non_canonical_raises_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        SignalMessage(type="trim", uid="xyz", overlay_id="o")
    with pytest.raises(LocalProtocolError):
        SignalMessage(type="trim", uid=UID_A.upper(), overlay_id="o")  # not canonical
    with pytest.raises(LocalProtocolError):
        SignalMessage(type="con_req", uid=UID_A, overlay_id="o")  # no ip4/fingerprint
    with pytest.raises(LocalProtocolError):
        SignalMessage(type="bogus", uid=UID_A, overlay_id="o")  # type: ignore[arg-type]


def test_to_json_refuses_oversized() -> None:
    fat = SignalMessage(
        type="con_req",
        uid=UID_A,
        overlay_id="o",
        ip4="100.64.0.1",
        fingerprint=FPR,
        security_groups=tuple(f"{i:02d}" + '"' * (MAX_GROUP_LEN - 2) for i in range(MAX_GROUPS)),
        candidates=("c" * MAX_CANDIDATE_LEN,) * MAX_CANDIDATES,
    )
    with pytest.raises(LocalProtocolError):
        fat.to_json()


def test_messages_are_hashable_and_immutable() -> None:
    assert len({CON_REQ, SignalMessage.parse(CON_REQ_JSON)}) == 1
    with pytest.raises(AttributeError):
        CON_REQ.uid = "0" * 40  # type: ignore[misc]


# -- properties ---------------------------------------------------------------------------------

printable = st.text(
    st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")),
    min_size=1,
    max_size=12,
)
ascii_printable = st.text(
    st.sampled_from(string.ascii_letters + string.digits + " .:-"), min_size=1, max_size=256
)

messages = st.builds(
    SignalMessage,
    type=st.sampled_from(["con_req", "con_resp"]),
    uid=st.text("0123456789abcdef", min_size=40, max_size=40),
    overlay_id=printable,
    ip4=st.ip_addresses(v=4).map(str),
    fingerprint=st.lists(st.integers(0, 255), min_size=32, max_size=32).map(
        lambda b: "sha-256 " + ":".join(f"{x:02X}" for x in b)
    ),
    candidates=st.lists(ascii_printable, max_size=8).map(tuple),
    mac=st.none()
    | st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
        lambda b: ":".join(f"{x:02x}" for x in b)
    ),
    security_groups=st.none() | st.lists(printable, max_size=8).map(tuple),
    sec=st.none() | st.booleans(),
    encrypt=st.none() | st.booleans(),
    features=st.none() | st.lists(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True),
                                  max_size=MAX_FEATURES, unique=True).map(
                                      lambda f: tuple(sorted(f))),
)


@settings(max_examples=50, deadline=None)
@given(messages)
def test_round_trip(m: SignalMessage) -> None:
    assert SignalMessage.parse(m.to_json()) == m


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_only_malformed(text: str) -> None:
    try:
        SignalMessage.parse(text)
    except MalformedMessage:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
FIELDS = [
    "v",
    "type",
    "uid",
    "overlay_id",
    "ip4",
    "mac",
    "fingerprint",
    "security_groups",
    "sec",
    "encrypt",
    "candidates",
    "features",
]


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6), st.booleans())
def test_mutated_valid_message_only_malformed(over: dict[str, object], drop: bool) -> None:
    d = base(**over)
    if drop and over:
        del d[next(iter(over))]
    try:
        m = parse_obj(d)
    except MalformedMessage:
        return
    # whatever parses is canonical and survives a round trip
    assert SignalMessage.parse(m.to_json()) == m


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_arbitrary_json_only_malformed(value: object) -> None:
    try:
        parse_obj(value)
    except MalformedMessage:
        pass


# -- the backend helpers and the loopback backend (ipop.signal.base, ipop.signal.loopback) -------


def test_token_bucket_burst_then_rate() -> None:
    b = TokenBucket(rate=20, burst=40)
    assert sum(b.take(0.0) for _ in range(50)) == 40
    assert not b.take(0.01)
    assert b.take(0.06)  # 0.06 s * 20/s = 1.2 tokens
    assert not b.take(0.06)
    assert sum(b.take(100.0) for _ in range(50)) == 40  # never more than the burst
    assert not b.take(50.0)  # time going backwards adds nothing


def test_log_limiter_once_per_second_per_key() -> None:
    lim = LogLimiter(1.0, max_keys=2)
    assert lim.allow("a", 0.0) and not lim.allow("a", 0.5) and lim.allow("a", 1.0)
    assert lim.allow("b", 0.5) and lim.allow("c", 0.6)  # "a" evicted: bounded memory
    assert lim.allow("a", 1.1) and lim.suppressed == 1


def test_loopback_presence_messages_and_subscriptions() -> None:
    class Rec(SignalListener):
        def __init__(self) -> None:
            self.events: list[tuple[object, ...]] = []

        def on_state(self, connected: bool, error: str | None) -> None:
            self.events.append(("state", connected, error))

        def on_presence(
            self, jid: str, uid: str | None, online: bool, ip4: str | None = None
        ) -> None:
            self.events.append(("presence", jid, uid, online) + ((ip4,) if ip4 else ()))

        def on_message(self, jid: str, msg: SignalMessage) -> None:
            self.events.append(("message", jid, msg))

        def on_roster(self, jid: str, subscribed_both: bool) -> None:
            self.events.append(("roster", jid, subscribed_both))

    async def body() -> None:
        hub = LoopbackHub()
        ra, rb = Rec(), Rec()
        a, b = hub.backend("a@x", ra), hub.backend("b@x", rb)
        await a.set_presence("a" * 40, "100.64.0.1")
        await a.connect()
        await b.set_presence("b" * 40)
        await b.connect()
        assert ra.events == []  # nothing delivered inside the caller's stack
        await asyncio.sleep(0)
        assert ("presence", "b@x", "b" * 40, True) in ra.events
        assert ("presence", "a@x", "a" * 40, True, "100.64.0.1") in rb.events
        assert await a.send("b@x", CON_REQ)
        assert not await a.send("nobody@x", CON_REQ) and a.drops == {"no_route": 1}
        await asyncio.sleep(0)
        assert rb.events[-1] == ("message", "a@x", CON_REQ)
        hub.drop("b@x")
        await asyncio.sleep(0)
        assert ra.events[-1] == ("presence", "b@x", "b" * 40, False)
        assert rb.events[-1] == ("state", False, "dropped by the loopback hub")
        await a.close()

        # SocialVPN: closed roster, mutual subscriptions
        hub = LoopbackHub(open_roster=False)
        rc, rd = Rec(), Rec()
        c, d = hub.backend("c@x", rc), hub.backend("d@x", rd)
        for n, u in ((c, "c"), (d, "d")):
            await n.set_presence(u * 40)
            await n.connect()
        await c.subscribe("d@x")
        await asyncio.sleep(0)
        assert not await c.send("d@x", CON_REQ)
        await d.subscribe("c@x")
        await asyncio.sleep(0)
        assert ("roster", "d@x", True) in rc.events and ("roster", "c@x", True) in rd.events
        assert ("presence", "d@x", "d" * 40, True) in rc.events
        assert [x.subscription for x in c.roster()] == ["both"]
        await d.unsubscribe("c@x")
        await asyncio.sleep(0)
        assert rc.events[-2:] == [("roster", "d@x", False), ("presence", "d@x", "d" * 40, False)]
        assert c.roster() == []

    asyncio.run(body())
