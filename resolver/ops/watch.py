"""Noticing that rule files changed on disk: stat polling, debounced. Pure but for `look`.

Polling rather than inotify: it sees every way a file changes (an edit in place, a rename over
it, a file added to or removed from a rules directory, a file on NFS or a bind mount that
inotify misses), costs a few stat calls per interval, and needs no library. A file's
signature is its device, inode, size, and modification and change times in nanoseconds, so
an atomic rename over it (a new inode) is seen even when size and mtime happen to match.

Debounced: a change reloads only once the files have looked the same for one interval, so a
file still being written, or a deploy that copies several files one after another, is read
once, complete. A file that is gone is a change like any other: the reload it triggers fails
(keeping the rules in force) and its return is a change again.

The watcher never reads a clock nor touches the disk itself: the time comes in as `now`, and
the disk through an injected `look`, so its table tests run on a fake of each.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePath

from resolver.rules.loader import TEXT_SUFFIXES, YAML_SUFFIXES

RULE_SUFFIXES = YAML_SUFFIXES + TEXT_SUFFIXES  # what the loader reads from a directory
# Timers may fire a hair before they are due: a change seen one interval ago, give or take
# this fraction of it, has been stable for the interval.
SLACK = 0.05


@dataclass(frozen=True, slots=True)
class Seen:
    """What one look at a path found: a file's signature, or a directory's entry names."""

    signature: tuple[int, ...] = ()
    entries: tuple[str, ...] | None = None  # a directory's names, sorted


Look = Callable[[str], Seen | None]  # None: nothing there
Snapshot = dict[str, Seen | None]


def look_on_disk(path: str) -> Seen | None:
    """The real `look`: stat (following links, as the loader reads through them); a
    directory is listed. An unreadable path is seen by its error number, so a change of error
    is a change too."""
    try:
        found = os.stat(path)
        if stat.S_ISDIR(found.st_mode):
            return Seen(entries=tuple(sorted(os.listdir(path))))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        return Seen(signature=(-1, error.errno or 0))
    return Seen(signature=(found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns,
                           found.st_ctime_ns))


class Watcher:
    """Says when the watched paths changed and then stayed the same for an interval."""

    def __init__(self, paths: Sequence[str], look: Look = look_on_disk):
        self._look = look
        self._paths: tuple[str, ...] = ()
        self._baseline: Snapshot = {}
        self._pending: Snapshot | None = None  # a change seen, not yet stable
        self._since = 0.0  # when the pending change was last seen to change
        self.watch(paths)

    def watch(self, paths: Sequence[str]) -> None:
        """Watch these paths from now on; what they hold now is the baseline. Does nothing
        when they are the paths watched already."""
        if tuple(paths) != self._paths:
            self._paths = tuple(paths)
            self._baseline = self.scan()
            self._pending = None

    def scan(self) -> Snapshot:
        """Every watched path, and every rule file in a watched directory."""
        found: Snapshot = {}
        for path in self._paths:
            seen = self._look(path)
            if seen is not None and seen.entries is not None:  # only what the loader reads
                names = tuple(name for name in seen.entries
                              if PurePath(name).suffix in RULE_SUFFIXES)
                seen = Seen(entries=names)
                for name in names:
                    child = os.path.join(path, name)
                    found[child] = self._look(child)
            found[path] = seen
        return found

    def poll(self, now: float, interval: float) -> bool:
        """Look again; True when the files differ from the baseline and looked the same at a
        look at least `interval` ago. The changed state is then the new baseline."""
        snapshot = self.scan()
        if snapshot == self._baseline:
            self._pending = None  # changed and changed back: nothing to load
            return False
        if snapshot != self._pending:
            self._pending, self._since = snapshot, now
            return False
        if now - self._since < interval * (1 - SLACK):
            return False
        self._baseline, self._pending = snapshot, None
        return True
