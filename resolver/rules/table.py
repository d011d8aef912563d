"""The plain table of a large rule set in a few flat buffers, shareable between processes.

A dict from wire name to rule costs about 200 bytes a name in CPython (the bytes object, the
dict slot, the key's hash), and every lookup writes reference counts into those objects'
pages, so a forked worker soon holds its own copy of all of them. A million names took
235 MiB in every worker. This table holds, in one memory file (memfd) mapped read-only:

- `keys`: an open-addressing table (linear probing, at most half full, a power of two
  slots) of the names' 64-bit hashes, 0 marking an empty slot;
- `ids`: for each slot, the index of the rule that answers that name, in `rules`;
- `names`: every name as the lists name it, in wire form one after the other (a wire name
  ends at its root octet, the only zero octet it has), grouped by rule: what tools and
  `RuleSet.domains` enumerate, and what a table is rebuilt from where the hashes differ.

The hash is Python's own `hash()` of the wire name (SipHash-1-3, keyed per process): computed
in C, it costs what a dict lookup costs, and a client cannot aim a query at a collision it
cannot compute. Lookups compare hashes only, never names, so the names' pages are never
touched by queries: a suffix that is not in the table but has the hash of one that is in its
probe run would match, a chance of about 2^-64 per suffix tried (about 3 per query). The key
is the same in every process forked from the one that built the table (the workers), and a
table that reaches a process with another key (pickled by value: tools, tests) is rebuilt
from its names on arrival (`seed` tells them apart).

Workers share one copy: the supervisor sends the memfd itself over the worker's pipe
(`dumps`/`loads` below: pickled by reference, the descriptor passed with SCM_RIGHTS), every
process maps it read-only and shared, and the memory goes back when the last process that
maps it drops the rule set: nothing is ever written in a file system, nothing can be left
behind by a crash.
"""

from __future__ import annotations

import array
import io
import mmap
import os
import pickle
import socket
import weakref
from collections.abc import Iterable, Iterator, Sequence
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Literal

from resolver.message.names import label_offsets
from resolver.rules.model import ALLOW, Rule

# Below this many names the plain table is a dict: about 25 ns a label faster in CPython
# (bench/micro.py, "lookup ... dict" and "compact" lines), and nothing to share.
COMPACT_FROM = 50_000
_SEED = hash(b"resolver rules table")  # which hash key built a table (see the docstring)
_MFD_NAME = "resolver-rules"


def rank(rule: Rule) -> tuple[str, str, str]:
    """Which of two rules for the same domain wins: list name, then entry id and name, so
    the outcome follows from what the rules say (the version), not from the files' order."""
    return rule.list.name, rule.entry_id, rule.entry_name


