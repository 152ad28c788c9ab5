"""The node configuration: IPOP's JSON keys plus ours, validated into one typed object.

``load(path)`` returns a ``Config`` or raises ``ConfigError`` naming the first bad key; unknown
keys and ignored keys (``stat_report``) come back as warnings.  Every key has a default and a
line in the README.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ipop.errors import ConfigError
from ipop.wire.prefixes import MAX_ROUTES, Net, parse_prefix, parse_prefixes

OVERLAY_V4 = ipaddress.ip_network("100.64.0.0/10")
UNDERLAY_OVERHEAD = 40 + 8  # IPv6 header + UDP header (the worse of IPv4/IPv6)
TURN_OVERHEAD = 4  # ChannelData header
FRAME_OVERHEAD = 1 + 40  # type byte + IPOP header
AEAD_OVERHEAD = 1 + 8 + 16  # epoch + counter + tag
FASTPATH_RESERVE = 8  # room kept for the fast path's per-datagram framing
DEFAULT_MTU_TUN = (
    1500 - UNDERLAY_OVERHEAD - TURN_OVERHEAD - FRAME_OVERHEAD - AEAD_OVERHEAD - FASTPATH_RESERVE
)  # 1374
DEFAULT_MTU_TAP = DEFAULT_MTU_TUN - 14  # 1360: the Ethernet header rides inside the frame

KNOWN_IGNORED = {"stat_report"}
# security-relevant keys take strict types: "no", 0 or "off" for a boolean is an error, never
# coerced (allow_insecure_signaling is listed here whether or not this build knows the key)
STRICT_BOOL_KEYS = frozenset({"sec", "require_encryption", "allow_insecure_signaling"})
STRICT_STR_KEYS = frozenset({"xmpp_tls"})
MAX_WORKERS = 8  # the frame type byte has room for shard numbers 0..7
TYPO_DISTANCE = 2  # an unknown key this close to a known one is a typo: an error


class Peer(BaseModel):
    """A static peer: linked at start, no signaling."""

    model_config = ConfigDict(extra="forbid")
    uid: str = Field(description="40 hex characters: the peer's UID (`ipop id` prints it)")
    ip4: str = Field(description="the peer's overlay IPv4 address")
    endpoint: str | None = Field(
        default=None, description="underlay host:port where the peer listens (a host name is "
        "resolved at start and again when the link goes down); none: a road-warrior peer whose "
        "address is learned from its first authenticated frame (encrypted links only)")
    fingerprint: str | None = Field(default=None, description="the peer's certificate fingerprint")
    mac: str | None = Field(default=None, description="the peer's TAP MAC, learned if absent")
    ip6: str | None = Field(default=None, description="the peer's overlay IPv6 address")
    allowed_ips: list[str] = Field(
        default_factory=list, description="prefixes routed to this peer and accepted as "
        "inner sources from it, besides its ip4/ip6 (WireGuard's AllowedIPs)")

    @field_validator("allowed_ips")
    @classmethod
    def _allowed_ips(cls, v: list[str]) -> list[str]:
        return [str(n) for n in _prefix_list(v)]

    @field_validator("ip6")
    @classmethod
    def _ip6(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return str(ipaddress.IPv6Interface(v).ip)

    @field_validator("uid")
    @classmethod
    def _uid(cls, v: str) -> str:
        v = v.lower()
        if len(v) != 40 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("must be 40 hex characters")
        return v

    @field_validator("ip4")
    @classmethod
    def _ip4(cls, v: str) -> str:
        overlay_unicast(ipaddress.IPv4Address(v))
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None:
            parse_endpoint(v)
        return v

    @field_validator("fingerprint")
    @classmethod
    def _fp(cls, v: str | None) -> str | None:
        if v is None:
            return v
        algo, _, hexes = v.partition(" ")
        parts = hexes.split(":")
        if algo.lower() != "sha-256" or len(parts) != 32 or any(len(p) != 2 for p in parts):
            raise ValueError("must look like 'sha-256 AB:CD:...' (32 bytes)")
        int("".join(parts), 16)
        return "sha-256 " + hexes.upper()


class TurnServer(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    server: str
    user: str
    password: str = Field(alias="pass")

    @field_validator("server")
    @classmethod
    def _server(cls, v: str) -> str:
        parse_endpoint(v, default_port=3478)
        return v


class Config(BaseModel):
    """A node's configuration.  Field names are the JSON keys (IPOP's spelling kept)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # --- from IPOP
    ip4: str = Field(description="this node's overlay IPv4 address")
    ip4_mask: Annotated[int, Field(ge=8, le=30)] = 16
    ip6: str | None = Field(default=None, description="overlay IPv6 address, e.g. 2001:db8::1/64")
    xmpp_username: str | None = None
    xmpp_password: str | None = Field(default=None, repr=False)
    xmpp_host: str | None = None
    sec: StrictBool = True
    switchmode: bool = False
    on_demand_connection: bool = Field(default=False, alias="on-demand_connection")
    on_demand_inactive_timeout: Annotated[float, Field(gt=0)] = Field(
        default=600.0, alias="on-demand_inactive_timeout"
    )
    stun: list[str] = Field(default_factory=list)
    turn: list[TurnServer] = Field(default_factory=list)
    tincan_logging: Annotated[int, Field(ge=0, le=3)] = 1
    controller_logging: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    group: str | None = None
    # --- ours
    controller: Literal["groupvpn", "socialvpn"] = "groupvpn"
    state_dir: str | None = None
    interface: Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[A-Za-z0-9_.-]+$")] = (
        "ipop0"
    )
    mtu: Annotated[int, Field(ge=576, le=9000)] | None = None
    listen_port: Annotated[int, Field(ge=0, le=65535)] = 0
    control_socket: str | None = None
    peers: list[Peer] = Field(default_factory=list)
    xmpp_port: Annotated[int, Field(ge=1, le=65535)] = 5222
    xmpp_tls: Literal["starttls", "direct", "none"] = "starttls"
    xmpp_ca_cert: str | None = None
    allow_insecure_signaling: StrictBool = Field(
        default=False, description='run with xmpp_tls "none" although signaling can then be '
        "read and rewritten on the path (the handshake still protects identities and verdicts)")
    security_groups: list[Annotated[StrictStr, Field(min_length=1, max_length=64)]] | None = None
    require_encryption: StrictBool = False
    offload: bool = True
    whole_trains: bool = True
    rekey_seconds: Annotated[float, Field(ge=5, le=86400)] = 120.0
    workers: int | Literal["auto"] = Field(
        default="auto", description='data-plane shards: "auto" (resolve_workers) or 1..8')
    keepalive_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    ondemand_queue: Annotated[int, Field(ge=0, le=4096)] = 64
    log_format: Literal["text", "json"] = "text"
    metrics_listen: str | None = None
    # --- routing: subnet routes and exit nodes
    advertise_routes: list[str] = Field(
        default_factory=list, description="prefixes reachable through this node (a LAN behind "
        "it; 0.0.0.0/0 and ::/0 make it an exit node), sent to peers in con_req/con_resp")
    accept_routes: StrictBool | list[str] = Field(
        default=False, description="routes advertised by peers to install: false (none), "
        "true (all), or a list of prefixes inside which routes are accepted")
    exit_node: str | None = Field(
        default=None, description="UID or overlay IP of the peer whose default route "
        "(0.0.0.0/0, ::/0) this node uses")
    snat_routes: bool = Field(
        default=False, description="masquerade traffic this node forwards from the overlay "
        "to its advertised routes")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto" and isinstance(v, str):
            return v
        if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_WORKERS:
            return v
        raise ValueError(f'must be "auto" or a whole number from 1 to {MAX_WORKERS}')

    @field_validator("advertise_routes")
    @classmethod
    def _advertise(cls, v: list[str]) -> list[str]:
        return [str(n) for n in _prefix_list(v)]

    @field_validator("accept_routes")
    @classmethod
    def _accept(cls, v: bool | list[str]) -> bool | list[str]:
        if isinstance(v, bool):
            return v
        return [str(n) for n in _prefix_list(v)]

    @field_validator("exit_node")
    @classmethod
    def _exit_node(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if len(v) == 40 and all(c in "0123456789abcdefABCDEF" for c in v):
            return v.lower()
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError("must be a peer's UID (40 hex) or overlay IP address") from None

    @field_validator("ip4")
    @classmethod
    def _ip4(cls, v: str) -> str:
        overlay_unicast(ipaddress.IPv4Address(v))
        return v

    @field_validator("ip6")
    @classmethod
    def _ip6(cls, v: str | None) -> str | None:
        if v is None:
            return v
        iface = ipaddress.IPv6Interface(v if "/" in v else v + "/64")
        overlay_unicast(iface.ip)
        return str(iface)

    @field_validator("stun")
    @classmethod
    def _stun(cls, v: list[str]) -> list[str]:
        for item in v:
            parse_endpoint(item, default_port=3478)
        return v

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, v: str | None) -> str | None:
        if v is not None:
            host, _port = parse_endpoint(v)
            ipaddress.ip_address(host)
        return v

    @field_validator("xmpp_username")
    @classmethod
    def _jid(cls, v: str | None) -> str | None:
        if v is not None and ("@" not in v or v.startswith("@") or v.endswith("@")):
            raise ValueError("must be a JID like user@domain")
        return v

    @model_validator(mode="after")
    def _consistency(self) -> Config:
        own = self.ip4_network
        if self.ip4_mask < 31 and ipaddress.IPv4Address(self.ip4) in (
                own.network_address, own.broadcast_address):
            raise ValueError(f"ip4: {self.ip4} is the network or broadcast address of {own}")
        if self.xmpp_username and not self.xmpp_password:
            raise ValueError("xmpp_password: required when xmpp_username is set")
        if self.xmpp_username and not self.xmpp_host:
            raise ValueError("xmpp_host: required when xmpp_username is set")
        if self.controller == "socialvpn" and self.switchmode:
            raise ValueError("controller: socialvpn translates IPv4 addresses and needs "
                             "switchmode 0 (TUN)")
        if self.controller == "socialvpn" and isinstance(self.workers, int) and self.workers > 1:
            raise ValueError("workers: socialvpn translates addresses in the control process "
                             "only; use workers 1 (or auto)")
        if self.peers and self.listen_port == 0:
            raise ValueError("listen_port: static peers need a fixed listen_port")
        for i, p in enumerate(self.peers):
            if p.endpoint is None and not (self.sec or self.require_encryption):
                raise ValueError(
                    f"peers: peers[{i}] has no endpoint and its link would be plain: nothing "
                    "would authenticate the address it is learned from (give an endpoint, or "
                    "set sec)")
        if self.switchmode:
            for key, value in (("advertise_routes", self.advertise_routes),
                               ("accept_routes", self.accept_routes),
                               ("exit_node", self.exit_node)):
                if value:
                    raise ValueError(f"{key}: subnet routes and exit nodes need switchmode 0 "
                                     "(TUN)")
        for i, net in enumerate(self.advertise_routes):
            if not ipaddress.ip_network(net).prefixlen:
                continue  # an exit node: 0.0.0.0/0, ::/0
            for mine in self.overlay_networks:
                if _overlap(ipaddress.ip_network(net), mine):
                    raise ValueError(f"advertise_routes: advertise_routes[{i}] {net} overlaps "
                                     f"the overlay prefix {mine}")
        for i, p in enumerate(self.peers):
            for j, net in enumerate(p.allowed_ips):
                for mine in self.overlay_networks:
                    n = ipaddress.ip_network(net)
                    if n.prefixlen and _overlap(n, mine):
                        raise ValueError(f"peers: peers[{i}].allowed_ips[{j}] {net} overlaps "
                                         f"the overlay prefix {mine}")
        for i, p in enumerate(self.peers):
            if p.fingerprint is None:
                raise ValueError(
                    f"peers: peers[{i}] needs a fingerprint: every link, plain or encrypted, "
                    "proves its peer in a DTLS handshake; run `ipop id` on that peer"
                )
        if self.xmpp_username and self.xmpp_tls == "none" and not self.allow_insecure_signaling:
            raise ValueError(
                'xmpp_tls: "none" lets anyone on the path read and rewrite signaling; use '
                '"starttls" or "direct" with xmpp_ca_cert, or set allow_insecure_signaling: true'
            )
        return self

    # --- derived values
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or f"/var/lib/ipop/{self.interface}")

    @property
    def control_path(self) -> Path:
        if self.control_socket:
            return Path(self.control_socket)
        return self.state_path / "control.sock"

    @property
    def effective_mtu(self) -> int:
        if self.mtu is not None:
            return self.mtu
        return DEFAULT_MTU_TAP if self.switchmode else DEFAULT_MTU_TUN

    @property
    def ip4_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(f"{self.ip4}/{self.ip4_mask}").network

    @property
    def overlay_networks(self) -> list[Net]:
        nets: list[Net] = [self.ip4_network]
        if self.ip6:
            nets.append(ipaddress.IPv6Interface(self.ip6).network)
        return nets


