"""Run ejabberd (the seed paper's XMPP server) as a foreground child process for tests and demos.

``Ejabberd`` is a ``ServerProcess`` like ``Prosody``: it writes its own ``ejabberd.yml`` and
``ejabberdctl.cfg`` into a work directory, runs the Erlang VM in the foreground (optionally inside
a network namespace), waits until it has started and bound the c2s port, and stops by PID::

    with Ejabberd(tmp / "ejabberd", bind="198.19.1.1", netns=ns) as xmpp:   # ~2 s, ~80-100 MB
        xmpp.register("alice", "pw")                          # ~20 ms, server running or not
        xmpp.set_groups({"lab": ["alice", "bob"]})            # shared roster, applied live
        ...                                                   # stopped, work dir removed

How it runs (the traps, see REAL-PARTS.md):

- ``ejabberdctl foreground`` would fork (``su``, or a bash that waits), so the PID we keep would
  not be the server's.  Instead the same command line is run directly:
  ``[ip netns exec NS] setpriv --reuid=ejabberd ... env VARS erl ARGS``; every step execs, so
  our child *is* ``beam.smp``.  The VM runs as the ``ejabberd`` user: the work dir is chowned,
  and each of its parent directories must be searchable by that user.
- No ``epmd``: Erlang distribution (needed only for the admin calls below) listens on a fixed
  port on 127.0.0.1 (``-erl_epmd_port PORT -start_epmd false``, ``ERL_DIST_PORT`` and
  ``INET_DIST_INTERFACE=127.0.0.1`` in ``ejabberdctl.cfg``), with a random cookie.
- Accounts and shared-roster groups are made through that distribution port with ``erl_call``
  (part of erlang-base; a C program, ~20 ms a call, starts nothing that outlives it).
  ``ejabberdctl --config-dir WORKDIR CMD ...`` (``ctl``) works too, but takes ~1.2 s a call.
- ``stop()`` sends SIGTERM to the VM (a clean stop takes ~1-3 s), SIGKILL after 5 s, then ends by
  PID any of its descendants still alive (erl_child_setup, inet_gethost, eimp, memsup).

GroupVPN: ipop's XMPP backend counts roster contacts whose roster group is the node's ``group``
and whose subscription is ``both``.  ``set_groups`` makes one ``mod_shared_roster`` group per
name, labelled with that name and displaying itself, so each member's roster holds every other
member in roster group ``name`` with subscription ``both``; ejabberd pushes changes to clients
that are online, so no restart is needed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from ipop.errors import ConfigError, EnvironmentFault
from ipop.testbed.proc import end_pids
from ipop.testbed.servers import ServerProcess, _bound, _netns_prefix

__all__ = ["Ejabberd"]

START_TIMEOUT = 20.0
"""The first start creates the Mnesia database and a translation cache: ~4 s idle, more on a
loaded CI machine.  Later starts take ~2 s."""
CALL_TIMEOUT = 20
_POLL = 0.02
_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")
_NODE = "ejabberd@localhost"
_ERL_LIBS = "/usr/lib/x86_64-linux-gnu"  # where Debian installs ejabberd's own beam files
_ERL_CALL_FALLBACK = "/usr/lib/erlang/bin/erl_call"


_STARTED = (
    "case lists:keymember(ejabberd, 1, application:which_applications()) of "
    "true -> ok; false -> starting end"
)
_SET_GROUPS = """
H = {host}, Want = [{want}],
[mod_admin_extra:srg_delete(G, H)
 || G <- mod_admin_extra:srg_list(H), not lists:keymember(G, 1, Want)],
Opts = fun(G) -> lists:sort([{{label, G}}, {{displayed_groups, [G]}}, {{description, <<>>}}]) end,
Sync = fun({{G, Us}}) ->
    Have = case lists:member(G, mod_admin_extra:srg_list(H)) of
        true -> lists:sort(mod_shared_roster:get_group_opts(H, G));
        false -> none
    end,
    case Have =:= Opts(G) of
        true -> ok;
        false -> ok = mod_admin_extra:srg_create(G, H, G, <<>>, [G])
    end,
    In = mod_shared_roster:get_group_explicit_users(H, G),
    [ok = mod_admin_extra:srg_user_del(U, S, G, H)
     || {{U, S}} <- In, not (S =:= H andalso lists:member(U, Us))],
    [ok = mod_admin_extra:srg_user_add(U, H, G, H) || U <- Us, not lists:member({{U, H}}, In)],
    ok
