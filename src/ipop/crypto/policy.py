"""Selective security: the one verdict that says whether a link is encrypted, and why.

After Nebula's firewall, policy is a single pure call.  Each end contributes a
:class:`SecurityView` (its ``sec`` default, its security-group list if it sent one, and whether it
insists on encryption); :func:`decide` returns a :class:`Verdict` with a reason for status output.
The data path never reads group lists: it only sees ``Verdict.encrypt``.

Rules, first match wins:

1. either end has ``require_encryption``      -> encrypt   ``require_encryption (local|remote)``
2. both ends sent a group list (even empty)    -> encrypt iff the lists intersect
                                                  ``group:<smallest common group>`` /
                                                  ``no_common_group``
3. otherwise (a peer sent no list)             -> encrypt iff either end's ``sec``  ``sec_default``

A static peer (no signaling, ``remote=None``) is encrypted iff the local ``sec`` says so
(``static_sec``), unless rule 1 applies locally.  Every rule is symmetric, so both ends reach the
same answer from the same two views; if they still disagree (an older peer, a config race),
:func:`reconcile` settles toward encryption.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SecurityView:
    """What one end says about security for a link."""

    sec: bool
    """The ``sec`` config key: the default for links where no group list is known."""
    security_groups: frozenset[str] | None
    """The groups this end sent; None if it sent no list (an older peer)."""
    require_encryption: bool = False
    """This end refuses plain links altogether."""


@dataclass(frozen=True)
class Verdict:
    """Encrypt or not, and the rule that decided."""

    encrypt: bool
    reason: str

    @property
    def security(self) -> str:
        """The value of ``security`` in status and notifications: ``"dtls"`` or ``"none"``."""
        return "dtls" if self.encrypt else "none"


def decide(local: SecurityView, remote: SecurityView | None) -> Verdict:
    """The verdict for a link between ``local`` and ``remote`` (None: a static peer)."""
    if local.require_encryption:
        return Verdict(True, "require_encryption (local)")
    if remote is None:
        return Verdict(local.sec, "static_sec")
    if remote.require_encryption:
        return Verdict(True, "require_encryption (remote)")
    if local.security_groups is not None and remote.security_groups is not None:
        common = local.security_groups & remote.security_groups
        if common:
            return Verdict(True, f"group:{min(common)}")
        return Verdict(False, "no_common_group")
    return Verdict(local.sec or remote.sec, "sec_default")


def reconcile(mine: Verdict, theirs_encrypt: bool | None) -> Verdict:
    """Settle our verdict against the peer's (from ``con_resp``); a disagreement encrypts."""
    if theirs_encrypt is None or theirs_encrypt == mine.encrypt:
        return mine
    return Verdict(True, "disagreement->encrypt")
