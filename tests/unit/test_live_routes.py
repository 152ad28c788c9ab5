"""Live routes without a network (issue 13, routes on reload): the route update on the wire
(``update: true`` on con_resp, feature ``route-update``: vectors, refusals, round trips), the
reload plan for the routing keys and static ``allowed_ips``, the route diff, the policy run
again over every linked peer, and a link's allowed sources following its new prefixes."""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import json
import socket
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop import reload as rl
from ipop.config import validate
from ipop.controller.routes import Offer, RoutePolicy, clashes, redecide
from ipop.dataplane.link import Link, Path
from ipop.dataplane.sources import SourceCheck
from ipop.dataplane.table import ForwardingTable
from ipop.errors import LocalProtocolError, MalformedMessage
from ipop.wire.prefixes import parse_prefix
from ipop.wire.signal import FEATURE_ROUTE_UPDATE, FEATURE_TRAINS, MAX_ROUTES, SignalMessage

from .test_signal_msg import CON_REQ, FPR, UID_A, base, parse_obj

# ---- the route update on the wire ----------------------------------------------------------

UPDATE = SignalMessage(type="con_resp", uid=UID_A, overlay_id="lab", ip4="100.64.0.2",
                       fingerprint=FPR, features=(FEATURE_ROUTE_UPDATE, FEATURE_TRAINS),
                       routes=("198.18.202.0/24", "2001:db8:202::/48"), update=True)
UPDATE_JSON = (
    '{"v":1,"type":"con_resp","uid":"3f1e0000000000000000000000000000000000a9",'
    '"overlay_id":"lab","ip4":"100.64.0.2","fingerprint":"sha-256 00:01:02:03:04:05:06:07:08:'
    '09:0A:0B:0C:0D:0E:0F:10:11:12:13:14:15:16:17:18:19:1A:1B:1C:1D:1E:1F",'
    '"candidates":[],"features":["route-update","trains"],'
    '"routes":["198.18.202.0/24","2001:db8:202::/48"],"update":true}'
)


def update_obj(**over: object) -> dict[str, object]:
    d: dict[str, object] = json.loads(UPDATE_JSON)
    d.update(over)
    return d


def test_update_vector_encodes_exactly_and_parses_back():
    assert UPDATE.to_json() == UPDATE_JSON
    assert SignalMessage.parse(UPDATE_JSON) == UPDATE
    assert UPDATE.offers(FEATURE_ROUTE_UPDATE) and UPDATE.update is True


def test_an_update_with_no_routes_says_so_with_an_empty_list():
    msg = parse_obj(update_obj(routes=[]))
    assert msg.routes == () and msg.update is True
    assert '"routes":[],"update":true' in msg.to_json()
    assert SignalMessage.parse(msg.to_json()) == msg


def test_a_message_without_update_is_unchanged():
    msg = parse_obj(base())
    assert msg.update is None and "update" not in msg.to_json()
    assert parse_obj(base(update=None)).update is None  # JSON null counts as missing


@pytest.mark.parametrize(("over", "why"), [
    ({"update": False}, "update must be true when given"),
    ({"update": 1}, "update must be true when given"),
    ({"update": "true"}, "update must be true when given"),
    ({"update": [True]}, "update must be true when given"),
    ({"type": "con_req"}, "update is allowed on con_resp only"),
    ({"type": "trim"}, "update is allowed on con_resp only"),
    ({"routes": None}, "an update must carry routes"),
    ({"candidates": ["host 198.18.0.3:5800"]}, "an update carries no candidates"),
    ({"routes": ["198.18.202.1/24"]}, "has host bits set"),
    ({"routes": [f"198.18.{i}.0/24" for i in range(MAX_ROUTES + 1)]}, "more than 64"),
    ({"routes": "198.18.202.0/24"}, "routes must be a list"),
    ({"fingerprint": None}, "needs ip4 and fingerprint"),
])
def test_bad_updates_refuse_the_message(over, why):
    obj = update_obj(**over)
    if over.get("routes", 0) is None:
        del obj["routes"]
    with pytest.raises(MalformedMessage, match=why):
        parse_obj(obj)


