"""Config strictness (issue 16, part 5): security keys take strict types, typos of known keys
are errors that name the right key, overlay addresses are unicast."""

from __future__ import annotations

from typing import Any

import pytest

from ipop import config
from ipop.errors import ConfigError

BASE = {"ip4": "100.64.0.1", "ip4_mask": 24}


@pytest.mark.parametrize(("extra", "message"), [
    ({"sec": "no"}, "config: sec: must be true or false (got 'no')"),
    ({"sec": 0}, "config: sec: must be true or false (got 0)"),
    ({"require_encryption": "off"},
     "config: require_encryption: must be true or false (got 'off')"),
    ({"require_encryption": 1}, "config: require_encryption: must be true or false (got 1)"),
    ({"allow_insecure_signaling": "yes"},
     "config: allow_insecure_signaling: must be true or false (got 'yes')"),
    ({"security_groups": "blue"},
     "config: security_groups: must be a list of strings (got 'blue')"),
    ({"security_groups": ["blue", 7]},
     "config: security_groups: must be a list of strings (got ['blue', 7])"),
    ({"xmpp_tls": False}, "config: xmpp_tls: must be a string (got False)"),
    ({"require_encryptoin": True}, "config: require_encryptoin: unknown key; did you mean "
                                   "'require_encryption'?"),
    ({"securty_groups": ["a"]}, "config: securty_groups: unknown key; did you mean "
                                "'security_groups'?"),
    ({"xmpp_tsl": "none"}, "config: xmpp_tsl: unknown key; did you mean 'xmpp_tls'?"),
])
def test_strict_security_keys_and_typos(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.validate({**BASE, **extra})
    assert str(err.value) == message


@pytest.mark.parametrize("ip4", ["127.0.0.5", "0.0.0.0", "0.1.2.3", "169.254.1.1", "224.0.0.1",
                                 "255.255.255.255"])
def test_overlay_ip4_must_be_unicast(ip4: str) -> None:
    with pytest.raises(ConfigError, match=r"^config: ip4: .* an overlay address must be unicast"):
        config.validate({**BASE, "ip4": ip4})


@pytest.mark.parametrize("ip4", ["100.64.0.0", "100.64.0.255"])
def test_overlay_ip4_is_not_the_network_or_broadcast_address(ip4: str) -> None:
    with pytest.raises(ConfigError, match=r"network or broadcast address of 100\.64\.0\.0/24"):
        config.validate({**BASE, "ip4": ip4})


@pytest.mark.parametrize("ip6", ["::1/64", "fe80::1/64", "::/64", "ff02::1/64"])
def test_overlay_ip6_must_be_unicast(ip6: str) -> None:
    with pytest.raises(ConfigError, match=r"^config: ip6: .* must be unicast"):
        config.validate({**BASE, "ip6": ip6})


def test_static_peer_address_must_be_unicast() -> None:
    peer = {"uid": "ab" * 20, "ip4": "127.0.0.1", "endpoint": "198.18.0.2:5000"}
    with pytest.raises(ConfigError, match=r"peers\[0\]\.ip4: .* loopback"):
        config.validate({**BASE, "sec": False, "listen_port": 5000, "peers": [peer]})


def test_good_values_and_far_unknown_keys_pass() -> None:
    cfg, warnings = config.validate({**BASE, "sec": False, "require_encryption": True,
                                     "security_groups": ["blue"], "xmpp_tls": "none",
                                     "colour": "blue"})
    assert cfg.sec is False and cfg.require_encryption is True
    assert warnings == ["config: unknown key 'colour' ignored"]
    assert config.edit_distance("require_encryptoin", "require_encryption") == 2
