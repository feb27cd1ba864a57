"""Result objects (AsyncResult, EagerResult, ResultSet, GroupResult) over kombu's ``memory://`` transport.

A second backend of the same app plays the worker: it publishes each state to the
client's reply queue exactly as a worker answers a request.
"""
from __future__ import annotations

import builtins
import gc
import pickle
import uuid
from datetime import datetime
from typing import Any, Dict, Iterator, List

import pytest

import rpcresults
from rpcresults import app as app_module
from rpcresults import states
from rpcresults.exceptions import IncompleteStream, TaskRevokedError
from rpcresults.result import AsyncResult, EagerResult, GroupResult, ResultSet, result_from_tuple


class TaskBoom(Exception):
    """An exception class of this module, rebuilt by qualified name on the client."""


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture(autouse=True)
def default_to_memory_app(memory_app) -> Iterator[None]:
    """Objects built without an app (unpickled results) use the test's memory app."""
    previous = app_module.set_default_app(memory_app)
    yield
    app_module.set_default_app(previous)


@pytest.fixture
def client(memory_app):
    backend = memory_app.backend
    backend.result_consumer.start()  # the reply queue exists before anything is published
    return backend


@pytest.fixture
def worker(memory_app) -> Iterator[Any]:
    backend = memory_app.create_backend()
    yield backend
    backend.close()


class Publisher:
    """Publishes task states to the client's reply queue, as a worker answering its request."""

    def __init__(self, worker: Any, client: Any) -> None:
        self.worker = worker
        self.client = client

    def request(self, task_id: str, **extra: Any) -> Dict[str, Any]:
        return {'reply_to': self.client.oid, 'correlation_id': task_id, **extra}

    def done(self, task_id: str, value: Any, **extra: Any) -> None:
        self.worker.mark_as_done(task_id, value, request=self.request(task_id, **extra))

    def fail(self, task_id: str, exc: BaseException, traceback: str = None) -> None:
        self.worker.mark_as_failure(task_id, exc, traceback=traceback, request=self.request(task_id))

    def started(self, task_id: str) -> None:
        self.worker.mark_as_started(task_id, request=self.request(task_id), pid=4242, hostname='worker@test')

    def state(self, task_id: str, state: str, meta: Any) -> None:
        self.worker.store_result(task_id, meta, state, request=self.request(task_id))

    def revoked(self, task_id: str) -> None:
        self.worker.mark_as_revoked(task_id, 'terminated', request=self.request(task_id))


@pytest.fixture
def pub(worker, client) -> Publisher:
    return Publisher(worker, client)


@pytest.fixture
def R(memory_app):
    """Build an AsyncResult bound to the memory app."""
    def make(task_id: str = None, **kwargs: Any) -> AsyncResult:
        return memory_app.AsyncResult(task_id or new_id(), **kwargs)
    return make


# -- AsyncResult: a successful task ---------------------------------------------------------

def test_get_and_state_of_a_successful_result(R, pub) -> None:
    result = R()
    pub.done(result.id, {'answer': 42, 'items': [1, 2]})
    assert result.get(timeout=5) == {'answer': 42, 'items': [1, 2]}
    assert result.ready() is True
    assert result.successful() is True
    assert result.failed() is False
    assert result.state == 'SUCCESS'
    assert result.status == 'SUCCESS'
    assert result.result == {'answer': 42, 'items': [1, 2]}
    assert result.info == {'answer': 42, 'items': [1, 2]}
    assert result.traceback is None
    assert result.children == []  # Celery sends [] for a request without children
    assert isinstance(result.date_done, datetime)
    assert result.date_done.tzinfo is not None


def test_state_answers_from_arrived_replies_without_get(R, pub) -> None:
    result = R()
    assert result.state == 'PENDING'
    assert result.ready() is False
    pub.done(result.id, 'value')
    assert result.state == 'SUCCESS'
    assert result.ready() is True
    assert result.result == 'value'


def test_started_state_then_success(R, pub) -> None:
    result = R()
    pub.started(result.id)
    assert result.state == 'STARTED'
    assert result.ready() is False
    assert result.result == {'pid': 4242, 'hostname': 'worker@test'}
    pub.done(result.id, 'finished')
    assert result.get(timeout=5) == 'finished'
    assert result.state == 'SUCCESS'


