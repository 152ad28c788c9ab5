"""Real servers (prosody, coturn) as foreground child processes for tests and the demo.

Each launcher renders its config from the deployment examples (``examples/prosody.cfg.lua``,
``examples/turnserver.conf``: the files docs/deploy.md tells operators to install), substituting
only addresses, ports, the domain/realm, accounts and paths, so the examples cannot rot: every
test and the demo run on them.  It writes the result into a work directory, starts the server
in the foreground (optionally inside a network namespace via ``ip netns exec``), keeps its PID,
waits until its port is bound, and stops it by that PID.  Nothing here touches a system-wide
config or service.

    with Prosody(tmp / "xmpp", port=free_port) as xmpp:       # started on __enter__
        xmpp.register("alice", "pw")
        xmpp.set_groups({"lab": ["alice", "bob"]})             # restarts a running server
        ...                                                    # stopped (SIGTERM, then SIGKILL)

Server output (console logging) goes to ``<workdir>/<name>.log``; a failed start raises
``EnvironmentFault`` quoting the tail of that output.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from ipop.errors import ConfigError, EnvironmentFault

__all__ = ["Coturn", "Prosody", "ServerProcess", "make_self_signed_cert"]

START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
_POLL = 0.02
_TAIL = 4000


def examples_dir() -> Path:
    """The repository's ``examples/`` (or ``$IPOP_EXAMPLES``)."""
    env = os.environ.get("IPOP_EXAMPLES")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "examples"
    if not path.is_dir():
        raise EnvironmentFault(f"no examples directory at {path} (set IPOP_EXAMPLES)")
    return path


def render(name: str, substitutions: Sequence[tuple[str, str]]) -> str:
    """``examples/NAME`` with each literal replaced; a literal the example lacks is an error (the
    example changed in a way the test bed no longer matches)."""
    path = examples_dir() / name
    try:
        text = path.read_text()
    except OSError as exc:
        raise EnvironmentFault(f"cannot read {path}: {exc.strerror}") from None
    for old, new in substitutions:
        if old not in text:
            raise EnvironmentFault(f"{path} no longer contains {old!r}: update "
                                   "ipop.testbed.servers to match the example")
        text = text.replace(old, new)
    return text