def _prefix_list(items: list[str]) -> tuple[Net, ...]:
    if len(items) > MAX_ROUTES:
        raise ValueError(f"holds {len(items)} prefixes; at most {MAX_ROUTES}")
    for i, item in enumerate(items):
        try:
            parse_prefix(item)
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}") from None
    return parse_prefixes(items)


def overlay_unicast(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Raise ValueError unless ``addr`` may be an overlay address: unicast, and not loopback,
    link-local, unspecified or in 0.0.0.0/8."""
    bad = ("multicast" if addr.is_multicast else "loopback" if addr.is_loopback
           else "link-local" if addr.is_link_local else "unspecified" if addr.is_unspecified
           else "reserved" if addr.version == 4 and (
               addr in _THIS_NET or addr == ipaddress.IPv4Address("255.255.255.255"))
           else None)
    if bad is not None:
        raise ValueError(f"{addr} is {bad}: an overlay address must be unicast")


_THIS_NET = ipaddress.IPv4Network("0.0.0.0/8")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute; a swap of two letters costs 2)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _check_strict(data: dict[str, Any], known: set[str]) -> None:
    """Strict types for the security keys, and typos of known keys: ConfigError."""
    for key in STRICT_BOOL_KEYS & data.keys():
        if not isinstance(data[key], bool):
            raise ConfigError(key, f"must be true or false (got {data[key]!r})")
    for key in STRICT_STR_KEYS & data.keys():
        if not isinstance(data[key], str):
            raise ConfigError(key, f"must be a string (got {data[key]!r})")
    groups = data.get("security_groups")
    if groups is not None and not (isinstance(groups, list)
                                   and all(isinstance(g, str) for g in groups)):
        raise ConfigError("security_groups", f"must be a list of strings (got {groups!r})")
    for key in data:
        if key in known or key in KNOWN_IGNORED or key in STRICT_BOOL_KEYS:
            continue
        close = sorted((edit_distance(key, k), k) for k in known)
        if close and close[0][0] <= TYPO_DISTANCE:
            raise ConfigError(key, f"unknown key; did you mean {close[0][1]!r}?")


def _overlap(a: Net, b: Net) -> bool:
    return a.version == b.version and a.overlaps(b)


def risks(cfg: Config) -> list[str]:
    """Settings that work but weaken the node (``ipop check`` prints them as warnings)."""
    out: list[str] = []
    if cfg.xmpp_username and cfg.xmpp_tls == "none":
        out.append('xmpp_tls: "none" sends the XMPP password and every con_req/con_resp '
                   '(fingerprints, candidates) in plaintext; use "starttls" or "direct" with '
                   "xmpp_ca_cert")
    if cfg.xmpp_username and cfg.xmpp_tls != "none" and not cfg.xmpp_ca_cert:
        out.append("xmpp_ca_cert: not set; the XMPP server's certificate must chain to the "
                   "system's CAs (pin a self-signed one with xmpp_ca_cert)")
    if not cfg.sec and not cfg.security_groups and not cfg.require_encryption:
        out.append("sec: false with no security_groups: links to peers that send no groups, "
                   "and static links, are plain (unencrypted)")
    if cfg.xmpp_ca_cert:
        try:
            text = Path(cfg.xmpp_ca_cert).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("xmpp_ca_cert", f"cannot read {cfg.xmpp_ca_cert}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ConfigError("xmpp_ca_cert", f"{cfg.xmpp_ca_cert} holds no PEM certificate")
    return out


def parse_endpoint(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into (host, port); raises ValueError with a clear message."""
    host, sep, port_s = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{text!r} must be host:port")
        host, port_s = text, str(default_port)
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{text!r} has no host")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{text!r} has a bad port") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r} port out of range")
    return host, port


