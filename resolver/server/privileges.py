"""Dropping root: bind port 53 as root, then serve as an unprivileged user, for good.

The order is the one every daemon that does this follows (Unbound, NSD, nginx): the
supplementary groups are cleared first (setgroups needs root), then the group is set, then
the user, each as real, effective and saved id (setres*id), so nothing is left to switch
back to. It is then checked: all three ids are the target's, and setting uid 0 again fails.

Where it happens (server/app.py, server/supervisor.py): the listen sockets are bound first,
as plain sockets that nothing reads yet, then privileges are dropped, and only then does the
event loop start serving them; so no query is ever read as root. With workers, the
supervisor binds every worker's sockets before it drops and forks, so workers are never root,
and a worker started again after a crash takes its predecessor's sockets: nobody needs root
to bind port 53 again.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from collections.abc import Sequence

log = logging.getLogger(__name__)


class PrivilegeError(RuntimeError):
    """Privileges could not be dropped as configured (the server must not start)."""


def drop(user: str | None, group: str | None, own: Sequence[str | None] = ()) -> None:
    """Become user (and group: by default the user's), unless that is who we are already;
    None leaves the ids alone. Raises PrivilegeError saying why it could not.

    own: files and directories made before the drop that the server goes on writing (the
    state directory's copies of URL sources, the query log's file), given to the user first,
    so a refresh or a log rotation does not fail on a root-owned file; None entries are
    skipped."""
    if user is None:
        if group is not None:
            raise PrivilegeError("a group to drop to (server.group, --group) needs a user "
                                 "(server.user, --user)")
        return
    uid, gid = _ids(user, group)
    if os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid):
        return  # a worker forked by a supervisor that dropped already
    for path in own:
        if path is not None:
            _hand_over(path, uid, gid)
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except PermissionError as error:
        raise PrivilegeError(f"cannot become user {user!r} (uid {uid}): {error.strerror}; "
                             "start as root to drop privileges") from None
    _check(uid, gid)
    log.info("running as user %s (uid %d, gid %d)", user, uid, gid)


def _hand_over(path: str, uid: int, gid: int) -> None:
    """chown path, and everything under it if it is a directory, to uid:gid."""
    if not os.path.exists(path):
        return
    try:
        os.chown(path, uid, gid)
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(top, name), uid, gid, follow_symlinks=False)
    except OSError as error:
        raise PrivilegeError(f"cannot give {path} to uid {uid}: {error.strerror}") from None


def warn_if_root(user: str | None) -> None:
    """Say so when the server is started as root and told to stay root."""
    if user is None and os.geteuid() == 0:
        log.warning("running as root: any flaw in the server would be root's; give a user to "
                    "drop to once the ports are bound (--user, server.user)")


def _ids(user: str, group: str | None) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"server.user: no user named {user!r}") from None
    if group is None:
        return entry.pw_uid, entry.pw_gid
    try:
        return entry.pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        raise PrivilegeError(f"server.group: no group named {group!r}") from None


def _check(uid: int, gid: int) -> None:
    """Prove there is no way back: every id is the target's, and root is out of reach."""
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise PrivilegeError("privileges were not dropped: ids are still "
                             f"{os.getresuid()}/{os.getresgid()}")
    if uid == 0:
        return  # asked to stay root (user root): nothing to prove
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError("privileges were dropped, yet uid 0 could be taken back")