def test_exactly_64_routes_pass_in_an_update():
    routes = [f"198.18.{i}.0/24" for i in range(MAX_ROUTES)]
    assert len(parse_obj(update_obj(routes=routes)).routes or ()) == MAX_ROUTES


def test_building_a_bad_update_raises_local_error():
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(UPDATE, update=False)
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(CON_REQ, update=True)  # a con_req
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(UPDATE, routes=None)


def test_an_older_peer_offers_no_route_updates():
    assert not parse_obj(base()).offers(FEATURE_ROUTE_UPDATE)  # no features at all
    assert not parse_obj(base(features=["trains"])).offers(FEATURE_ROUTE_UPDATE)
    assert parse_obj(base(features=["trains", "route-update"])).features == (
        "route-update", "trains")


prefixes4 = st.builds(lambda a, n: str(ipaddress.ip_network(f"{a}/{n}", strict=False)),
                      st.ip_addresses(v=4), st.integers(0, 32))
prefixes6 = st.builds(lambda a, n: str(ipaddress.ip_network(f"{a}/{n}", strict=False)),
                      st.ip_addresses(v=6), st.integers(0, 128))
updates = st.builds(
    SignalMessage, type=st.just("con_resp"),
    uid=st.text("0123456789abcdef", min_size=40, max_size=40),
    overlay_id=st.text(st.sampled_from("abcxyz-_."), min_size=1, max_size=64),
    ip4=st.ip_addresses(v=4).map(str), fingerprint=st.just(FPR),
    features=st.none() | st.just((FEATURE_ROUTE_UPDATE,)),
    routes=st.lists(prefixes4 | prefixes6, max_size=MAX_ROUTES, unique=True).map(tuple),
    update=st.just(True),
)


@settings(max_examples=60, deadline=None)
@given(updates)
def test_update_round_trip(msg):
    assert SignalMessage.parse(msg.to_json()) == msg


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["update", "type", "routes", "candidates"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                       | st.lists(st.text(max_size=20), max_size=3), max_size=4))
def test_mutated_update_only_malformed(over):
    try:
        msg = parse_obj(update_obj(**over))
    except MalformedMessage:
        return
    if msg.update:  # what parses is a valid update: a con_resp with routes, no candidates
        assert msg.type == "con_resp" and msg.routes is not None and not msg.candidates
    assert SignalMessage.parse(msg.to_json()) == msg


# ---- the reload plan for the routing keys ------------------------------------------------

UID_B = "b" * 40
UID_C = "c" * 40


def cfg(**kw):
    return validate({"ip4": "100.64.0.1", "ip4_mask": 24, "listen_port": 5800, "sec": False,
                     **kw})[0]


def peer(uid, ip4, **kw):
    return {"uid": uid, "ip4": ip4, "endpoint": "198.18.0.2:5800",
            "fingerprint": "sha-256 " + ":".join(["5A"] * 32), **kw}


@pytest.mark.parametrize(("key", "value"), [
    ("advertise_routes", ["198.18.200.0/24"]), ("accept_routes", True),
    ("accept_routes", ["198.18.0.0/15"]), ("exit_node", "100.64.0.9"), ("snat_routes", True),
])
def test_routing_keys_are_live(key, value):
    p = rl.plan(cfg(), cfg(**{key: value}))
    assert p.refused is None and p.changed == [key] and p.routing
    assert not p.security and not p.logging


def test_a_bad_routing_value_never_reaches_the_plan():
    from ipop.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        cfg(advertise_routes=["198.18.200.1/24"])
    assert exc.value.key == "advertise_routes"


def test_routing_keys_with_a_restart_key_are_refused_whole():
    p = rl.plan(cfg(), cfg(advertise_routes=["198.18.200.0/24"], interface="ipop9"))
    assert p.refused == "interface" and "advertise_routes" in p.changed