def resolve_workers(workers: int | str, cpus: int | None = None) -> int:
    """The number of data-plane shards ``workers`` asks for on a machine with ``cpus`` cores
    (default: this one's).  ``auto`` is 1 whatever the core count: on 2 cores a second shard
    only takes CPU from the first (measured: README, "Shards"), and shards read the shared port
    without GRO, so a gain on more cores is not shown yet; ``workers: N`` asks for N."""
    if isinstance(workers, int):
        return workers
    del cpus  # kept for the day more cores are measured to win
    return 1


def _error_key(err: Any) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    msg = str(err.get("msg", ""))
    if not loc:
        # model-level errors name their key as "key: ..."
        head = msg.removeprefix("Value error, ").split(":", 1)[0]
        return head.strip() or "config"
    key = loc[0]
    if len(loc) > 1:
        key += "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
    return key


def validate(data: Any) -> tuple[Config, list[str]]:
    """Validate a decoded JSON object; returns the config and warnings."""
    if not isinstance(data, dict):
        raise ConfigError("config", "the file must hold one JSON object")
    warnings: list[str] = []
    known = set()
    for name, field in Config.model_fields.items():
        known.add(field.alias or name)
        known.add(name)
    _check_strict(data, known)
    for key in data:
        if key in KNOWN_IGNORED:
            warnings.append(f"config: {key} is accepted and ignored")
        elif key not in known:
            warnings.append(f"config: unknown key {key!r} ignored")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _error_key(err)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        msg = msg.split(": ", 1)[1] if msg.startswith(key + ":") else msg
        value = err.get("input")
        shown = "" if "password" in key or isinstance(value, dict) else f" (got {value!r})"
        raise ConfigError(key, msg + shown) from None
    return cfg, warnings


def load(path: str | os.PathLike[str]) -> tuple[Config, list[str]]:
    """Read and validate a config file; warns when others can read it (it may hold a password)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{p} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("config", f"{p} is not JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise ConfigError("config", f"{p} nests JSON too deeply") from None
    cfg, warnings = validate(data)
    try:
        mode = p.stat().st_mode
        if mode & (stat.S_IROTH | stat.S_IRGRP) and cfg.xmpp_password:
            warnings.append(f"config: {p} is readable by others and holds xmpp_password; chmod 600")
    except OSError:
        pass
    return cfg, warnings