def test_on_message_receives_every_state_during_get(R, pub) -> None:
    result = R()
    pub.started(result.id)
    pub.state(result.id, 'PROGRESS', {'done': 1, 'total': 2})
    pub.done(result.id, 'ok')
    seen: List[Any] = []
    assert result.get(timeout=5, on_message=lambda meta: seen.append((meta['status'], meta['result']))) == 'ok'
    assert seen == [('STARTED', {'pid': 4242, 'hostname': 'worker@test'}),
                    ('PROGRESS', {'done': 1, 'total': 2}),
                    ('SUCCESS', 'ok')]


def test_get_callback_receives_id_and_value(R, pub) -> None:
    result = R()
    pub.done(result.id, 3)
    calls = []
    result.get(timeout=5, callback=lambda task_id, value: calls.append((task_id, value)))
    assert calls == [(result.id, 3)]


def test_get_twice_returns_the_same_value(R, pub) -> None:
    result = R()
    pub.done(result.id, [1, 2, 3])
    assert result.get(timeout=5) == [1, 2, 3]
    assert result.get(timeout=0) == [1, 2, 3]


# -- AsyncResult: failures ------------------------------------------------------------------

def test_failure_raises_the_rebuilt_exception(R, pub) -> None:
    result = R()
    pub.fail(result.id, TaskBoom('went wrong', 7), traceback='Traceback (most recent call last): ...')
    with pytest.raises(TaskBoom) as info:
        result.get(timeout=5)
    assert info.value.args == ('went wrong', 7)
    assert result.state == 'FAILURE'
    assert result.failed() is True
    assert result.successful() is False
    assert result.ready() is True
    assert isinstance(result.result, TaskBoom)
    assert result.result.args == ('went wrong', 7)
    assert result.traceback == 'Traceback (most recent call last): ...'


def test_failure_with_propagate_false_returns_the_exception(R, pub) -> None:
    result = R()
    pub.fail(result.id, ValueError('bad input'))
    value = result.get(timeout=5, propagate=False)
    assert isinstance(value, ValueError)
    assert value.args == ('bad input',)


def test_maybe_throw(R, pub) -> None:
    ok, bad = R(), R()
    pub.done(ok.id, 'fine')
    pub.fail(bad.id, KeyError('nope'))
    ok.get(timeout=5)
    bad.get(timeout=5, propagate=False)
    assert ok.maybe_throw() == 'fine'
    with pytest.raises(KeyError):
        bad.maybe_throw()
    with pytest.raises(KeyError):
        bad.maybe_reraise()
    returned = bad.maybe_throw(propagate=False)
    assert isinstance(returned, KeyError)
    assert returned.args == ('nope',)


def test_revoked_result_raises_task_revoked(R, pub) -> None:
    result = R()
    pub.revoked(result.id)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=5)
    assert result.state == 'REVOKED'
    assert result.ready() is True


def test_follow_parents_raises_the_parents_failure(R, pub) -> None:
    parent = R()
    child = R(parent=parent)
    pub.fail(parent.id, TaskBoom('parent broke'))
    pub.done(child.id, 'child value')
    with pytest.raises(TaskBoom) as info:
        child.get(timeout=5)
    assert info.value.args == ('parent broke',)
    assert child.get(timeout=5, follow_parents=False) == 'child value'


# -- AsyncResult: identity, tuples, pickling ------------------------------------------------

def test_as_tuple_and_as_list_with_parents(R) -> None:
    gp, p, c = new_id(), new_id(), new_id()
    result = R(c, parent=R(p, parent=R(gp)))
    assert result.as_tuple() == ((c, ((p, ((gp, None), None)), None)), None)
    assert result.as_list() == [c, p, gp]
    assert R(c).as_tuple() == ((c, None), None)
    assert R(c).as_list() == [c]


