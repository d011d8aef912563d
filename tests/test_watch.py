"""resolver/ops/watch.py: when a change to the rule files reloads, on a fake disk and clock.

The fake disk is a dict from path to what a look finds (a file's signature, a directory's
names); the test edits it the way an editor, a deploy or `mv` would, and steps the clock by
hand. The last test runs the real `look` on a temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from resolver.ops.watch import Seen, Watcher, look_on_disk
from tests.clock import FakeClock

INTERVAL = 2.0


class FakeDisk:
    """Paths to what a look finds; files get a fresh inode when replaced."""

    def __init__(self) -> None:
        self.found: dict[str, Seen] = {}
        self.inode = 100
        self.looked: list[str] = []

    def look(self, path: str) -> Seen | None:
        self.looked.append(path)
        return self.found.get(path)

    def write(self, path: str, size: int = 10, mtime: int = 1) -> None:
        """An edit in place: same inode, new size or time."""
        inode = self.found[path].signature[1] if path in self.found else self._next()
        self.found[path] = Seen(signature=(1, inode, size, mtime, mtime))

    def rename_over(self, path: str, size: int = 10, mtime: int = 1) -> None:
        """A new file renamed over the old: a new inode, possibly the same size and times."""
        self.found[path] = Seen(signature=(1, self._next(), size, mtime, mtime))

    def mkdir(self, path: str, *names: str) -> None:
        self.found[path] = Seen(entries=tuple(sorted(names)))

    def delete(self, path: str) -> None:
        del self.found[path]

    def _next(self) -> int:
        self.inode += 1
        return self.inode


@pytest.fixture
def disk() -> FakeDisk:
    disk = FakeDisk()
    disk.write("/r/rules.yaml")
    disk.mkdir("/r/rules.d", "a.yaml", "notes.md")
    disk.write("/r/rules.d/a.yaml")
    disk.write("/r/rules.d/notes.md")
    return disk


def polls(watcher: Watcher, clock: FakeClock, count: int, step: float = INTERVAL
          ) -> list[bool]:
    """count polls, one every step seconds: which said reload."""
    said = []
    for _ in range(count):
        clock.advance(step)
        said.append(watcher.poll(clock(), INTERVAL))
    return said


@pytest.mark.parametrize(("change", "reloads"), [
    pytest.param(lambda d: None, [False, False, False], id="nothing"),
    pytest.param(lambda d: d.write("/r/rules.yaml", size=11), [False, True, False],
                 id="edit-in-place"),
    pytest.param(lambda d: d.write("/r/rules.yaml", mtime=2), [False, True, False],
                 id="same-size-new-mtime"),
    pytest.param(lambda d: d.rename_over("/r/rules.yaml"), [False, True, False],
                 id="rename-over-same-size-and-time"),
    pytest.param(lambda d: d.delete("/r/rules.yaml"), [False, True, False], id="deleted"),
    pytest.param(lambda d: (d.mkdir("/r/rules.d", "a.yaml", "b.yml", "notes.md"),
                            d.write("/r/rules.d/b.yml")), [False, True, False],
                 id="file-added-to-directory"),
    pytest.param(lambda d: (d.mkdir("/r/rules.d", "notes.md"), d.delete("/r/rules.d/a.yaml")),
                 [False, True, False], id="file-removed-from-directory"),
    pytest.param(lambda d: d.write("/r/rules.d/a.yaml", size=99), [False, True, False],
                 id="file-in-directory-edited"),
    pytest.param(lambda d: d.write("/r/rules.d/notes.md", size=99), [False, False, False],
                 id="not-a-rule-file"),
    pytest.param(lambda d: (d.mkdir("/r/rules.d", "a.yaml", "notes.md", "x.txt~")),
                 [False, False, False], id="editor-backup-ignored"),
])
def test_a_change_reloads_once_after_it_held_for_an_interval(disk, change, reloads):
    clock = FakeClock()
    watcher = Watcher(["/r/rules.yaml", "/r/rules.d"], disk.look)
    change(disk)
    assert polls(watcher, clock, 3) == reloads


def test_a_file_still_being_written_waits_until_it_stops(disk):
    clock = FakeClock()
    watcher = Watcher(["/r/rules.yaml"], disk.look)
    said = []
    for size in range(20, 25):  # grows at every look
        disk.write("/r/rules.yaml", size=size)
        said += polls(watcher, clock, 1)
    said += polls(watcher, clock, 2)
    assert said == [False] * 5 + [True, False]


def test_stable_means_one_interval_not_one_look(disk):
    """Looks closer together than the interval (a wake-up for another reason) do not make a
    change stable early; a look a hair early (timer slack) does."""
    clock = FakeClock()
    watcher = Watcher(["/r/rules.yaml"], disk.look)
    disk.write("/r/rules.yaml", size=50)
    assert polls(watcher, clock, 1) == [False]
    assert polls(watcher, clock, 3, step=INTERVAL / 4) == [False, False, False]
    assert polls(watcher, clock, 1, step=INTERVAL / 4 - 0.01) == [True]


def test_changed_and_changed_back_reloads_nothing(disk):
    clock = FakeClock()
    watcher = Watcher(["/r/rules.yaml"], disk.look)
    original = disk.found["/r/rules.yaml"]
    disk.write("/r/rules.yaml", size=77)
    assert polls(watcher, clock, 1) == [False]
    disk.found["/r/rules.yaml"] = original
    assert polls(watcher, clock, 3) == [False, False, False]


def test_a_deleted_file_that_returns_is_a_change_again(disk):
    clock = FakeClock()
    watcher = Watcher(["/r/rules.yaml"], disk.look)
    disk.delete("/r/rules.yaml")
    assert polls(watcher, clock, 2) == [False, True]
    disk.rename_over("/r/rules.yaml")
    assert polls(watcher, clock, 2) == [False, True]


def test_new_paths_start_from_what_they_hold(disk):
    """After a reload names other rule files, their present state is no change."""
    clock = FakeClock()
    watcher = Watcher(["/r/rules.yaml"], disk.look)
    disk.write("/r/other.yaml")
    watcher.watch(["/r/other.yaml"])
    assert polls(watcher, clock, 2) == [False, False]
    disk.write("/r/rules.yaml", size=5)  # no longer watched
    assert polls(watcher, clock, 2) == [False, False]
    disk.write("/r/other.yaml", size=5)
    assert polls(watcher, clock, 2) == [False, True]


def test_looks_at_every_rule_file_of_a_directory_and_nothing_else(disk):
    watcher = Watcher(["/r/rules.d"], disk.look)
    disk.looked.clear()
    watcher.scan()
    assert disk.looked == ["/r/rules.d", "/r/rules.d/a.yaml"]


def test_the_real_look(tmp_path: Path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("lists: []\n")
    first = look_on_disk(str(rules))
    assert first is not None and first.entries is None and first.signature
    replacement = tmp_path / "new.yaml"
    replacement.write_text("lists: []\n")
    stat = os.stat(rules)
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime
    os.replace(replacement, rules)
    assert look_on_disk(str(rules)) != first
    assert look_on_disk(str(tmp_path)) == Seen(entries=("rules.yaml",))
    assert look_on_disk(str(tmp_path / "gone.yaml")) is None
    assert look_on_disk(str(rules / "below")) is None  # a file is not a directory
