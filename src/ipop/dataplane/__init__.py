"""The data plane ("tincan"): moves packets between the virtual NIC and UDP links.

It knows nothing of XMPP, ICE or the controller: its one facade is ``ipop.dataplane.facade``.
"""