def test_result_from_tuple_round_trip_with_parents(R, memory_app) -> None:
    gp, p, c = new_id(), new_id(), new_id()
    original = R(c, parent=R(p, parent=R(gp)))
    rebuilt = result_from_tuple(original.as_tuple(), app=memory_app)
    assert isinstance(rebuilt, AsyncResult)
    assert rebuilt.id == c
    assert rebuilt.parent.id == p
    assert rebuilt.parent.parent.id == gp
    assert rebuilt.parent.parent.parent is None
    assert rebuilt.as_tuple() == original.as_tuple()


def test_result_from_tuple_round_trip_with_nested_group(R, memory_app) -> None:
    a, b, gid, pid, tail = new_id(), new_id(), new_id(), new_id(), new_id()
    group = memory_app.GroupResult(gid, [R(a), R(b)], parent=R(pid))
    assert group.as_tuple() == ((gid, ((pid, None), None)), [((a, None), None), ((b, None), None)])
    after = R(tail, parent=group)
    assert after.as_tuple() == ((tail, group.as_tuple()), None)

    rebuilt = result_from_tuple(after.as_tuple(), app=memory_app)
    assert rebuilt.id == tail
    assert isinstance(rebuilt.parent, GroupResult)
    assert rebuilt.parent.id == gid
    assert [member.id for member in rebuilt.parent.results] == [a, b]
    assert rebuilt.parent.parent.id == pid
    assert rebuilt.as_tuple() == after.as_tuple()

    group_again = result_from_tuple(group.as_tuple(), app=memory_app)
    assert isinstance(group_again, GroupResult)
    assert group_again == group


def test_result_from_tuple_passes_results_through(R) -> None:
    result = R()
    assert result_from_tuple(result) is result


def test_pickle_round_trip(R) -> None:
    parent = R()
    result = R(parent=parent, task_name='tasks.add')
    clone = pickle.loads(pickle.dumps(result))
    assert isinstance(clone, AsyncResult)
    assert clone == result
    assert clone.id == result.id
    assert clone.name == 'tasks.add'
    assert clone.parent.id == parent.id


def test_pickled_result_reads_the_same_reply(R, pub) -> None:
    result = R()
    clone = pickle.loads(pickle.dumps(result))
    pub.done(result.id, 'shared')
    assert clone.get(timeout=5) == 'shared'


def test_equality_and_hash(R) -> None:
    task_id = new_id()
    a, b, other = R(task_id), R(task_id), R()
    assert a == b
    assert not a != b
    assert a == task_id
    assert task_id == a
    assert a != other
    assert a != other.id
    assert a != 5
    assert hash(a) == hash(b)
    assert len({a, b, other}) == 2
    assert {a: 'x'}[b] == 'x'
    assert a.task_id == task_id


# -- then() ---------------------------------------------------------------------------------

def test_then_fires_when_another_get_drains_the_reply(R, pub) -> None:
    watched, other = R(), R()
    calls: List[Any] = []
    errors: List[Any] = []
    watched.then(calls.append, on_error=errors.append)
    assert calls == []
    pub.done(watched.id, 'first')
    pub.done(other.id, 'second')
    assert other.get(timeout=5) == 'second'
    assert calls == [watched]
    assert errors == []
    assert calls[0].result == 'first'


def test_then_on_error_fires_for_a_failure(R, pub) -> None:
    watched, other = R(), R()
    calls: List[Any] = []
    errors: List[BaseException] = []
    watched.then(calls.append, on_error=errors.append)
    pub.fail(watched.id, TaskBoom('then failed'))
    pub.done(other.id, 'x')
    other.get(timeout=5)
    assert calls == []
    assert len(errors) == 1
    assert isinstance(errors[0], TaskBoom)
    assert errors[0].args == ('then failed',)


def test_then_on_a_ready_result_fires_immediately(R, pub) -> None:
    result = R()
    pub.done(result.id, 1)
    result.get(timeout=5)
    calls: List[Any] = []
    assert result.then(calls.append) is result
    assert calls == [result]


def test_then_fires_once(R, pub) -> None:
    watched = R()
    calls: List[Any] = []
    watched.then(calls.append)
    pub.done(watched.id, 1)
    watched.get(timeout=5)
    watched.get(timeout=5)
    assert watched.state == 'SUCCESS'
    assert calls == [watched]


