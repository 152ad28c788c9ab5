"""Run ``ipop up`` as an attacker would: a real node whose code was patched (issue 16 tests).

Started as ``python patched_node.py python -m ipop up -c CONFIG ...`` (``NodeProc.start`` with this
file as its ``prefix``); the patches come from the ``IPOP_ATTACK`` environment variable (JSON):

- ``uid``: the node claims this UID in presence, con_req and con_resp (its key stays its own, as
  it must: it cannot hold the key of the UID it claims);
- ``rewrite_groups``: ``{"from": "to"}``, applied to the security groups of every message this
  node sends, *after* its controller built and recorded it: a man in the middle on the
  signaling path (plaintext XMPP, a malicious server);
- ``strip_encrypt``: true: the same man in the middle removes the ``encrypt`` flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any


def patch(spec: dict[str, Any]) -> None:
    from ipop.controller import groupvpn
    from ipop.signal import xmpp
    from ipop.wire.signal import SignalMessage

    if "uid" in spec:
        claimed = str(spec["uid"])
        groupvpn.GroupVPN.my_uid = property(lambda self: claimed)  # type: ignore[assignment]
    rewrite: dict[str, str] = spec.get("rewrite_groups", {})
    strip = bool(spec.get("strip_encrypt"))
    if rewrite or strip:
        original = xmpp.XmppSignal.send

        async def send(self: Any, peer_jid: str, msg: SignalMessage) -> bool:
            changes: dict[str, Any] = {}
            if rewrite and msg.security_groups is not None:
                changes["security_groups"] = tuple(rewrite.get(g, g)
                                                   for g in msg.security_groups)
            if strip and msg.encrypt is not None:
                changes["encrypt"] = None
            if changes:
                msg = dataclasses.replace(msg, **changes)
            return await original(self, peer_jid, msg)

        xmpp.XmppSignal.send = send  # type: ignore[method-assign]


if __name__ == "__main__":
    patch(json.loads(os.environ.get("IPOP_ATTACK", "{}")))
    from ipop.cli.main import main

    sys.argv = ["ipop", *sys.argv[4:]]  # drop "python -m ipop"
    sys.exit(main())
