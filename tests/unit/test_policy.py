"""The selective-security verdict: the rule table, static peers, reconcile, symmetry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipop.crypto.policy import SecurityView, Verdict, decide, reconcile


def view(
    sec: bool = False, groups: set[str] | None = None, require: bool = False
) -> SecurityView:
    return SecurityView(sec, None if groups is None else frozenset(groups), require)


@pytest.mark.parametrize(
    ("local", "remote", "encrypt", "reason"),
    [
        # rule 1: require_encryption wins over everything
        (view(require=True, groups=set()), view(groups=set()), True, "require_encryption (local)"),
        (view(groups={"a"}), view(require=True, groups={"b"}), True, "require_encryption (remote)"),
        (view(require=True), view(require=True), True, "require_encryption (local)"),
        # rule 2: both sent lists
        (view(groups={"a", "b"}), view(groups={"c", "b", "a"}), True, "group:a"),
        (view(groups={"zeta", "eta"}), view(groups={"eta", "zeta"}), True, "group:eta"),
        (view(sec=True, groups={"a"}), view(sec=True, groups={"b"}), False, "no_common_group"),
        (view(sec=True, groups=set()), view(sec=True, groups=set()), False, "no_common_group"),
        (view(groups=set()), view(groups={"a"}), False, "no_common_group"),
        # rule 3: a peer sent no list
        (view(sec=False, groups={"a"}), view(sec=False), False, "sec_default"),
        (view(sec=True, groups={"a"}), view(sec=False), True, "sec_default"),
        (view(sec=False), view(sec=True, groups={"a"}), True, "sec_default"),
        (view(sec=False), view(sec=False), False, "sec_default"),
    ],
)
def test_rules(local: SecurityView, remote: SecurityView, encrypt: bool, reason: str) -> None:
    assert decide(local, remote) == Verdict(encrypt, reason)


@pytest.mark.parametrize(
    ("local", "encrypt", "reason"),
    [
        (view(sec=True), True, "static_sec"),
        (view(sec=False, groups={"a"}), False, "static_sec"),
        (view(sec=False, require=True), True, "require_encryption (local)"),
    ],
)
def test_static_peer(local: SecurityView, encrypt: bool, reason: str) -> None:
    assert decide(local, None) == Verdict(encrypt, reason)


def test_security_label() -> None:
    assert Verdict(True, "x").security == "dtls"
    assert Verdict(False, "x").security == "none"


def test_reconcile() -> None:
    plain = Verdict(False, "no_common_group")
    enc = Verdict(True, "group:a")
    assert reconcile(plain, None) is plain
    assert reconcile(plain, False) is plain
    assert reconcile(enc, True) is enc
    assert reconcile(plain, True) == Verdict(True, "disagreement->encrypt")
    assert reconcile(enc, False) == Verdict(True, "disagreement->encrypt")


groups = st.none() | st.frozensets(st.sampled_from(["a", "b", "c", "d"]), max_size=3)
views = st.builds(SecurityView, st.booleans(), groups, st.booleans())


@given(views, views)
def test_symmetric(a: SecurityView, b: SecurityView) -> None:
    assert decide(a, b).encrypt == decide(b, a).encrypt


@given(views, views)
def test_require_encryption_always_encrypts(a: SecurityView, b: SecurityView) -> None:
    if a.require_encryption or b.require_encryption:
        assert decide(a, b).encrypt
