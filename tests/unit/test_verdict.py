"""The verdict confirmed in the DTLS handshake (ALPN): encoding vectors, properties, handshakes."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from ipop.controller.groupvpn import signaled_view
from ipop.crypto.dtls import DtlsHandshake
from ipop.crypto.identity import Identity
from ipop.crypto.policy import SecurityView
from ipop.crypto.verdict import (
    REFUSE_DOWNGRADE,
    REFUSE_MISMATCH,
    Confirmation,
    encode_view,
)
from ipop.wire.signal import SignalMessage

ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")
CLIENT_UID, SERVER_UID = bytes(range(20)), bytes(range(100, 120))


def view(groups: list[str] | None, sec: bool = False, req: bool = False) -> SecurityView:
    return SecurityView(sec=sec, security_groups=None if groups is None else frozenset(groups),
                        require_encryption=req)


# ---- encoding vectors --------------------------------------------------------------------------


def test_encode_view_vectors():
    assert encode_view(None) == b"\x00"
    assert encode_view(view(None)) == b"\x01\x00\x00\xff"
    assert encode_view(view([], sec=True)) == b"\x01\x01\x00\x00"
    assert encode_view(view(["red", "blue"], req=True)) == b"\x01\x00\x01\x02\x04blue\x03red"
    # the order a list was written in does not matter; a renamed group does
    assert encode_view(view(["blue", "red"], req=True)) == encode_view(view(["red", "blue"],
                                                                             req=True))
    assert encode_view(view(["bluf", "red"])) != encode_view(view(["blue", "red"]))


def test_digest_and_protocol_vector():
    conf = Confirmation(CLIENT_UID, SERVER_UID, view(["blue"]), view(["blue", "green"]), True)
    expected = hashlib.sha256(
        b"ipop-verdict-v1" + b"\x14" + CLIENT_UID + b"\x14" + SERVER_UID
        + b"\x01\x00\x00\x01\x04blue" + b"\x01\x00\x00\x02\x04blue\x05green").digest()
    assert conf.digest() == expected
    assert conf.protocol() == b"ipop1/" + expected.hex().encode() + b"/e"
    assert len(conf.protocol()) == 72  # well under ALPN's 255
    plain = Confirmation(CLIENT_UID, SERVER_UID, None, None, False)
    assert plain.protocol().endswith(b"/p")
    assert conf.offer() == [conf.protocol(), REFUSE_DOWNGRADE, REFUSE_MISMATCH]


def test_select_and_check():
    a = Confirmation(CLIENT_UID, SERVER_UID, view(["blue"]), view(["blue"]), True)
    rewritten = Confirmation(CLIENT_UID, SERVER_UID, view(["blue"]), view(["bluf"]), False)
    disagree = Confirmation(CLIENT_UID, SERVER_UID, view(["blue"]), view(["blue"]), False)
    assert a.select(a.offer()) == (a.protocol(), None)
    assert a.check_selected(a.protocol()) is None
    assert a.select(rewritten.offer()) == (REFUSE_DOWNGRADE, "downgrade_detected")
    assert rewritten.check_selected(REFUSE_DOWNGRADE) == "downgrade_detected"
    assert a.select(disagree.offer()) == (REFUSE_MISMATCH, "verdict_mismatch")
    assert disagree.check_selected(REFUSE_MISMATCH) == "verdict_mismatch"
    # a client that offers nothing usable (an older peer, a stripped list): no choice
    assert a.select([b"h2"]) == (None, "downgrade_detected")
    assert a.check_selected(None) == "downgrade_detected"
    assert a.check_selected(b"ipop1/" + b"0" * 64 + b"/e") == "downgrade_detected"


def test_signaled_view_reads_the_message_as_sent():
    msg = SignalMessage(type="con_req", uid="aa" * 20, overlay_id="g", ip4="100.64.0.2",
                        fingerprint=ALICE.fingerprint, security_groups=("b", "a"), sec=None,
                        encrypt=None)
    assert signaled_view(msg) == view(["a", "b"], sec=True, req=False)
    resp = SignalMessage(type="con_resp", uid="aa" * 20, overlay_id="g", ip4="100.64.0.2",
                         fingerprint=ALICE.fingerprint, security_groups=None, sec=False,
                         encrypt=True)
    assert signaled_view(resp) == view(None, sec=False, req=True)


# ---- properties --------------------------------------------------------------------------------

names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1,
                max_size=20)
views = st.none() | st.builds(
    SecurityView, sec=st.booleans(),
    security_groups=st.none() | st.frozensets(names, max_size=6),
    require_encryption=st.booleans())


@settings(max_examples=300, deadline=None)
@given(views, views, st.booleans())
def test_equal_inputs_confirm(client_view, server_view, encrypt):
    mine = Confirmation(CLIENT_UID, SERVER_UID, client_view, server_view, encrypt)
    theirs = Confirmation(CLIENT_UID, SERVER_UID, client_view, server_view, encrypt)
    chosen, refusal = theirs.select(mine.offer())
    assert refusal is None and mine.check_selected(chosen) is None


@settings(max_examples=300, deadline=None)
@given(views, views, views, views, st.booleans(), st.booleans())
def test_any_difference_refuses_with_the_right_reason(cv1, sv1, cv2, sv2, e1, e2):
    client = Confirmation(CLIENT_UID, SERVER_UID, cv1, sv1, e1)
    server = Confirmation(CLIENT_UID, SERVER_UID, cv2, sv2, e2)
    chosen, refusal = server.select(client.offer())
    same_inputs = encode_view(cv1) == encode_view(cv2) and encode_view(sv1) == encode_view(sv2)
    if same_inputs and e1 == e2:
        assert refusal is None and client.check_selected(chosen) is None
    elif same_inputs:
        assert refusal == client.check_selected(chosen) == "verdict_mismatch"
    else:
        assert refusal == client.check_selected(chosen) == "downgrade_detected"


@settings(max_examples=200, deadline=None)
@given(views, views)
def test_encoding_is_injective_on_views(v1, v2):
    assert (encode_view(v1) == encode_view(v2)) == (v1 == v2)


# ---- the confirmation inside a real DTLS handshake ---------------------------------------------


def handshake(client_conf: Confirmation | None, server_conf: Confirmation | None,
              ) -> tuple[DtlsHandshake, DtlsHandshake]:
    client = DtlsHandshake(ALICE, True, BOB.fingerprint, confirmation=client_conf)
    server = DtlsHandshake(BOB, False, ALICE.fingerprint, confirmation=server_conf)
    to_server = client.start(0.0)
    server.start(0.0)
    for _ in range(10):
        to_client = [out for d in to_server for out in server.receive(d, 0.0)]
        to_server = [out for d in to_client for out in client.receive(d, 0.0)]
        if not to_server and not to_client:
            break
    return client, server


def conf(server_groups: list[str], encrypt: bool = True) -> Confirmation:
    return Confirmation(ALICE.uid, BOB.uid, view(["blue"]), view(server_groups), encrypt)


def test_handshake_confirms_equal_verdicts():
    client, server = handshake(conf(["blue"]), conf(["blue"]))
    assert client.done and server.done and not client.failure and not server.failure
    assert client.keys().tx_key == server.keys().rx_key


def test_handshake_refuses_rewritten_inputs_on_both_ends():
    client, server = handshake(conf(["bluf"], encrypt=False), conf(["blue"]))
    assert client.failed_reason == server.failed_reason == "downgrade_detected"
    assert not client.done and not server.done


def test_handshake_refuses_different_verdicts_on_both_ends():
    client, server = handshake(conf(["blue"], encrypt=False), conf(["blue"], encrypt=True))
    assert client.failed_reason == server.failed_reason == "verdict_mismatch"


def test_a_client_that_confirms_nothing_is_refused():
    client, server = handshake(None, conf(["blue"]))
    assert server.failed_reason == "downgrade_detected" and not server.done
    client, server = handshake(conf(["blue"]), None)  # a server that selects nothing
    assert client.failed_reason == "downgrade_detected" and not client.done