class Domains:
    """(wire name, rule) pairs as a load produces them, kept as flat bytes: per rule, its
    names one after the other and their hashes. Nothing per name is a Python object, so a
    million names cost about 40 MB while they are read, not 130 (a list of tuples of bytes).

    Iterating gives the pairs (as many times as asked), grouped by rule, in load order
    within a rule.
    """

    __slots__ = ("_names", "_hashes", "_last", "shallowest", "deepest", "count")

    def __init__(self, pairs: Iterable[tuple[bytes, Rule]] = ()) -> None:
        self._names: dict[Rule, bytearray] = {}
        self._hashes: dict[Rule, array.array[int]] = {}
        self._last: tuple[Rule, bytearray, array.array[int]] | None = None
        self.shallowest = 128  # fewest labels of a name (128: none yet)
        self.deepest = 0
        self.count = 0
        for wire, rule in pairs:
            self.add(wire, rule)

    def add(self, wire: bytes, rule: Rule, depth: int = 0) -> None:
        """Add one name; depth: its number of labels when the caller knows it (the loader
        counts the dots of the text: cheaper than walking the wire form)."""
        last = self._last
        if last is None or last[0] is not rule:  # hashing a Rule is slow: only on a change
            names = self._names.get(rule)
            if names is None:
                names = self._names[rule] = bytearray()
                self._hashes[rule] = array.array("q")
            last = self._last = (rule, names, self._hashes[rule])
        names = last[1]
        names += wire
        last[2].append(hash(wire))
        if not depth:
            depth = len(label_offsets(wire))
        if depth < self.shallowest:
            self.shallowest = depth
        if depth > self.deepest:
            self.deepest = depth
        self.count += 1

    def absorb(self, other: Domains) -> None:
        """Take every pair of another collection (read apart so that it could be dropped
        whole), leaving it empty."""
        for rule in other.rules():
            names = self._names.setdefault(rule, bytearray())
            names += other.names(rule)
            self._hashes.setdefault(rule, array.array("q")).extend(other.hashes(rule))
            other.drop(rule)
        self._last = None
        self.shallowest = min(self.shallowest, other.shallowest)
        self.deepest = max(self.deepest, other.deepest)
        self.count += other.count
        other.count = 0

    def rules(self) -> list[Rule]:
        return list(self._names)

    def names(self, rule: Rule) -> bytearray:
        """The rule's names, one after the other in wire form."""
        return self._names[rule]

    def hashes(self, rule: Rule) -> array.array[int]:
        return self._hashes[rule]

    def drop(self, rule: Rule) -> None:
        """Forget a rule's names (the caller took them), so the memory goes back at once."""
        del self._names[rule], self._hashes[rule]
        self._last = None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[bytes, Rule]]:
        for rule, names in self._names.items():
            for wire in split(names):
                yield wire, rule


def split(names: bytes | bytearray | memoryview) -> Iterator[bytes]:
    """The wire names in a run of them (see Domains), in order, a block at a time: a
    million names are never a million objects at once."""
    view = memoryview(names)
    block = 1 << 16
    start = 0
    while start < len(view):
        chunk = bytes(view[start:start + block])
        end = chunk.rfind(0) + 1
        if end == 0:  # one name longer than a block cannot be (255 octets at most)
            raise ValueError("not a run of wire names")
        for bare in chunk[:end].split(b"\x00")[:-1]:
            yield bare + b"\x00"
        start += end


class Table:
    """The compact plain table (see the module's docstring). Immutable once built."""

    __slots__ = ("rules", "blocks", "_keys", "_ids", "_sections", "_names", "_map", "_fd",
                 "_layout", "__weakref__")

    rules: tuple[Rule, ...]
    blocks: int  # distinct names some block rule names (before allows took any)
    _keys: memoryview
    _ids: memoryview
    _sections: tuple[tuple[int, int, int], ...]  # (rule index, start, end) in _names
    _names: memoryview
    _map: mmap.mmap
    _fd: int
    _layout: tuple[int, int, int, str, int]  # slots, where ids and names start, id type, names

    def get(self, name: bytes) -> Rule | None:
        """The rule stored for this wire name, or None (the probe the lookups inline)."""
        keys, mask = self._keys, len(self._keys) - 1
        key = hash(name)
        slot = key & mask
        found = keys[slot]
        while found:
            if found == key:
                return self.rules[self._ids[slot]]
            slot = (slot + 1) & mask
            found = keys[slot]
        return None

    def probe(self) -> tuple[memoryview, memoryview, int, tuple[Rule, ...]]:
        """What a lookup needs to inline `get`: keys, ids, the slot mask and the rules."""
        return self._keys, self._ids, len(self._keys) - 1, self.rules

    def listed(self) -> Iterator[tuple[bytes, Rule]]:
        """Every (wire name, rule) as the lists name them, grouped by rule: the names an
        allow made moot, and repeats, included."""
        for index, start, end in self._sections:
            rule = self.rules[index]
            for wire in split(self._names[start:end]):
                yield wire, rule

    def __len__(self) -> int:
        """Distinct names in the table (blocked and allowed)."""
        return self._layout[4]

    def fileno(self) -> int:
        """The memory file holding the table, for sending to another process."""
        return self._fd

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        """By value: the buffer's bytes, rebuilt from the names where hashes differ."""
        return _from_bytes, (bytes(self._map), self._layout, self.rules, self._sections,
                             self.blocks, _SEED)


