"""Checks on ``state_dir`` and the files in it, so a local user cannot plant or redirect them.

A node keeps its identity (``node.key``, ``node.crt``) and its lock in ``state_dir``.  Another
local user who can write there, or into any directory above it, could pre-create the directory,
plant a key the node then uses as its identity, or turn ``lock`` into a symlink that makes the
node truncate some other file.  So, before anything is opened:

- ``state_dir`` must be owned by the running user and writable by nobody else;
- every directory above it up to ``/`` must be owned by the running user or root, and writable
  by nobody else, unless it is sticky (``/tmp``: others cannot rename or remove what we own);
- the lock is opened with ``O_NOFOLLOW`` (a symlink is refused, never followed);
- ``node.key`` and ``node.crt`` must be regular files owned by the running user, with no
  permission for group or others (they are created 0600).

Each failure raises ``ConfigError`` naming ``state_dir`` (exit status 2, one line).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ipop.errors import ConfigError

__all__ = [
    "check_control_socket", "check_secret_file", "check_state_dir", "open_lock", "prepare",
]

KEY = "state_dir"


def _euid(uid: int | None) -> int:
    return os.geteuid() if uid is None else uid


def check_state_dir(path: Path, *, uid: int | None = None) -> None:
    """Refuse ``path`` (an existing directory) unless only ``uid`` (default: the running user)
    can change it or any directory above it."""
    me = _euid(uid)
    path = Path(os.path.abspath(path))
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(KEY, f"{path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(KEY, f"{path} is not a directory (a symlink or a file was planted?)")
    if st.st_uid != me:
        raise ConfigError(KEY, f"{path} is owned by uid {st.st_uid}, not by this user "
                               f"(uid {me}): remove it or chown it")
    if st.st_mode & 0o022:
        raise ConfigError(KEY, f"{path} is writable by other users "
                               f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 700 it")
    _check_parents(path.parent, me, below=path)


def prepare(path: Path) -> None:
    """Before a node starts: create ``path`` (0700) if missing, then check it and its parents
    (``check_state_dir``), that its lock, if any, is no symlink, and that the key and
    certificate, if there, are ours alone (``check_secret_file``); raises ConfigError."""
    path = Path(os.path.abspath(path))
    if not os.path.lexists(path):
        for parent in path.parents:  # the part that exists must be safe to create in
            if os.path.isdir(parent):
                _check_parents(parent, _euid(None), below=path)
                break
        path.mkdir(parents=True, mode=0o700)
    check_state_dir(path)
    lock = path / "lock"
    if os.path.islink(lock):
        raise ConfigError(KEY, f"{lock} is a symlink: refusing to follow it")
    for name in ("node.key", "node.crt"):  # ipop.crypto.identity's file names
        if os.path.lexists(path / name):
            check_secret_file(path / name)


def _check_parents(top: Path, me: int, *, below: Path) -> None:
    for parent in (top, *top.parents):
        try:
            pst = os.stat(parent)
        except OSError as exc:
            raise ConfigError(KEY, f"{parent}: {exc.strerror}") from None
        if pst.st_mode & stat.S_ISVTX:
            continue  # sticky (/tmp): others cannot replace what we own in it
        if pst.st_uid not in (me, 0):
            raise ConfigError(KEY, f"{parent} (above {below}) is owned by uid {pst.st_uid}, "
                                   "another user, who could replace the state_dir")
        if pst.st_mode & 0o022:
            raise ConfigError(KEY, f"{parent} (above {below}) is writable by other users "
                                   f"(mode {stat.S_IMODE(pst.st_mode):04o}): pick another "
                                   "state_dir or chmod go-w it")


def open_lock(path: Path) -> int:
    """Open (or create, 0600) the lock file at ``path`` without following a symlink."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(KEY, f"{path} is a symlink: refusing to follow it") from None
        raise ConfigError(KEY, f"cannot open {path}: {exc.strerror}") from None


def check_secret_file(path: Path, *, uid: int | None = None) -> None:
    """Refuse the key or certificate at ``path`` unless it is a regular file owned by ``uid``
    (default: the running user) that nobody else may read or write."""
    me = _euid(uid)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(KEY, f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(KEY, f"{path} is not a regular file (a symlink was planted?)")
    if st.st_uid != me:
        raise ConfigError(KEY, f"{path} is owned by uid {st.st_uid}, not by this user "
                               f"(uid {me}): it may have been planted; remove it")
    if st.st_mode & 0o077:
        raise ConfigError(KEY, f"{path} is open to other users "
                               f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it")


def check_control_socket(path: Path, *, uid: int | None = None) -> None:
    """Refuse to talk to the control socket at ``path`` unless it could only have been made by
    this user, root, or (for root) the user that owns its directory, in a directory that no
    other user can change, nor any above it (a planted socket would answer with forged
    status); raises ConfigError naming ``control_socket``.  A missing socket passes
    (connect() then says so)."""
    me = _euid(uid)
    try:
        st = os.lstat(path)
    except OSError:
        return
    key = "control_socket"
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(key, f"{path} is not a socket")
    parent = Path(os.path.abspath(path)).parent
    pst = os.stat(parent)
    owner = st.st_uid
    # root may talk to the node's own user (a service): the socket's owner owns its directory
    if owner not in (me, 0) and not (me == 0 and owner == pst.st_uid):
        raise ConfigError(key, f"{path} is owned by uid {owner}, another user: it is not a "
                               "node of ours; remove it")
    trusted = {me, 0, owner}
    for d in (parent, *parent.parents):
        dst = os.stat(d)
        if dst.st_mode & stat.S_ISVTX and d != parent:
            continue
        if dst.st_uid not in trusted or dst.st_mode & 0o022:
            raise ConfigError(key, f"{d} (above {path}) can be changed by uid {dst.st_uid} or "
                                   "by other users: the socket in it cannot be trusted")