# -- dependencies ---------------------------------------------------------------------------

@pytest.fixture
def tree(R, pub) -> Dict[str, str]:
    """root -> (c1, c2), c1 -> leaf; every node finished, children carried in the metas."""
    ids = {name: new_id() for name in ('root', 'c1', 'c2', 'leaf')}
    pub.done(ids['root'], 'root-value', children=[R(ids['c1']), R(ids['c2'])])
    pub.done(ids['c1'], 'c1-value', children=[R(ids['leaf'])])
    pub.done(ids['c2'], 'c2-value')
    pub.done(ids['leaf'], 'leaf-value')
    return ids


def test_children_are_rebuilt_results(R, tree) -> None:
    root = R(tree['root'])
    assert root.get(timeout=5) == 'root-value'
    children = root.children
    assert [type(child) for child in children] == [AsyncResult, AsyncResult]
    assert [child.id for child in children] == [tree['c1'], tree['c2']]


def test_iterdeps_walks_breadth_first(R, tree) -> None:
    root = R(tree['root'])
    root.get(timeout=5)
    pairs = [(parent.id if parent is not None else None, node.id) for parent, node in root.iterdeps()]
    assert pairs == [(None, tree['root']), (tree['root'], tree['c1']), (tree['root'], tree['c2']),
                     (tree['c1'], tree['leaf'])]


def test_collect_yields_every_value(R, tree) -> None:
    root = R(tree['root'])
    root.get(timeout=5)
    collected = [(node.id, value) for node, value in root.collect(timeout=5)]
    assert collected == [(tree['root'], 'root-value'), (tree['c1'], 'c1-value'),
                         (tree['c2'], 'c2-value'), (tree['leaf'], 'leaf-value')]


def test_get_leaf(R, tree) -> None:
    root = R(tree['root'])
    root.get(timeout=5)
    assert root.get_leaf() == 'leaf-value'


def test_build_graph(R, tree) -> None:
    root = R(tree['root'])
    root.get(timeout=5)
    graph = root.build_graph()
    assert len(graph) == 4
    assert {node.id for node in graph} == set(tree.values())
    assert sorted((p.id, c.id) for p, c in graph.edges()) == sorted(
        [(tree['root'], tree['c1']), (tree['root'], tree['c2']), (tree['c1'], tree['leaf'])])
    assert R(tree['leaf']) in graph
    dot = root.graph.to_dot()
    assert f'"{tree["root"]}" -> "{tree["c1"]}"' in dot


def test_iterdeps_raises_incomplete_stream_when_a_child_is_not_ready(R, pub) -> None:
    root_id, pending_child = new_id(), new_id()
    pub.done(root_id, 'root', children=[R(pending_child)])
    root = R(root_id)
    root.get(timeout=5)
    with pytest.raises(IncompleteStream):
        list(root.iterdeps())
    stream = root.iterdeps()
    assert next(stream)[1].id == root_id
    assert next(stream)[1].id == pending_child  # yielded, then found not ready
    with pytest.raises(IncompleteStream):
        next(stream)
    pairs = [(p.id if p is not None else None, n.id) for p, n in root.iterdeps(intermediate=True)]
    assert pairs == [(None, root_id), (root_id, pending_child)]


# -- forget, timeouts, leaks ----------------------------------------------------------------

def test_forget_drops_the_known_state(R, pub) -> None:
    result = R()
    pub.done(result.id, 'remembered')
    assert result.get(timeout=5) == 'remembered'
    result.forget()
    assert result.state == 'PENDING'
    assert result.ready() is False


@pytest.mark.parametrize('timeout', [0, 0.2])
def test_get_times_out_for_a_result_never_published(R, timeout) -> None:
    result = R()
    with pytest.raises(rpcresults.exceptions.TimeoutError) as info:
        result.get(timeout=timeout)
    assert isinstance(info.value, builtins.TimeoutError)
    assert result.state == 'PENDING'


def test_timeout_is_catchable_as_the_builtin(R) -> None:
    with pytest.raises(builtins.TimeoutError):
        R().get(timeout=0)