def test_allowed_ips_alone_keep_the_link_other_fields_rebuild_it():
    old = cfg(peers=[peer(UID_A, "100.64.0.2", allowed_ips=["198.18.210.0/24"]),
                     peer(UID_B, "100.64.0.3"), peer(UID_C, "100.64.0.4")])
    new = cfg(peers=[peer(UID_A, "100.64.0.2", allowed_ips=["198.18.211.0/24"]),
                     peer(UID_B, "100.64.0.3", allowed_ips=["198.18.212.0/24"],
                          endpoint="198.18.0.9:5800"),
                     peer(UID_C, "100.64.0.4")])
    ch = rl.peer_changes(old, new)
    assert ch.nets == (UID_A,) and ch.changed == (UID_B,)
    assert ch.added == () and ch.removed == ()
    assert rl.peer_changes(old, old) == rl.PeerChanges((), (), (), ())


def test_route_delta():
    assert rl.route_delta(["198.18.200.0/24"], ["198.18.200.0/24", "198.18.202.0/24"]) == (
        "+198.18.202.0/24")
    assert rl.route_delta([parse_prefix("0.0.0.0/0"), parse_prefix("::/0")], []) == (
        "-0.0.0.0/0 -::/0")
    assert rl.route_delta(["198.18.200.0/24"], ["198.18.201.0/24"]) == (
        "+198.18.201.0/24 -198.18.200.0/24")
    assert rl.route_delta(["a"], ["a"]) == ""


# ---- the policy run again over every linked peer -------------------------------------------

POLICY = RoutePolicy(accept=True, overlay=(parse_prefix("100.64.0.0/24"),), own=())
LAN = parse_prefix("198.18.200.0/24")
V4, V6 = parse_prefix("0.0.0.0/0"), parse_prefix("::/0")


def names(result):
    return {k: [str(n) for n in v[0]] for k, v in result.items()}


def test_accept_flipped_off_then_on():
    off = dataclasses.replace(POLICY, accept=False)
    offers = [Offer("r" * 40, ("198.18.200.0/24",), (LAN,), False)]
    result = redecide(offers, off, {})
    assert names(result) == {"r" * 40: []}
    assert result["r" * 40][1] == [("198.18.200.0/24", "accept_routes is false")]
    back = redecide([dataclasses.replace(offers[0], carried=())], POLICY, {})
    assert names(back) == {"r" * 40: ["198.18.200.0/24"]}


def test_exit_moves_from_one_peer_to_another_and_is_cleared():
    e1 = Offer("1" * 40, ("0.0.0.0/0", "::/0"), (V4, V6), False)  # was the exit
    e2 = Offer("2" * 40, ("0.0.0.0/0",), (), True)  # exit_node names it now
    assert names(redecide([e1, e2], POLICY, {})) == {"1" * 40: [], "2" * 40: ["0.0.0.0/0"]}
    # the order of the peers does not matter: the old exit let go of it first
    assert names(redecide([e2, e1], POLICY, {})) == {"1" * 40: [], "2" * 40: ["0.0.0.0/0"]}
    cleared = dataclasses.replace(e2, carried=(V4,), is_exit=False)
    result = redecide([cleared], POLICY, {})
    assert names(result) == {"2" * 40: []}
    assert "exit_node" in result["2" * 40][1][0][1]


def test_a_prefix_stays_with_the_peer_that_kept_it():
    holder = Offer("a" * 40, ("198.18.200.0/24",), (LAN,), False)
    rival = Offer("b" * 40, ("198.18.200.0/25", "198.18.201.0/24"), (), False)
    result = redecide([rival, holder], POLICY, {})
    assert names(result) == {"a" * 40: ["198.18.200.0/24"], "b" * 40: ["198.18.201.0/24"]}
    assert result["b" * 40][1] == [("198.18.200.0/25", f"already routed to peer {'a' * 12}")]
    # a static peer's allowed_ips hold a prefix no policy moves
    result = redecide([holder], POLICY, {"c" * 40: (parse_prefix("198.18.200.128/25"),)})
    assert names(result) == {"a" * 40: []}


def test_own_networks_refuse_after_advertise_changed():
    mine = dataclasses.replace(POLICY, own=(parse_prefix("198.18.200.0/23"),))
    result = redecide([Offer("a" * 40, ("198.18.200.0/24",), (LAN,), False)], mine, {})
    assert names(result) == {"a" * 40: []}
    assert result["a" * 40][1][0][1].startswith("overlaps this node's own network")


