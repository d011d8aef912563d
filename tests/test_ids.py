"""Upstream query IDs: random, from os.urandom, refilled in batches."""

from __future__ import annotations

import collections
import os

from resolver.upstream import ids


def test_ids_cover_the_whole_16_bit_range_evenly():
    source = ids.IdSource()
    drawn = [source.take() for _ in range(200_000)]
    assert min(drawn) >= 0 and max(drawn) <= 0xFFFF
    counts = collections.Counter(value >> 12 for value in drawn)  # 16 buckets of 4,096 IDs
    assert len(counts) == 16
    assert max(counts.values()) < 1.1 * min(counts.values())


def test_each_batch_is_a_fresh_draw(monkeypatch):
    # Byte pairs that read the same in either byte order: the order is the machine's.
    draws = iter([b"\x01\x01" * (ids.BATCH // 2), b"\xab\xab" * (ids.BATCH // 2)])
    monkeypatch.setattr(os, "urandom", lambda size: next(draws))  # what ids draws from
    source = ids.IdSource()
    first = [source.take() for _ in range(ids.BATCH // 2)]
    assert set(first) == {0x0101}
    assert source.take() == 0xABAB