def test_timed_out_results_do_not_leak(memory_app, client, pub) -> None:
    def one_timeout() -> None:
        result = memory_app.AsyncResult(new_id())
        with pytest.raises(rpcresults.exceptions.TimeoutError):
            result.get(timeout=0)

    for _ in range(200):
        one_timeout()
    gc.collect()
    unrelated = new_id()
    pub.done(unrelated, 'poke')
    assert client.get_task_meta(unrelated)['status'] == 'SUCCESS'  # one more operation: reaps
    assert client.stats()['tracked'] == 0


def test_late_reply_after_timeout_is_counted_not_lost_to_others(memory_app, client, pub) -> None:
    def time_out(task_id: str) -> None:
        with pytest.raises(rpcresults.exceptions.TimeoutError):
            memory_app.AsyncResult(task_id).get(timeout=0)

    late_id = new_id()
    time_out(late_id)
    gc.collect()
    live = memory_app.AsyncResult(new_id())
    pub.done(late_id, 'late')
    pub.done(live.id, 'live')
    assert live.get(timeout=5) == 'live'
    assert client.stats()['late'] == 1


# -- EagerResult ----------------------------------------------------------------------------

def test_eager_success(memory_app) -> None:
    result = EagerResult('eager-1', 42, states.SUCCESS, app=memory_app)
    assert result.get() == 42
    assert result.ready() is True
    assert result.successful() is True
    assert result.failed() is False
    assert result.state == 'SUCCESS'
    assert result.result == 42
    assert result.id == 'eager-1'


def test_eager_failure_raises(memory_app) -> None:
    exc = TaskBoom('eager failed')
    result = EagerResult('eager-2', exc, states.FAILURE, traceback='tb', app=memory_app)
    with pytest.raises(TaskBoom) as info:
        result.get()
    assert info.value is exc
    assert result.get(propagate=False) is exc
    assert result.failed() is True
    assert result.ready() is True
    assert result.traceback == 'tb'
    with pytest.raises(TaskBoom):
        result.maybe_throw()


@pytest.mark.parametrize('state', [states.PENDING, states.STARTED, states.RETRY, 'PROGRESS'])
def test_eager_is_always_ready(memory_app, state) -> None:
    assert EagerResult('eager-3', None, state, app=memory_app).ready() is True


def test_eager_then_fires_immediately(memory_app) -> None:
    result = EagerResult('eager-4', 'v', states.SUCCESS, app=memory_app)
    calls: List[Any] = []
    result.then(calls.append)
    assert calls == [result]


def test_eager_then_on_error_fires_immediately(memory_app) -> None:
    exc = ValueError('x')
    result = EagerResult('eager-5', exc, states.FAILURE, app=memory_app)
    calls: List[Any] = []
    errors: List[Any] = []
    result.then(calls.append, on_error=errors.append)
    assert calls == []
    assert errors == [exc]


def test_eager_pickle_round_trip(memory_app) -> None:
    clone = pickle.loads(pickle.dumps(EagerResult('eager-6', [1, 2], states.SUCCESS, app=memory_app)))
    assert isinstance(clone, EagerResult)
    assert clone.get() == [1, 2]
    assert clone.id == 'eager-6'


# -- ResultSet: membership ------------------------------------------------------------------

def test_result_set_membership(R, memory_app) -> None:
    a, b, c = R(), R(), R()
    rs = ResultSet([], app=memory_app)
    rs.add(a)
    rs.add(a)
    assert len(rs) == 1
    rs.update([a, b, c, R(b.id)])
    assert [r.id for r in rs] == [a.id, b.id, c.id]
    assert len(rs) == 3
    assert rs[0] is a
    assert [r.id for r in rs[1:]] == [b.id, c.id]
    assert rs.results == [a, b, c]

    rs.discard(R())  # not a member: no error
    assert len(rs) == 3
    rs.discard(b)
    assert [r.id for r in rs] == [a.id, c.id]
    with pytest.raises(KeyError):
        rs.remove(b)
    rs.remove(c.id)
    assert [r.id for r in rs] == [a.id]
    rs.clear()
    assert len(rs) == 0
    assert list(rs) == []