def test_clashes_default_routes_only_with_their_own_family():
    assert clashes(V4, V4) and not clashes(V4, V6) and not clashes(V4, LAN)
    assert not clashes(LAN, V4) and clashes(LAN, parse_prefix("198.18.200.128/25"))


nets4 = st.integers(0, 255).map(lambda i: parse_prefix(f"198.18.{i}.0/24"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.lists(nets4, max_size=4, unique=True), st.booleans()),
                min_size=1, max_size=4), st.booleans())
def test_redecide_never_gives_a_prefix_to_two_peers(spec, accept):
    policy = dataclasses.replace(POLICY, accept=accept)
    offers = [Offer(f"{i:040x}", tuple(str(n) for n in nets), (), is_exit)
              for i, (nets, is_exit) in enumerate(spec)]
    result = redecide(offers, policy, {})
    taken = [n for acc, _ref in result.values() for n in acc]
    assert len(taken) == len(set(taken))
    if not accept:
        assert taken == []
    for o in offers:  # every offered prefix is accepted or refused with a reason
        acc, ref = result[o.name]
        assert {str(n) for n in acc} | {p for p, _ in ref} == set(o.offered)


# ---- a link's allowed sources follow its new prefixes ---------------------------------------


def ip4_packet(src: str, dst: str = "100.64.0.1") -> bytearray:
    return bytearray(bytes([0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0])
                     + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed)


def test_sources_and_forwarding_follow_set_nets():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        link = Link(local_uid=b"\x01" * 20, peer_uid=b"\x02" * 20,
                    path=Path(s, ("198.18.0.2", 5000)),
                    overlay_ip4=ipaddress.IPv4Address("100.64.0.2").packed)
        table = ForwardingTable()
        table.add(link)
        link.set_nets((LAN,))
        table.reindex()
        drops: collections.Counter[str] = collections.Counter()
        check = SourceCheck(types.SimpleNamespace(tap=False, mac=None), table, drops)
        iovs = [[b"", ip4_packet("198.18.200.7")], [b"", ip4_packet("198.18.202.7")]]
        assert [bytes(i[1]) for i in check.filter(link, iovs)] == [bytes(iovs[0][1])]
        assert table.routes.lookup(ipaddress.IPv4Address("198.18.200.9").packed) is link
        # the peer now advertises 198.18.202.0/24 instead (a route update)
        link.set_nets((parse_prefix("198.18.202.0/24"),))
        table.reindex()
        assert [bytes(i[1]) for i in check.filter(link, iovs)] == [bytes(iovs[1][1])]
        assert table.routes.lookup(ipaddress.IPv4Address("198.18.200.9").packed) is None
        assert table.routes.lookup(ipaddress.IPv4Address("198.18.202.9").packed) is link
        assert drops["spoofed_source"] == 2 and link.stats.drops["spoofed_source"] == 2
        assert link.source_ok(ip4_packet("100.64.0.2"))  # its own address, always
    finally:
        s.close()


# ---- the node's share: which static peer is an exit, when SNAT applies ---------------------


def test_static_exit_snat_and_exit_wanted():
    from ipop.routing import exit_wanted, static_exit, wants_snat

    c = cfg(peers=[peer(UID_A, "100.64.0.2", allowed_ips=["0.0.0.0/0"]),
                   peer(UID_B, "100.64.0.3")])
    assert static_exit(c, c.peers[0]) and not static_exit(c, c.peers[1]) and exit_wanted(c)
    named = cfg(peers=[peer(UID_B, "100.64.0.3")], exit_node="100.64.0.3")
    assert static_exit(named, named.peers[0]) and exit_wanted(named)
    assert not exit_wanted(cfg(peers=[peer(UID_B, "100.64.0.3")]))
    assert exit_wanted(cfg(exit_node=UID_C))  # a signaled peer, linked or not
    assert not wants_snat(cfg(snat_routes=True))  # nothing advertised: nothing to masquerade
    assert wants_snat(cfg(snat_routes=True, advertise_routes=["198.18.200.0/24"]))
    assert not wants_snat(cfg(advertise_routes=["198.18.200.0/24"]))