end,
lists:foreach(Sync, Want),
ok"""
"""Erlang: make the shared-roster groups of host ``H`` exactly ``Want`` ([{Group, [User]}]),
touching only what differs (a re-created group or a re-added member is pushed to online clients
as a roster change)."""


def _erl_bin(value: str) -> str:
    """An Erlang binary literal of ``value`` (UTF-8 bytes as numbers: nothing to escape)."""
    return "<<" + ",".join(str(b) for b in value.encode()) + ">>"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _proc_start(pid: int) -> str | None:
    """A process's start time (jiffies since boot, /proc/PID/stat field 22), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None


def _descendants(root: int) -> dict[int, str]:
    """``{pid: start time}`` of every living descendant of ``root``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        started = _proc_start(pid)
        if started is not None:
            found[pid] = started
        todo.extend(children.get(pid, []))
    return found


class Ejabberd(ServerProcess):
    """An ejabberd XMPP server with its own config, accounts and shared-roster groups.

    Clients log in in plaintext (no STARTTLS offered, SCRAM or PLAIN against the internal
    database), so they must allow it (``xmpp_tls = "none"``).  ``dist_port`` is the Erlang
    distribution port on 127.0.0.1 (of ``netns``); by default 4370 in a namespace, a free port
    otherwise.  ``user`` is the account the VM runs as (``None``: stay root).
    """

    name = "ejabberd"
    binary = "ejabberdctl"

    def __init__(
        self,
        workdir: Path,
        domain: str = "ipop.test",
        port: int = 5222,
        bind: str = "127.0.0.1",
        netns: str | None = None,
        *,
        dist_port: int | None = None,
        user: str | None = "ejabberd",
    ) -> None:
        workdir = Path(workdir).absolute()
        if any(c in str(workdir) for c in "\"\\'\n$`"):
            raise ConfigError("workdir", f"unusable characters in {str(workdir)!r}")
        super().__init__(workdir, netns)
        try:
            ipaddress.ip_address(bind)
        except ValueError:
            raise ConfigError("bind", f"not an IP address: {bind!r}") from None
        if not _NAME_RE.fullmatch(domain):
            raise ConfigError("domain", f"not a lower-case domain name: {domain!r}")
        self.domain = domain
        self.port = port
        self.bind = bind
        self.dist_port = dist_port or (4370 if netns else _free_port())
        if self.dist_port == port:
            raise ConfigError("dist_port", f"{self.dist_port} is also the c2s port")
        if user is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]*", user):
            raise ConfigError("user", f"not a user name: {user!r}")
        self.user = user
        self.cookie = secrets.token_hex(16)
        self.config_path = self.workdir / "ejabberd.yml"
        self.ctl_config_path = self.workdir / "ejabberdctl.cfg"
        self.db_path = self.workdir / "db"
        self.logs_path = self.workdir / "logs"
        self.pid_path = self.workdir / "ejabberd.pid"
        self._pending: list[str] = []  # Erlang expressions to run once the server is up
        self._booting = False
        self._helpers: dict[int, str] = {}  # the VM's descendants {pid: start time}, for stop()
        for d in (self.db_path, self.logs_path):
            d.mkdir(exist_ok=True)
        (self.workdir / "inetrc").write_text(
            '{lookup, ["file", "native"]}.\n{host, {127,0,0,1}, ["localhost"]}.\n'
        )
        self.config_path.write_text(self._config())
        self.ctl_config_path.write_text(self._ctl_config())
        os.chmod(self.ctl_config_path, 0o600)  # holds the cookie

    # -- configuration ------------------------------------------------------------------------
    def _config(self) -> str:
        q = json.dumps  # a JSON string is a YAML double-quoted scalar
        lines = [
            "# written by ipop.testbed.ejabberd; every run writes it anew",
            f"hosts: [{q(self.domain)}]",
            "loglevel: info",
            "hide_sensitive_log_data: true",
            "acme: {auto: false}",
            "default_db: mnesia",
            "auth_method: [internal]",
            "auth_password_format: scram",  # SCRAM-SHA-1 and PLAIN both work against it
            "s2s_access: none",
            "listen:",
            f"  - port: {self.port}",
            f"    ip: {q(self.bind)}",
            "    module: ejabberd_c2s",
            "    starttls: false",
            "    starttls_required: false",
            "    access: c2s",
            "    shaper: none",
            "    max_stanza_size: 262144",
            "acl:",
            "  local:",
            '    user_regexp: ""',
            "access_rules:",
            "  c2s:",
            "    allow: all",
            "  register:",
            "    deny: all",
            # no mod_offline: stored con_req/con_resp would be replayed at the next login;
            # no mod_register: accounts come from register(); no http listener at all
            "modules:",
            "  mod_roster: {versioning: false}",
            "  mod_shared_roster: {}",
            "  mod_ping: {}",
            "  mod_disco: {}",
            "  mod_admin_extra: {}",  # the srg_* commands of ctl()
            "",
        ]
        return "\n".join(lines)

    def _ctl_config(self) -> str:
        """For ``ejabberdctl --config-dir WORKDIR`` (and the values the server's argv uses)."""
        q = shlex.quote
        values = {
            "ERLANG_NODE": _NODE,
            "ERL_DIST_PORT": str(self.dist_port),
            "INET_DIST_INTERFACE": "127.0.0.1",
            "ERL_OPTIONS": f"-env ERL_CRASH_DUMP_BYTES 0 -setcookie {self.cookie}",
            "EJABBERD_CONFIG_PATH": str(self.config_path),
            "SPOOL_DIR": str(self.db_path),
            "LOGS_DIR": str(self.logs_path),
            "EJABBERD_PID_PATH": str(self.pid_path),
            "CONTRIB_MODULES_PATH": str(self.workdir / "modules"),
            "CONTRIB_MODULES_CONF_DIR": str(self.workdir / "modules"),
            "EJABBERD_BYPASS_WARNINGS": "true",
        }
        head = "# written by ipop.testbed.ejabberd; use: ejabberdctl --config-dir WORKDIR CMD"
        return "\n".join([head, *(f"{k}={q(v)}" for k, v in values.items()), ""])

    def _env(self) -> list[str]:
        logs = self.logs_path
        return [
            f"HOME={self.workdir}",
            f"EJABBERD_CONFIG_PATH={self.config_path}",
            f"EJABBERD_LOG_PATH={logs / 'ejabberd.log'}",
            f"EJABBERD_PID_PATH={self.pid_path}",
            f"CONTRIB_MODULES_PATH={self.workdir / 'modules'}",
            f"ERL_INETRC={self.workdir / 'inetrc'}",
            f"ERL_LIBS={_ERL_LIBS}",
            f"ERL_CRASH_DUMP={logs / 'erl_crash.dump'}",
            f"ERL_DIST_PORT={self.dist_port}",
        ]

    def argv(self) -> list[str]:
        as_user: list[str] = []
        if self.user is not None:
            u = self.user
            as_user = ["setpriv", f"--reuid={u}", f"--regid={u}", "--init-groups", "--"]
        return [
            *as_user,
            "env",
            *self._env(),
            "erl",
            "-sname", _NODE,
            "+P", "250000",
            "-env", "ERL_CRASH_DUMP_BYTES", "0",
            "-setcookie", self.cookie,
            "-kernel", "inet_dist_use_interface", "{127,0,0,1}",
            "-erl_epmd_port", str(self.dist_port),
            "-start_epmd", "false",
            "-mnesia", "dir", f'"{self.db_path}"',
            "-s", "ejabberd",
            "-noinput",
        ]  # fmt: skip

    # -- lifecycle ------------------------------------------------------------------------------
    def ready(self) -> bool:
        # While _booting, the base start() returns as soon as the VM runs; start() below then
        # waits for the port with its own, longer deadline (the base one is 5 s).
        return self._booting or _bound("tcp", self.bind, self.port, self.netns)

    def _started(self) -> bool:
        """c2s is bound and the ejabberd application has started (modules and tables ready:
        the port is bound before that, and an account made too early fails)."""
        if not _bound("tcp", self.bind, self.port, self.netns):
            return False
        try:
            self._call(_STARTED, timeout=2)
        except EnvironmentFault:
            return False
        return True

    def start(self) -> None:
        """Start the VM, wait (max ~20 s) until it has started and c2s is bound, then make the
        accounts and groups asked for while it was stopped."""
        if self.running:
            return
        if shutil.which("erl") is None:
            raise EnvironmentFault("ejabberd: program 'erl' not found (apt install ejabberd?)")
        self._prepare_dirs()
        self._booting = True
        try:
            super().start()
        finally:
            self._booting = False
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not self._started():
            if proc.poll() is not None:
                code = proc.returncode
                self.stop()
                raise EnvironmentFault(
                    f"ejabberd exited with status {code} while starting; its output:\n"
                    f"{self.output()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EnvironmentFault(
                    f"ejabberd did not start on {self.bind}:{self.port} within "
                    f"{START_TIMEOUT:.0f} s; its output:\n{self.output()}"
                )
            time.sleep(_POLL)
        self._helpers = _descendants(proc.pid)
        pending, self._pending = self._pending, []
        try:
            for expr in pending:
                self._call(expr)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM the VM (SIGKILL after 5 s), then end by PID whatever it started that lives on."""
        pid = self.pid
        if pid is not None:
            self._helpers |= _descendants(pid)
        super().stop()
        left = {p for p, t in self._helpers.items() if _proc_start(p) == t}
        self._helpers = {}
        if left:
            end_pids(left, 2.0)

    def close(self) -> None:
        """Stop the server and delete its work directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _prepare_dirs(self) -> None:
        """Own the work dir as the VM's user, and check that user can reach it."""
        if self.user is None:
            return
        try:
            pw = pwd.getpwnam(self.user)
        except KeyError:
            raise EnvironmentFault(
                f"ejabberd: no user {self.user!r} (apt install ejabberd creates it)"
            ) from None
        for parent in self.workdir.parents:
            st = parent.stat()
            if st.st_uid != pw.pw_uid and not st.st_mode & stat.S_IXOTH:
                raise EnvironmentFault(
                    f"ejabberd: user {self.user} cannot reach {self.workdir}: {parent} has mode "
                    f"{stat.S_IMODE(st.st_mode):o} (chmod o+x it, or pass user=None)"
                )
        for root, dirs, files in os.walk(self.workdir):
            for name in (root, *(os.path.join(root, n) for n in dirs + files)):
                os.lchown(name, pw.pw_uid, pw.pw_gid)

    # -- accounts and groups ----------------------------------------------------------------------
    def jid(self, user: str) -> str:
        """``user@domain`` (a bare JID of this server)."""
        return user if "@" in user else f"{user}@{self.domain}"

    def _local(self, user: str) -> str:
        local, _, domain = user.partition("@")
        if domain and domain != self.domain:
            raise ConfigError("user", f"{user!r} is not an account of {self.domain}")
        if not local or any(c.isspace() or c in "@/\"'&<>:" for c in local):
            raise ConfigError("user", f"unusable user name {local!r}")
        return local.lower()  # what ejabberd stores (nodeprep)

    def register(self, user: str, password: str) -> str:
        """Create (or re-password) an account.  Returns its JID.

        On a running server it takes effect at once; on a stopped one at the next ``start()``.
        """
        if not password:
            raise ConfigError("password", "empty")
        u, h, p = _erl_bin(self._local(user)), _erl_bin(self.domain), _erl_bin(password)
        self._submit(
            f"case ejabberd_auth:try_register({u}, {h}, {p}) of "
            f"{{error, exists}} -> ejabberd_auth:set_password({u}, {h}, {p}); R -> R end"
        )
        return self.jid(user)

    def set_groups(self, groups: Mapping[str, Iterable[str]], *, restart: bool = True) -> None:
        """Make the shared-roster groups exactly ``{group: [user or jid, ...]}``.

        Each group is labelled with its own name and displays itself, so every member sees the
        others in roster group ``group`` with subscription "both".  Groups not named are deleted.
        ejabberd pushes the change to online clients, so ``restart`` (kept for ``Prosody``'s
        signature) is ignored: nothing restarts.  A stopped server gets it at the next start.
        """
        del restart
        want: list[str] = []
        for group, members in groups.items():
            if not group or any(c in group for c in "\n\r\t"):
                raise ConfigError("group", f"unusable group name {group!r}")
            users = ",".join(_erl_bin(self._local(m)) for m in members)
            want.append(f"{{{_erl_bin(group)}, [{users}]}}")
        self._submit(_SET_GROUPS.format(host=_erl_bin(self.domain), want=",".join(want)))

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``ejabberdctl CMD ARGS`` against this server (slow: ~1.2 s, starts its own VM)."""
        return subprocess.run(
            [*_netns_prefix(self.netns), "ejabberdctl", "--config-dir", str(self.workdir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def _submit(self, expr: str) -> None:
        if self.running:
            self._call(expr)
        else:
            self._pending.append(expr)

    def _call(self, expr: str, timeout: int = CALL_TIMEOUT) -> None:
        """Evaluate ``expr`` (which must yield ``ok``) in the server's VM, through ``erl_call``."""
        erl_call = shutil.which("erl_call") or _ERL_CALL_FALLBACK
        argv = [
            *_netns_prefix(self.netns),
            erl_call,
            "-address", f"127.0.0.1:{self.dist_port}",
            "-c", self.cookie,
            "-timeout", str(timeout),
            "-e",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                argv,
                input=f"{expr}.\n",
                capture_output=True,
                text=True,
                timeout=timeout + 5,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EnvironmentFault(f"ejabberd: erl_call failed: {exc}") from None
        out = proc.stdout.strip()
        if proc.returncode != 0 or out != "{ok, ok}":
            raise EnvironmentFault(
                f"ejabberd: admin call failed ({proc.returncode}): {out or proc.stderr.strip()}"
            )