def build(domains: Domains, rules: Sequence[Rule], allows: dict[bytes, Rule]) -> Table:
    """A Table of the given rules' names (block and allow rules of the plain table).

    Precedence as the dict it replaces (matcher.RuleSet): at one name an allow wins, else
    the first rule by `rank`; a block name at or below an allowed name answers as that
    allow (the walk would have reached it: the outcome, no answer, is the same).

    The slots are filled where they are to stay, in the memory file mapped writable, and
    the names written to it without being mapped: a build holds no copy of the table
    beside the file (18 MiB less at its peak for a million names).
    """
    count = sum(len(domains.hashes(rule)) for rule in rules)
    slots = 1 << max(4, (2 * count).bit_length())  # at most half full
    typecode: Literal["H", "B"] = "H" if len(rules) > 255 else "B"
    ids_at = slots * 8
    names_at = ids_at + slots * (2 if typecode == "H" else 1)
    fd = _memory_file()
    try:
        sections = []
        end = names_at
        for index, rule in enumerate(rules):
            names = domains.names(rule)
            os.pwrite(fd, names, end)
            sections.append((index, end - names_at, end + len(names) - names_at))
            end += len(names)
        os.ftruncate(fd, max(end, names_at))  # the slots: zeros, the empty mark
        with mmap.mmap(fd, names_at) as writable, memoryview(writable) as view, \
                view[:ids_at].cast("q") as keys, view[ids_at:].cast(typecode) as ids:
            blocks, distinct = _fill(domains, rules, keys, ids)
            if allows:
                _shadow(domains, rules, allows, keys, ids)
    except BaseException:
        os.close(fd)
        raise
    layout = (slots, ids_at, names_at, typecode, distinct)
    return _attach(fd, max(end, names_at), layout, tuple(rules), tuple(sections), blocks)


def _fill(domains: Domains, rules: Sequence[Rule], keys: memoryview, ids: memoryview
          ) -> tuple[int, int]:
    """Put every name's hash in its slot with the index of the rule that wins it (allows
    last: a block never displaces one); the distinct names some block rule names, and all
    distinct names."""
    mask = len(keys) - 1
    blocks = distinct = 0
    for index in sorted(range(len(rules)), key=lambda i: rules[i].list.action == ALLOW):
        rule = rules[index]
        allow = rule.list.action == ALLOW
        for key in domains.hashes(rule):
            slot = key & mask
            found = keys[slot]
            while found and found != key:
                slot = (slot + 1) & mask
                found = keys[slot]
            if not found:
                keys[slot] = key
                ids[slot] = index
                distinct += 1
                blocks += not allow
            elif allow or (rules[ids[slot]].list.action != ALLOW
                           and rank(rule) < rank(rules[ids[slot]])):
                ids[slot] = index
    return blocks, distinct


def _shadow(domains: Domains, rules: Sequence[Rule], allows: dict[bytes, Rule],
            keys: memoryview, ids: memoryview) -> None:
    """Point every block name at or below an allowed name at that allow (see build)."""
    index = {id(rule): i for i, rule in enumerate(rules)}
    mask = len(keys) - 1
    for rule in rules:
        if rule.list.action == ALLOW:
            continue
        for wire in split(domains.names(rule)):
            for offset in label_offsets(wire):
                allow = allows.get(wire[offset:])
                if allow is not None:
                    key = hash(wire)
                    slot = key & mask
                    while keys[slot] != key:
                        slot = (slot + 1) & mask
                    ids[slot] = index[id(allow)]
                    break


def _memory_file() -> int:
    """An anonymous memory file (memfd) that other processes can be handed."""
    return os.memfd_create(_MFD_NAME, os.MFD_CLOEXEC)


