"""ipop: IP-over-P2P, a peer-to-peer overlay VPN with selective security."""

__version__ = "0.1.0"