def _netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _lua_str(value: str) -> str:
    """A Lua double-quoted string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _bound(proto: str, ip: str, port: int, netns: str | None) -> bool:
    """Whether a socket of ``proto`` ("tcp"/"udp") listens on ip:port (in ``netns``)."""
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    try:
        out = subprocess.run(
            [*_netns_prefix(netns), "ss", flag],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    wanted = {f"{ip}:{port}", f"[{ip}]:{port}", f"*:{port}", f"0.0.0.0:{port}"}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[3] in wanted:
            return True
    return False


def make_self_signed_cert(domain: str, cert_path: Path, key_path: Path) -> None:
    """Write a self-signed P-256 certificate for ``domain`` (PEM) that a client can pin as its CA.

    It is its own CA (basicConstraints CA:TRUE) and names ``domain`` in subjectAltName, so Python's
    ``ssl`` accepts it with ``load_verify_locations(cert_path)`` and hostname checking on.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class ServerProcess:
    """One server run in the foreground as our child; subclasses give argv and readiness."""

    name = "server"
    binary = ""

    def __init__(self, workdir: Path, netns: str | None) -> None:
        self.workdir = Path(workdir)
        self.netns = netns
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0

    # -- subclass hooks -------------------------------------------------------------------------
    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """PID of the running server (None when stopped)."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def output(self) -> str:
        """The server's output since the last start (its tail, at most a few kB)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                data = f.read()
        except OSError:
            return ""
        return data[-_TAIL:].decode("utf-8", "replace")

    def start(self) -> None:
        """Start the server and wait (max ~5 s) until its port is bound."""
        if self.running:
            return
        if shutil.which(self.binary) is None:
            raise EnvironmentFault(f"{self.name}: program {self.binary!r} not found (apt install?)")
        if self.netns and shutil.which("ip") is None:
            raise EnvironmentFault(f"{self.name}: 'ip' (iproute2) not found")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open while the child runs)
        self._log_start = self._log.tell()
        self._proc = subprocess.Popen(
            [*_netns_prefix(self.netns), *self.argv()],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._cleanup()
                raise EnvironmentFault(
                    f"{self.name} exited with status {code} while starting; its output:\n"
                    f"{self.output()}"
                )
            if self.ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise EnvironmentFault(
                    f"{self.name} did not bind its port within {START_TIMEOUT:.0f} s; "
                    f"its output:\n{self.output()}"
                )
            time.sleep(_POLL)

    def stop(self) -> None:
        """Stop the server by its PID: SIGTERM, then SIGKILL after a few seconds."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGCONT)  # in case a test paused it with SIGSTOP
                proc.wait(timeout=STOP_TIMEOUT)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
        self._cleanup()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _cleanup(self) -> None:
        if self._proc is not None and self._proc.poll() is None:  # pragma: no cover
            return
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Prosody(ServerProcess):
    """A prosody XMPP server with its own config, accounts and shared-roster groups.

    ``tls=False``: mod_tls is not loaded, STARTTLS is not offered, and clients log in in plaintext
    (SCRAM without TLS), which the client must allow (``xmpp_tls = "none"``).

    ``tls=True``: a self-signed certificate for ``domain`` is generated (``cert_path``), and
    encryption is required; clients pin it (``xmpp_ca_cert``) and use STARTTLS on ``port`` or
    direct TLS on ``direct_tls_port`` when that is set.
    """

    name = "prosody"
    binary = "prosody"

    def __init__(
        self,
        workdir: Path,
        domain: str = "ipop.test",
        port: int = 5222,
        bind: str = "127.0.0.1",
        netns: str | None = None,
        tls: bool = False,
        direct_tls_port: int | None = None,
    ) -> None:
        super().__init__(workdir, netns)
        try:
            ipaddress.ip_address(bind)
        except ValueError:
            raise ConfigError("bind", f"not an IP address: {bind!r}") from None
        self.domain = domain
        self.port = port
        self.bind = bind
        self.tls = tls
        self.direct_tls_port = direct_tls_port if tls else None
        self.config_path = self.workdir / "prosody.cfg.lua"
        self.data_path = self.workdir / "data"
        self.groups_path = self.workdir / "groups.txt"
        self.pid_path = self.workdir / "prosody.pid"
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self.data_path.mkdir(exist_ok=True)
        os.chmod(self.data_path, 0o700)
        if not self.groups_path.exists():
            self.groups_path.write_text("")
        if tls:
            self.cert_path = self.workdir / f"{domain}.crt"
            self.key_path = self.workdir / f"{domain}.key"
            if not self.cert_path.exists():
                make_self_signed_cert(domain, self.cert_path, self.key_path)
        self.config_path.write_text(self._config())

    def _config(self) -> str:
        """``examples/prosody.cfg.lua`` with this server's address, ports, domain and paths."""
        q = _lua_str
        direct = f"{{ {self.direct_tls_port} }}" if self.direct_tls_port else "{ }"
        subs = [
            ('"/run/prosody/prosody.pid"', q(str(self.pid_path))),
            ('"/var/lib/prosody"', q(str(self.data_path))),
            ('"203.0.113.10"', q(self.bind)),
            ("c2s_ports = { 5222 }", f"c2s_ports = {{ {self.port} }}"),
            ("c2s_direct_tls_ports = { 5223 }", f"c2s_direct_tls_ports = {direct}"),
            ('"/etc/prosody/ipop-groups.txt"', q(str(self.groups_path))),
            ('"/etc/prosody/certs/vpn.example.org.crt"', q(str(self.cert_path or ""))),
            ('"/etc/prosody/certs/vpn.example.org.key"', q(str(self.key_path or ""))),
            ('"/etc/prosody/certs"', q(str(self.workdir))),
            ('VirtualHost "vpn.example.org"', f"VirtualHost {q(self.domain)}"),
        ]
        lines = ["-- rendered by ipop.testbed.servers from examples/prosody.cfg.lua",
                 "run_as_root = true  -- the test bed runs prosody as root"]
        for line in render("prosody.cfg.lua", subs).splitlines():
            if line.rstrip().endswith("-- tls") and not self.tls:
                # without tls, mod_tls would offer STARTTLS with no certificate: every
                # handshake fails; clients log in in plaintext instead
                if line.startswith("c2s_require_encryption"):
                    lines.append("c2s_require_encryption = false")
                continue
            lines.append(line)
        return "\n".join(lines) + "\n"

    def argv(self) -> list[str]:
        return ["prosody", "--config", str(self.config_path), "-F"]

    def ready(self) -> bool:
        if not _bound("tcp", self.bind, self.port, self.netns):
            return False
        return self.direct_tls_port is None or _bound(
            "tcp", self.bind, self.direct_tls_port, self.netns
        )

    def jid(self, user: str) -> str:
        """``user@domain`` (a bare JID of this server)."""
        return user if "@" in user else f"{user}@{self.domain}"

    def register(self, user: str, password: str) -> str:
        """Create (or re-password) an account, server running or stopped.  Returns its JID."""
        local = user.split("@", 1)[0]
        proc = subprocess.run(
            [
                *_netns_prefix(self.netns),
                "prosodyctl",
                "--config",
                str(self.config_path),
                "register",
                local,
                self.domain,
                password,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise EnvironmentFault(
                f"prosodyctl register {local} failed ({proc.returncode}): "
                f"{(proc.stdout + proc.stderr).strip()}"
            )
        return self.jid(local)

    def set_groups(self, groups: Mapping[str, Iterable[str]], *, restart: bool = True) -> None:
        """Write the shared-roster groups (``{group: [user or jid, ...]}``) for mod_groups.

        mod_groups reads ``groups_file`` only when it loads, and a client's roster is built at its
        login, so a change needs a server restart and clients must log in again (ipop clients
        reconnect on their own).  With ``restart`` (the default) a running server is restarted.
        """
        out: list[str] = []
        for group, members in groups.items():
            if not group or any(c in group for c in "[]\n"):
                raise ConfigError("group", f"unusable group name {group!r}")
            out.append(f"[{group}]")
            out.extend(f"{self.jid(m)}={m.split('@', 1)[0]}" for m in members)
        self.groups_path.write_text("\n".join(out) + "\n")
        if restart and self.running:
            self.restart()


def _peer_range(spec: str) -> str:
    """``198.18.0.0/15`` -> ``198.18.0.0-198.19.255.255`` (coturn's syntax); ranges pass through."""
    if "/" not in spec:
        return spec
    try:
        net = ipaddress.ip_network(spec, strict=False)
    except ValueError:
        raise ConfigError("allowed_peer_range", f"not a network: {spec!r}") from None
    return f"{net.network_address}-{net.broadcast_address}"


class Coturn(ServerProcess):
    """A coturn TURN/STUN server (UDP, long-term credentials) relaying only to the test range."""

    name = "coturn"
    binary = "turnserver"

    def __init__(
        self,
        workdir: Path,
        listen_ip: str,
        relay_ip: str,
        realm: str = "ipop.test",
        users: Mapping[str, str] | None = None,
        port: int = 3478,
        netns: str | None = None,
        allowed_peer_range: str | Sequence[str] = "198.18.0.0/15",
    ) -> None:
        super().__init__(workdir, netns)
        for key, ip in (("listen_ip", listen_ip), ("relay_ip", relay_ip)):
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(key, f"not an IP address: {ip!r}") from None
        self.listen_ip = listen_ip
        self.relay_ip = relay_ip
        self.realm = realm
        self.users = dict(users or {})
        for user, password in self.users.items():
            if not user or ":" in user or any(c.isspace() for c in user + password):
                raise ConfigError("users", f"unusable TURN user/password for {user!r}")
        self.port = port
        ranges = [allowed_peer_range] if isinstance(allowed_peer_range, str) else allowed_peer_range
        self.allowed = [_peer_range(r) for r in ranges]
        self.config_path = self.workdir / "turnserver.conf"
        self.db_path = self.workdir / "turndb"
        self.pid_path = self.workdir / "turnserver.pid"
        self.config_path.write_text(self._config())

    def _config(self) -> str:
        """``examples/turnserver.conf`` with this server's addresses, port, realm, users and
        paths; it relays to nothing but ``allowed_peer_range``."""
        text = render("turnserver.conf", [
            ("listening-port=3478", f"listening-port={self.port}"),
            ("listening-ip=10.0.0.5", f"listening-ip={self.listen_ip}"),
            ("relay-ip=10.0.0.5", f"relay-ip={self.relay_ip}"),
            ("external-ip=203.0.113.10/10.0.0.5", f"external-ip={self.relay_ip}/{self.relay_ip}"),
            ("realm=vpn.example.org", f"realm={self.realm}"),
            ("user=ipop:CHANGE-THIS-TURN-PASSWORD",
             "\n".join(f"user={u}:{p}" for u, p in self.users.items())),
            ("/var/lib/turn/turndb", str(self.db_path)),
            ("/run/turnserver/turnserver.pid", str(self.pid_path)),
        ])
        lines = ["# rendered by ipop.testbed.servers from examples/turnserver.conf"]
        allowed_done = False
        for line in text.splitlines():
            if line.startswith("allowed-peer-ip="):
                if not allowed_done:
                    lines.extend(f"allowed-peer-ip={r}" for r in self.allowed)
                    allowed_done = True
                continue
            lines.append(line)
        if not allowed_done:
            raise EnvironmentFault("examples/turnserver.conf has no allowed-peer-ip line")
        return "\n".join(lines) + "\n"

    def argv(self) -> list[str]:
        return ["turnserver", "-c", str(self.config_path)]

    def ready(self) -> bool:
        return _bound("udp", self.listen_ip, self.port, self.netns)

    @property
    def url(self) -> str:
        """``turn:IP:PORT`` for clients."""
        return f"turn:{self.listen_ip}:{self.port}"
