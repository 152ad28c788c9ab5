"""Controllers: GroupVPN (one shared address space) and SocialVPN (a view per user)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ipop.node import Controller, Node


def make_controller(node: Node) -> Controller:
    """The controller the config names."""
    if node.cfg.controller == "socialvpn":
        from ipop.controller.socialvpn import SocialVPN

        return SocialVPN(node)
    from ipop.controller.groupvpn import GroupVPN

    return GroupVPN(node)
