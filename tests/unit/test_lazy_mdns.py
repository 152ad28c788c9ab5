"""``ipop.nat.lazy_mdns``: aioice without dnspython until an mDNS name is resolved."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from ipop.nat import lazy_mdns

HOSTS = ["1f0e5a4c-2b7d-4c1e-9a3b-0d2e6f7a8b9c.local", "a.local", "A-b.local", "x.LOCAL",
         "a..local", ".local", "a.local.", "198.18.0.1", "2001:db8::1", "host.example",
         "a" * 63 + ".local", "a" * 64 + ".local", "a_b.local", ""]


def test_is_mdns_hostname_answers_as_aioice_does() -> None:
    real = lazy_mdns.load_real()
    for host in HOSTS:
        assert lazy_mdns.is_mdns_hostname(host) == real.is_mdns_hostname(host), host


@given(st.text(alphabet="abcXYZ019-._:l", max_size=80).map(lambda s: s + ".local")
       | st.text(max_size=80))
def test_is_mdns_hostname_property(host: str) -> None:
    assert lazy_mdns.is_mdns_hostname(host) == lazy_mdns.load_real().is_mdns_hostname(host)


def _runs_ok(code: str) -> None:
    """``code`` passes its asserts in a fresh interpreter (a clean ``sys.modules``) and
    prints ok."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_nat_imports_no_dnspython_until_mdns_is_used() -> None:
    code = (
        "import sys\n"
        "import ipop.nat.ice, aioice.ice, aioice.mdns as m\n"
        "assert m.__ipop_stand_in__ and aioice.ice.mdns is m\n"
        "assert not any(n == 'dns' or n.startswith('dns.') for n in sys.modules), 'dns loaded'\n"
        "assert not m.is_mdns_hostname('198.18.0.1')\n"
        "f = m.create_mdns_protocol\n"  # any other name: the real module, with dnspython
        "assert f.__module__ == 'aioice.mdns' and 'dns.message' in sys.modules\n"
        "assert m.MDNS_ADDRESS == '224.0.0.251'\n"
        "print('ok')\n"
    )
    _runs_ok(code)


def test_install_leaves_a_loaded_real_module_alone() -> None:
    code = (
        "import sys, aioice.mdns as real\n"
        "from ipop.nat import lazy_mdns\n"
        "assert lazy_mdns.install() is False and sys.modules['aioice.mdns'] is real\n"
        "print('ok')\n"
    )
    _runs_ok(code)