def test_result_set_states(R, pub, memory_app) -> None:
    ok, bad, later = R(), R(), R()
    rs = ResultSet([ok, bad, later], app=memory_app)
    assert rs.ready() is False
    assert rs.waiting() is True
    assert rs.completed_count() == 0
    pub.done(ok.id, 1)
    pub.fail(bad.id, ValueError('x'))
    assert rs.ready() is False
    assert rs.waiting() is True
    assert rs.completed_count() == 1
    assert rs.failed() is True
    assert rs.successful() is False
    pub.done(later.id, 3)
    assert rs.ready() is True
    assert rs.waiting() is False
    assert rs.completed_count() == 2
    assert rs.successful() is False


def test_result_set_all_successful(R, pub, memory_app) -> None:
    members = [R() for _ in range(3)]
    rs = ResultSet(members, app=memory_app)
    for member in members:
        pub.done(member.id, member.id)
    assert rs.successful() is True
    assert rs.failed() is False
    assert rs.completed_count() == 3
    assert rs.ready() is True


# -- ResultSet: joining ---------------------------------------------------------------------

def test_join_returns_member_order(R, pub, memory_app) -> None:
    members = [R() for _ in range(5)]
    for index, member in reversed(list(enumerate(members))):
        pub.done(member.id, index * 10)
    assert ResultSet(members, app=memory_app).join(timeout=5) == [0, 10, 20, 30, 40]


def test_join_native_returns_member_order_when_published_in_reverse(R, pub, memory_app) -> None:
    members = [R() for _ in range(20)]
    for index, member in reversed(list(enumerate(members))):
        pub.done(member.id, f'value-{index}')
    assert ResultSet(members, app=memory_app).join_native(timeout=5) == [f'value-{i}' for i in range(20)]


def test_join_native_fills_duplicate_ids(R, pub, memory_app) -> None:
    a, b = R(), R()
    rs = ResultSet([a, b, R(a.id)], app=memory_app)
    pub.done(b.id, 'B')
    pub.done(a.id, 'A')
    assert rs.join_native(timeout=5) == ['A', 'B', 'A']


def test_join_native_callback_gets_id_and_value(R, pub, memory_app) -> None:
    members = [R() for _ in range(3)]
    for index, member in enumerate(members):
        pub.done(member.id, index)
    calls: List[Any] = []
    assert ResultSet(members, app=memory_app).join_native(
        timeout=5, callback=lambda task_id, value: calls.append((task_id, value))) == []
    assert sorted(calls) == sorted((m.id, i) for i, m in enumerate(members))


def test_iter_native_yields_in_arrival_order(R, pub, memory_app) -> None:
    a, b, c = R(), R(), R()
    rs = ResultSet([a, b, c], app=memory_app)
    pub.done(b.id, 'B')
    pub.done(c.id, 'C')
    pub.done(a.id, 'A')
    got = [(task_id, meta['status'], meta['result']) for task_id, meta in rs.iter_native(timeout=5)]
    assert got == [(b.id, 'SUCCESS', 'B'), (c.id, 'SUCCESS', 'C'), (a.id, 'SUCCESS', 'A')]


def test_empty_set_joins_to_empty_list(memory_app) -> None:
    rs = ResultSet([], app=memory_app)
    assert rs.join_native() == []
    assert rs.join() == []
    assert rs.get() == []
    assert list(rs.iter_native()) == []


def test_get_uses_native_join(R, pub, memory_app) -> None:
    members = [R() for _ in range(4)]
    for index, member in reversed(list(enumerate(members))):
        pub.done(member.id, index)
    rs = ResultSet(members, app=memory_app)
    assert rs.supports_native_join is True
    assert rs.get(timeout=5) == [0, 1, 2, 3]


def test_join_native_propagates_a_failure(R, pub, memory_app) -> None:
    ok, bad = R(), R()
    pub.done(ok.id, 1)
    pub.fail(bad.id, TaskBoom('member failed'))
    with pytest.raises(TaskBoom) as info:
        ResultSet([ok, bad], app=memory_app).join_native(timeout=5)
    assert info.value.args == ('member failed',)


