"""``ipop netcheck`` against a TLS prosody (started from examples/prosody.cfg.lua): STARTTLS and
direct TLS pinned to the server's certificate pass; a pin to another certificate is reported
as a TLS mismatch (by the TLS check and by the login), a wrong password as bad credentials."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipop.testbed.servers import Prosody, make_self_signed_cert

from .fixtures_servers import running_prosody


@pytest.fixture(scope="module")
def xmpp() -> Iterator[Prosody]:
    with running_prosody({"alice": "pw-alice"}, tls=True, direct_tls=True) as server:
        yield server


def netcheck(tmp_path: Path, cfg: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"ip4": "100.64.0.1", **cfg}))
    path.chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "ipop", "netcheck", "-c", str(path), "--json",
                        "--timeout", "3"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.stdout, r.stderr
    return r.returncode, {c["name"]: c for c in json.loads(r.stdout)["checks"]}


def cfg(xmpp: Prosody, **extra: Any) -> dict[str, Any]:
    return {"xmpp_username": "alice@ipop.test", "xmpp_password": "pw-alice",
            "xmpp_host": "127.0.0.1", "xmpp_port": xmpp.port, "xmpp_tls": "starttls",
            "xmpp_ca_cert": str(xmpp.cert_path), **extra}


@pytest.mark.parametrize("mode", ["starttls", "direct"])
def test_pinned_tls_and_login_pass(xmpp, tmp_path, mode):
    port = xmpp.port if mode == "starttls" else xmpp.direct_tls_port
    rc, checks = netcheck(tmp_path, cfg(xmpp, xmpp_tls=mode, xmpp_port=port))
    assert checks["xmpp_tcp"]["ok"] and checks["xmpp_tls"]["ok"], checks
    assert "certificate verified" in checks["xmpp_tls"]["detail"]
    assert checks["xmpp_login"]["ok"], checks["xmpp_login"]
    assert rc == 0


@pytest.mark.parametrize("mode", ["starttls", "direct"])
def test_pin_to_another_certificate_is_a_tls_mismatch(xmpp, tmp_path, mode):
    other = tmp_path / "other.crt"
    make_self_signed_cert("ipop.test", other, tmp_path / "other.key")
    port = xmpp.port if mode == "starttls" else xmpp.direct_tls_port
    rc, checks = netcheck(tmp_path, cfg(xmpp, xmpp_tls=mode, xmpp_port=port,
                                        xmpp_ca_cert=str(other)))
    assert rc == 1
    assert checks["xmpp_tls"]["cause"] == "tls_mismatch", checks["xmpp_tls"]
    assert checks["xmpp_login"]["cause"] == "tls_mismatch", checks["xmpp_login"]


def test_wrong_password_is_bad_credentials(xmpp, tmp_path):
    rc, checks = netcheck(tmp_path, cfg(xmpp, xmpp_password="wrong"))
    assert rc == 1 and checks["xmpp_tls"]["ok"]
    assert checks["xmpp_login"]["cause"] == "bad_credentials", checks["xmpp_login"]
