"""Controllers: GroupVPN (one shared address space) and SocialVPN (a view per user)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipop.errors import ConfigError

if TYPE_CHECKING:
    from ipop.node import Controller, Node


def make_controller(node: Node) -> Controller:
    """The controller the config names."""
    if node.cfg.controller == "socialvpn":
        try:
            from ipop.controller.socialvpn import SocialVPN  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("controller", "socialvpn is not available in this build") from None
        ctl: Controller = SocialVPN(node)
        return ctl
    from ipop.controller.groupvpn import GroupVPN

    return GroupVPN(node)