def test_join_native_without_propagate_returns_exceptions_in_place(R, pub, memory_app) -> None:
    first, bad, last = R(), R(), R()
    pub.done(last.id, 3)
    pub.fail(bad.id, ValueError('in place'))
    pub.done(first.id, 1)
    values = ResultSet([first, bad, last], app=memory_app).join_native(timeout=5, propagate=False)
    assert values[0] == 1
    assert values[2] == 3
    assert isinstance(values[1], ValueError)
    assert values[1].args == ('in place',)


def test_join_without_propagate_returns_exceptions_in_place(R, pub, memory_app) -> None:
    first, bad = R(), R()
    pub.done(first.id, 1)
    pub.fail(bad.id, ValueError('joined'))
    values = ResultSet([first, bad], app=memory_app).join(timeout=5, propagate=False)
    assert values[0] == 1
    assert isinstance(values[1], ValueError)


def test_join_native_times_out(R, pub, memory_app) -> None:
    done, never = R(), R()
    pub.done(done.id, 1)
    with pytest.raises(rpcresults.exceptions.TimeoutError):
        ResultSet([done, never], app=memory_app).join_native(timeout=0.1)


def test_result_set_then_fires_after_all_members(R, pub, memory_app) -> None:
    members = [R() for _ in range(3)]
    rs = ResultSet(members, app=memory_app)
    calls: List[Any] = []
    rs.then(calls.append)
    pub.done(members[0].id, 0)
    pub.done(members[1].id, 1)
    poke = R()
    pub.done(poke.id, 'poke')
    poke.get(timeout=5)
    assert calls == []
    pub.done(members[2].id, 2)
    poke2 = R()
    pub.done(poke2.id, 'poke')
    poke2.get(timeout=5)
    assert calls == [rs]


def test_result_set_maybe_throw(R, pub, memory_app) -> None:
    ok, bad = R(), R()
    pub.done(ok.id, 1)
    pub.fail(bad.id, TaskBoom('set'))
    rs = ResultSet([ok, bad], app=memory_app)
    rs.join_native(timeout=5, propagate=False)
    with pytest.raises(TaskBoom):
        rs.maybe_throw()
    rs.maybe_throw(propagate=False)  # no raise
    good = ResultSet([ok], app=memory_app)
    good.maybe_throw()


# -- GroupResult ----------------------------------------------------------------------------

def test_group_result_as_tuple_children_and_equality(R, memory_app) -> None:
    gid, a, b = new_id(), new_id(), new_id()
    group = memory_app.GroupResult(gid, [R(a), R(b)])
    assert group.as_tuple() == ((gid, None), [((a, None), None), ((b, None), None)])
    assert [child.id for child in group.children] == [a, b]
    assert group.children is group.results
    assert group == memory_app.GroupResult(gid, [R(a), R(b)])
    assert group != memory_app.GroupResult(new_id(), [R(a), R(b)])
    assert group != memory_app.GroupResult(gid, [R(a)])
    assert group == gid
    assert group != new_id()


def test_group_result_joins(R, pub, memory_app) -> None:
    members = [R() for _ in range(3)]
    for index, member in reversed(list(enumerate(members))):
        pub.done(member.id, index)
    group = memory_app.GroupResult(new_id(), members)
    assert group.join_native(timeout=5) == [0, 1, 2]
    assert group.ready() is True


def test_group_result_pickle_round_trip(R, memory_app) -> None:
    group = memory_app.GroupResult(new_id(), [R(), R()])
    clone = pickle.loads(pickle.dumps(group))
    assert isinstance(clone, GroupResult)
    assert clone == group


@pytest.mark.parametrize('operation', ['save', 'delete', 'restore'])
def test_group_storage_is_not_implemented_on_rpc(R, memory_app, operation) -> None:
    group = memory_app.GroupResult(new_id(), [R()])
    with pytest.raises(NotImplementedError) as info:
        if operation == 'restore':
            GroupResult.restore(group.id, app=memory_app)
        else:
            getattr(group, operation)()
    message = str(info.value)
    assert 'rpc://' in message
    assert 'group' in message
