"""A stand-in for ``aioice.mdns`` that loads the real module (and dnspython) only if used.

aioice imports its mDNS module at import time, and with it dnspython: 46 modules, about 3 MB
of memory and 20 ms of CPU in every node.  ipop never hands aioice an mDNS candidate
(``ipop.nat.params.parse_candidate`` takes IP addresses only), so aioice only ever asks
``is_mdns_hostname`` of a candidate's host, and answers no.  ``install()``, run before aioice is
first imported, puts a small module in ``aioice.mdns``'s place: ``is_mdns_hostname`` answers as
aioice's does, ``MDnsProtocol`` is a name for aioice's annotations (evaluated when its
``ice`` module is imported), and any other name (``create_mdns_protocol``, ...) loads the real
module from aioice's package and is served from it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import sys
import types
from typing import Any

NAME = "aioice.mdns"
# aioice.mdns.MDNS_HOSTNAME_RE (draft-ietf-mmusic-mdns-ice-candidates: a UUID and ".local")
MDNS_HOSTNAME_RE = re.compile(r"^[a-zA-Z0-9-]{1,63}\.local$")

_real: types.ModuleType | None = None


def is_mdns_hostname(name: str) -> bool:
    return MDNS_HOSTNAME_RE.match(name) is not None


class MDnsProtocol:
    """Stands for ``aioice.mdns.MDnsProtocol`` in aioice's annotations; the protocol objects
    themselves come from the real module (``create_mdns_protocol``)."""


def load_real() -> types.ModuleType:
    """aioice's own mDNS module, loaded from its file (once) without replacing the stand-in."""
    global _real
    if _real is None:
        spec = importlib.util.find_spec("aioice")  # a top-level package: found, not imported
        places = spec.submodule_search_locations if spec is not None else None
        sub = importlib.machinery.PathFinder.find_spec(NAME, places)
        if sub is None or sub.loader is None:
            raise ImportError(f"cannot find {NAME}", name=NAME)
        module = importlib.util.module_from_spec(sub)
        sub.loader.exec_module(module)
        _real = module
    return _real


def _forward(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(load_real(), name)


def install() -> bool:
    """Put the stand-in in place unless aioice's mDNS module is loaded already; True if it is
    in place now."""
    current = sys.modules.get(NAME)
    if current is not None:
        return getattr(current, "__ipop_stand_in__", False) is True
    stand_in = types.ModuleType(NAME, __doc__)
    stand_in.__dict__.update(
        __ipop_stand_in__=True,
        MDNS_HOSTNAME_RE=MDNS_HOSTNAME_RE,
        is_mdns_hostname=is_mdns_hostname,
        MDnsProtocol=MDnsProtocol,
        __getattr__=_forward,
    )
    sys.modules[NAME] = stand_in
    return True
