"""Parity of the twins: the compiled modules have the pure ones' names, and the same behaviour.

The names: every public name of each twinned module, and every public attribute of the
instances it makes, must be the same in both. The behaviour: the shared tests run on both (the
``twin`` fixture), the frame parser has its differential tests; here a differential test drives
both state tables with the same random sequences of operations and compares everything a caller
can see after each one.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpcresults import serialization
from rpcresults.exceptions import ReplyQueueLost
from tests.twins import STEMS, load_twin


def public(names: Any) -> List[str]:
    # ``annotations`` is what ``from __future__ import annotations`` leaves in a pure module
    return sorted(name for name in names if not name.startswith('_') and name != 'annotations')


def instances(module: Any) -> Dict[str, Any]:
    """One instance of each class a caller makes."""
    if hasattr(module, 'FrameParser'):
        return {'FrameParser': module.FrameParser(1, 'tag')}
    if hasattr(module, 'IdMemo'):
        return {'IdMemo': module.IdMemo(10)}
    if hasattr(module, 'FrameWriter'):
        return {'FrameWriter': module.FrameWriter(1, 131072)}
    if hasattr(module, 'decode_body') or hasattr(module, 'fill_values'):
        return {}
    return {'StateTable': module.StateTable(), 'Waiter': module.Waiter()}


@pytest.mark.parametrize('stem', STEMS)
def test_the_twins_have_the_same_public_names(stem: str) -> None:
    pure, compiled = load_twin('pure', stem), load_twin('compiled', stem)
    assert public(vars(compiled)) == public(vars(pure)), stem
    assert list(compiled.__all__) == list(pure.__all__)
    pure_objects, compiled_objects = instances(pure), instances(compiled)
    for name, obj in pure_objects.items():
        assert public(dir(compiled_objects[name])) == public(dir(obj)), f'{stem}.{name}'


def test_the_parity_check_would_see_a_missing_name() -> None:
    class Pure:
        def feed(self) -> None: ...
        def extra(self) -> None: ...

    class Compiled:
        def feed(self) -> None: ...

    assert public(dir(Compiled())) != public(dir(Pure()))


# -- the state tables, side by side ------------------------------------------------------------------
IDS = ['a', 'b', 'c', 'd']
STATUSES = ['PENDING', 'STARTED', 'PROGRESS', 'SUCCESS', 'FAILURE', 'REVOKED']

operation = st.one_of(
    st.tuples(st.just('track'), st.sampled_from(IDS)),
    st.tuples(st.just('drop_owner'), st.sampled_from(IDS)),
    st.tuples(st.just('reply'), st.sampled_from(IDS), st.sampled_from(STATUSES), st.integers(0, 9)),
    st.tuples(st.just('raw'), st.sampled_from(IDS), st.sampled_from([b'{', b'[1]', b'{"x": 1}', b'null'])),
    st.tuples(st.just('watch'), st.lists(st.sampled_from(IDS), min_size=1, max_size=3, unique=True)),
    st.tuples(st.just('unwatch'), st.integers(0, 3)),
    st.tuples(st.just('fail_pending'),),
    st.tuples(st.just('forget'), st.sampled_from(IDS)),
)


class Side:
    """One twin's table with its owners and waiters, and what a caller can see of it."""

    def __init__(self, module: Any) -> None:
        accept = serialization.accept_set(None)
        self.module = module
        self.table = module.StateTable(
            lambda body, ctype, cenc: serialization.decode(body, ctype, cenc, accept), buffer_max=2)
        self.owners: Dict[str, List[Any]] = {}
        self.waiters: List[Tuple[Any, List[str]]] = []
        self.seen: List[Any] = []

    def apply(self, op: Tuple[Any, ...]) -> Any:
        kind = op[0]
        try:
            if kind == 'track':
                owner = type('Owner', (), {})()
                self.owners.setdefault(op[1], []).append(owner)
                self.table.track(op[1], owner)
            elif kind == 'drop_owner':
                if self.owners.get(op[1]):
                    self.owners[op[1]].pop()
            elif kind == 'reply':
                body = json.dumps({'task_id': op[1], 'status': op[2], 'result': op[3]}).encode()
                return self.table.deliver_body(op[1], 'application/json', 'utf-8', body)
            elif kind == 'raw':
                return self.table.deliver_body(op[1], 'application/json', 'utf-8', op[2])
            elif kind == 'watch':
                waiter = self.module.Waiter(self.seen.append)
                self.table.watch(waiter, op[1])
                self.waiters.append((waiter, op[1]))
            elif kind == 'unwatch':
                if op[1] < len(self.waiters):
                    waiter, ids = self.waiters.pop(op[1])
                    self.table.unwatch(waiter, ids)
            elif kind == 'fail_pending':
                return sorted(self.table.fail_pending(lambda ids: ReplyQueueLost(ids)))
            elif kind == 'forget':
                self.table.forget(op[1])
        except Exception as exc:  # both twins must raise the same error, with the same message
            return (type(exc).__name__, str(exc))
        return None

    def view(self) -> Any:
        metas = {}
        for task_id in IDS:
            try:
                meta = self.table.meta(task_id)
            except Exception as exc:
                meta = type(exc).__name__
            metas[task_id] = meta if not isinstance(meta, BaseException) else repr(meta)
        waiters = [(w.remaining, [(tid, m if isinstance(m, dict) else repr(m)) for tid, m in w.bucket],
                    repr(w.error), w.done, w.has_news) for w, _ in self.waiters]
        return self.table.counters(), metas, waiters, [m.get('status') for m in self.seen]


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=30))
def test_both_state_tables_show_the_same_after_every_operation(ops: List[Tuple[Any, ...]]) -> None:
    pure, compiled = Side(load_twin('pure', 'table')), Side(load_twin('compiled', 'table'))
    for op in ops:
        assert pure.apply(op) == compiled.apply(op), op
        assert pure.view() == compiled.view(), op
