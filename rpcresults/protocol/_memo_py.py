"""A bounded set of task ids kept compactly: a 64-bit fingerprint each, the oldest forgotten first.

The state table remembers two kinds of ids it no longer holds: replies evicted from the
early-arrival buffer (a ``get()`` for one fails fast instead of waiting for nothing) and
ids whose result objects were collected before their result came (a reply for one is
counted as late). Both can run into the millions on a busy client, so an id is kept as
the 8-byte ``hash()`` of its string in an open-addressing table, with a ring of the same
fingerprints in the order they came: about 20 to 35 bytes an id, whatever the id's length,
against about 100 for a string in a dict. Two ids share a fingerprint with a chance of
one in 2**64 per pair, which makes the set's answer wrong for one of them; nothing else is
ever lost. Past ``capacity`` ids the oldest are forgotten.

This file is both twins: run as it is, it is the pure-Python memo; compiled by Cython as
``rpcresults.protocol._memo_c`` with the C types of ``_memo_c.pxd``, it is the compiled one.
"""
from __future__ import annotations

from array import array
from typing import Hashable

__all__ = ('IdMemo',)

_EMPTY = 0
_GONE = 1  # a slot whose fingerprint was removed (probing goes on past it)
_FIRST_SLOTS = 1024  # the table's size at first; it doubles as the memo grows


def _fingerprint(task_id: Hashable) -> int:
    value = hash(task_id)
    if value == _EMPTY or value == _GONE:  # the two markers are never fingerprints
        value += 2
    return value


class IdMemo:
    """Remembers up to ``capacity`` ids (``add``, ``discard``, ``in``); the oldest go first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f'capacity must be 1 or more, not {capacity}')
        self.capacity = capacity
        self._live = 0  # fingerprints in the table
        self._used = 0  # slots not empty: live ones and removed ones
        self._ring = array('q')  # fingerprints in the order they came (some removed since)
        self._head = 0  # where the oldest of the ring is
        self._slots = array('q', [_EMPTY]) * _FIRST_SLOTS
        self._mask = _FIRST_SLOTS - 1

    def __len__(self) -> int:
        return self._live

    def __bool__(self) -> bool:
        return self._live > 0

    def __contains__(self, task_id: Hashable) -> bool:
        if self._live == 0:
            return False
        return self._find(_fingerprint(task_id)) >= 0

    @property
    def memory(self) -> int:
        """Bytes held by the table and the ring."""
        return (len(self._slots) + len(self._ring)) * 8

    def add(self, task_id: Hashable) -> None:
        """Remember ``task_id`` (forgetting the oldest one when full); an id already held stays as it was."""
        fp = _fingerprint(task_id)
        if self._live and self._find(fp) >= 0:
            return
        while len(self._ring) - self._head >= self.capacity:
            self._forget_oldest()
        if (self._used + 1) * 4 > len(self._slots) * 3:  # at most three quarters of the slots used
            self._rebuild()
        self._place(fp)
        self._ring.append(fp)

    def discard(self, task_id: Hashable) -> None:
        """Forget ``task_id`` now (its place in the ring is skipped when its turn comes)."""
        if self._live == 0:
            return
        index = self._find(_fingerprint(task_id))
        if index >= 0:
            self._slots[index] = _GONE
            self._live -= 1

    def clear(self) -> None:
        """Forget every id."""
        self.__init__(self.capacity)  # type: ignore[misc]

    # -- the table ---------------------------------------------------------------------------
    def _find(self, fp: int) -> int:
        slots = self._slots
        mask = self._mask
        index = fp & mask
        while True:
            value = slots[index]
            if value == fp:
                return index
            if value == _EMPTY:
                return -1
            index = (index + 1) & mask

    def _place(self, fp: int) -> None:
        slots = self._slots
        mask = self._mask
        index = fp & mask
        while slots[index] != _EMPTY and slots[index] != _GONE:
            index = (index + 1) & mask
        if slots[index] == _EMPTY:
            self._used += 1
        slots[index] = fp
        self._live += 1

    def _forget_oldest(self) -> None:
        fp = self._ring[self._head]
        self._head += 1
        index = self._find(fp)
        if index >= 0:
            self._slots[index] = _GONE
            self._live -= 1
        if self._head * 4 > len(self._ring):  # drop the forgotten quarter of the ring
            del self._ring[:self._head]
            self._head = 0

    def _rebuild(self) -> None:
        """A new table for the live fingerprints: twice as large while the memo grows (to at
        least 1.5 slots an id of ``capacity``), else the same size without the removed ones."""
        old = self._slots
        size = len(old)
        if self._live * 2 >= size and size * 2 < self.capacity * 3:
            size *= 2
        self._slots = array('q', [_EMPTY]) * size
        self._mask = size - 1
        self._live = 0
        self._used = 0
        for value in old:
            if value != _EMPTY and value != _GONE:
                self._place(value)
