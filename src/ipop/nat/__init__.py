"""ipop.nat: NAT traversal (ICE over aioice, STUN and TURN via coturn) for the controller.

* ``params``  — ``TurnConf``, ``IceParams`` (to/from the signaling ``candidates`` field),
  ``SelectedPath``: pure, no aioice import.
* ``filters`` — which local and remote addresses ICE may use (never the overlay or ipop's NIC).
* ``ice``     — ``IceLink`` (one per peer link: gather, connect, feed, close), ``IceDispatcher``
  (routes the data plane's STUN datagrams back to their IceLink), ``IceFailed``.
* ``conn``    — aioice's ``Connection`` adjusted for ipop (the only place that touches its
  private state, with ``ice._turn_client``).
* ``probe``   — a command-line agent used by ``tests/net/test_nat_ice.py``.

Import ``ipop.nat.ice`` lazily: it pulls in aioice (about 0.2 s).
"""

from ipop.nat import lazy_mdns

lazy_mdns.install()  # aioice without dnspython unless an mDNS name is ever resolved