def _attach(fd: int, size: int, layout: tuple[int, int, int, str, int], rules: tuple[Rule, ...],
            sections: tuple[tuple[int, int, int], ...], blocks: int) -> Table:
    """A Table over the memory file fd (taken over: closed with the table)."""
    slots, ids_at, names_at, typecode, _ = layout
    mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else \
        mmap.mmap(-1, 1)
    view = memoryview(mapped)
    table = Table.__new__(Table)
    table.rules = rules
    table.blocks = blocks
    table._keys = view[:ids_at].cast("q")
    table._ids = view[ids_at:names_at].cast("H" if typecode == "H" else "B")
    table._names = view[names_at:size]
    table._sections = sections
    table._map = mapped
    table._fd = fd
    table._layout = layout
    weakref.finalize(table, os.close, fd)
    assert len(table._keys) == slots
    return table


def _from_bytes(data: bytes, layout: tuple[int, int, int, str, int], rules: tuple[Rule, ...],
                sections: tuple[tuple[int, int, int], ...], blocks: int, seed: int) -> Table:
    """The other half of Table.__reduce__."""
    _, _, names_at, _, _ = layout
    if seed != _SEED:  # built with another hash key: the keys mean nothing here
        domains = Domains()
        for index, start, end in sections:
            for wire in split(data[names_at + start:names_at + end]):
                domains.add(wire, rules[index])
        allows = {wire: rule for wire, rule in domains if rule.list.action == ALLOW}
        return build(domains, rules, allows)
    fd = _memory_file()
    try:
        with io.FileIO(fd, "wb", closefd=False) as out:
            out.write(data)
    except BaseException:
        os.close(fd)
        raise
    return _attach(fd, len(data), layout, rules, sections, blocks)


# ---------------------------------------------------------------- sharing between processes

class _Pickler(pickle.Pickler):
    """Pickles Tables by reference: their memory files are collected to be sent alongside."""

    def __init__(self, out: io.BytesIO) -> None:
        super().__init__(out, protocol=pickle.HIGHEST_PROTOCOL)
        self.fds: list[int] = []

    def persistent_id(self, obj: object) -> object:
        if not isinstance(obj, Table):
            return None
        self.fds.append(obj.fileno())
        return ("table", len(self.fds) - 1, len(obj._map), obj._layout, obj.rules,
                obj._sections, obj.blocks, _SEED)


class _Unpickler(pickle.Unpickler):
    """Maps the memory files received with a `dumps` message (taking over their fds)."""

    def __init__(self, data: bytes, fds: Sequence[int]) -> None:
        super().__init__(io.BytesIO(data))
        self.fds = fds

    def persistent_load(self, pid: object) -> object:
        assert isinstance(pid, tuple) and len(pid) == 8
        tag, index, size, layout, rules, sections, blocks, seed = pid
        if tag != "table" or seed != _SEED:
            raise pickle.UnpicklingError("a shared table from a process with another hash "
                                         "key (not forked from the same parent)")
        return _attach(self.fds[index], size, layout, rules, sections, blocks)


def dumps(obj: object) -> tuple[bytes, list[int]]:
    """Pickle obj with its Tables by reference: the bytes, and the descriptors to send with
    them (valid while obj lives)."""
    out = io.BytesIO()
    pickler = _Pickler(out)
    pickler.dump(obj)
    return out.getvalue(), pickler.fds


def loads(data: bytes, fds: Sequence[int]) -> object:
    """The other half of dumps, in a process forked from the same parent (same hash key);
    takes over the received descriptors."""
    return _Unpickler(data, fds).load()


def send_fds(conn: Connection, fds: Sequence[int]) -> None:
    """Send descriptors (SCM_RIGHTS) over a multiprocessing pipe (a socket pair), after the
    message that says how many: what goes with a `dumps`."""
    if fds:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            reduction.sendfds(sock, list(fds))


def receive_fds(conn: Connection, count: int) -> list[int]:
    """The other half of send_fds (blocking)."""
    if not count:
        return []
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        return list(reduction.recvfds(sock, count))
