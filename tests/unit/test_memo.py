"""The compact id memo (``IdMemo``) on both twins: a bounded set that forgets the oldest first."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.twins import load_twin


@pytest.fixture
def memo(twin: Any) -> Any:
    return twin.memo


def test_remembers_and_forgets_the_oldest_past_its_capacity(memo: Any) -> None:
    ids = IdsOf(5000)
    kept = memo.IdMemo(1000)
    for task_id in ids:
        kept.add(task_id)
    assert len(kept) == 1000
    assert all(task_id in kept for task_id in ids[-1000:])
    assert not any(task_id in kept for task_id in ids[:4000])


def test_discard_and_an_id_added_twice(memo: Any) -> None:
    kept = memo.IdMemo(3)
    kept.add('a')
    kept.add('a')
    assert len(kept) == 1 and 'a' in kept
    kept.discard('a')
    kept.discard('never-added')
    assert 'a' not in kept and len(kept) == 0 and not kept
    with pytest.raises(ValueError):
        memo.IdMemo(0)


def test_memory_stays_compact_whatever_the_ids_length(memo: Any) -> None:
    kept = memo.IdMemo(100_000)
    for task_id in IdsOf(300_000, width=200):
        kept.add(task_id)
    assert len(kept) == 100_000
    assert kept.memory / len(kept) <= 36  # bytes an id: the fingerprint table and the ring


def IdsOf(count: int, width: int = 36) -> List[str]:
    return [f'{index:0{width}d}' for index in range(count)]


operations = st.lists(st.tuples(st.sampled_from(['add', 'discard', 'check']), st.integers(0, 40)),
                      max_size=300)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), operations)
def test_both_twins_behave_as_a_bounded_ordered_set(capacity: int, ops: List[Tuple[str, int]]) -> None:
    """The reference: an ordered set that drops its oldest past ``capacity`` (a re-added id keeps its place;
    a discarded one is gone)."""
    twins = [load_twin('pure', 'memo').IdMemo(capacity), load_twin('compiled', 'memo').IdMemo(capacity)]
    reference: 'OrderedDict[str, None]' = OrderedDict()
    ring: List[str] = []  # the order of arrivals, discarded ones included (as the memo's ring is)
    for op, number in ops:
        task_id = f'id-{number}'
        if op == 'add':
            if task_id not in reference:
                while len(ring) >= capacity:
                    reference.pop(ring.pop(0), None)
                reference[task_id] = None
                ring.append(task_id)
        elif op == 'discard':
            reference.pop(task_id, None)
        for kept in twins:
            if op == 'add':
                kept.add(task_id)
            elif op == 'discard':
                kept.discard(task_id)
            assert (task_id in kept) == (task_id in reference), (op, task_id)
            assert len(kept) == len(reference)
