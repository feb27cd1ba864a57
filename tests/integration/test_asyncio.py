"""asyncio on the real broker: ``await result``, ``aget``, ``ajoin_native``,
``aiter_native``, EagerResult awaits.

Results are published by a worker backend (another connection), usually from a thread
while the loop awaits. Every coroutine runs under ``asyncio.run(..., debug=True)``
(a callback from the wrong thread raises there) inside ``asyncio.wait_for`` so nothing
can hang; "the loop is not blocked" is shown by counting, never by timing: the result
is only published once a concurrent task has ticked enough times.

Run on both state-table twins by CI's two passes (``rpcresults.protocol`` picks the twin).
"""
from __future__ import annotations

import asyncio
import builtins
import gc
import os
import threading
from typing import Any, Awaitable, Callable, Iterator, List, Tuple

import pytest

from rpcresults import App, ResultSet, states
from rpcresults.engine.channel import wait_readable
from rpcresults.exceptions import TimeoutError
from rpcresults.result import EagerResult

from ..conftest import make_app, new_id, request_for
from ..proxy import TcpProxy
from ..helpers import Call, bound, report_from_child, wait_until

BOUND = 60.0  # bound on any one test coroutine


@pytest.fixture(autouse=True)
def reply_queue(request: pytest.FixtureRequest) -> None:
    """Declare the client's reply queue first, as sending a task would (a reply needs a queue)."""
    if 'client' in request.fixturenames:
        request.getfixturevalue('client').result_consumer.start()


def run(coro: Awaitable[Any], bound_s: float = BOUND) -> Any:
    """Run ``coro`` on a fresh loop in debug mode, bounded."""
    return asyncio.run(asyncio.wait_for(coro, bound_s), debug=True)


async def until(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    """Yield to the loop until ``predicate()`` holds; fail after ``timeout`` (loop time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f'gave up waiting for {what}')
        await asyncio.sleep(0.005)


def publish(worker: Any, client: Any, pairs: Any) -> None:
    for task_id, value in pairs:
        worker.mark_as_done(task_id, value, request=request_for(client, task_id))


def publish_soon(worker: Any, client: Any, pairs: Any) -> 'asyncio.Future[None]':
    """Publish from a thread of the loop's executor (the loop keeps running)."""
    pairs = list(pairs)
    return asyncio.get_running_loop().run_in_executor(None, publish, worker, client, pairs)


def assert_released(client: Any, watched: List[int]) -> None:
    """Awaits were watched, none is left on the asyncio reader (nor any wait in progress), the
    table holds none of their waiters (once their results are collected nothing is tracked: an
    entry with a waiter attached is never reaped), and the reader thread ends."""
    assert watched and all(count >= 1 for count in watched), f'no await was watched: {watched}'
    stats = client.stats()
    assert stats['aio_waits'] == 0
    assert stats['waits'] == 0
    gc.collect()
    assert client.stats()['tracked'] == 0, 'a waiter is still held (by the table?)'
    wait_until(lambda: client.stats()['aio_reader'] == 0, 10, 'the asyncio reader thread to end')


async def watched_waiters(client: Any, count: int) -> List[int]:
    """Once at least ``count`` awaits are in progress: how many the asyncio reader serves (a one-item list)."""
    await until(lambda: client.stats()['aio_waits'] >= count, f'{count} await(s) to be watched')
    return [client.stats()['aio_waits']]


class Ticker:
    """A concurrent task that counts its turns and fires ``action`` on turn ``at``."""

    def __init__(self, at: int, action: Callable[[], Any]) -> None:
        self.at = at
        self.action = action
        self.ticks = 0
        self.running = True

    async def run(self) -> None:
        while self.running:
            self.ticks += 1
            if self.ticks == self.at:
                self.action()
            await asyncio.sleep(0)


# -- single results -------------------------------------------------------------------------------
def test_await_and_aget_deliver_results_published_while_the_loop_keeps_running(client, worker):
    ids = [new_id() for _ in range(3)]
    early = new_id()
    publish(worker, client, [(early, 'was-early')])  # arrives before anyone awaits it

    async def main() -> Tuple[Any, ...]:
        first = bound(client, ids[0])
        # the result is published only once the ticker ran 200 turns: a blocked loop never gets there
        ticker = Ticker(200, lambda: publish_soon(worker, client, [(ids[0], {'n': 0})]))
        ticking = asyncio.ensure_future(ticker.run())
        value = await first
        ticker.running = False
        await ticking
        second = await bound(client, ids[1]).aget(timeout=30)  # published after this starts waiting
        third = await bound(client, early).aget(timeout=30)
        return value, ticker.ticks, second, third

    async def with_later_publish() -> Tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, publish_soon, worker, client, [(ids[1], 'second')])
        return await main()

    value, ticks, second, third = run(with_later_publish())
    assert value == {'n': 0}
    assert ticks >= 200
    assert second == 'second'
    assert third == 'was-early'


def test_failures_propagate_and_propagate_false_returns_the_exception(client, worker):
    failed, ok = new_id(), new_id()

    async def main() -> Tuple[Any, ...]:
        await publish_soon(worker, client, [])
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: worker.mark_as_failure(failed, ValueError('boom'), request=request_for(client, failed)))
        with pytest.raises(ValueError, match='boom'):
            await bound(client, failed)
        returned = await bound(client, failed).aget(timeout=10, propagate=False)
        await publish_soon(worker, client, [(ok, 1)])
        with pytest.raises(ValueError, match='boom'):
            await ResultSet([bound(client, ok), bound(client, failed)]).ajoin_native(timeout=10)
        values = await ResultSet([bound(client, ok), bound(client, failed)]).ajoin_native(
            timeout=10, propagate=False)
        return returned, values

    returned, values = run(main())
    assert isinstance(returned, ValueError) and str(returned) == 'boom'
    assert values[0] == 1 and isinstance(values[1], ValueError)


def test_eager_result_is_awaitable():
    async def main() -> Tuple[Any, ...]:
        good = await EagerResult('e1', 7, states.SUCCESS)
        got = await EagerResult('e2', 8, states.SUCCESS).aget(timeout=0)
        with pytest.raises(KeyError):
            await EagerResult('e3', KeyError('k'), states.FAILURE)
        return good, got

    assert run(main()) == (7, 8)


# -- result sets ----------------------------------------------------------------------------------
def test_ajoin_native_2000_in_member_order_while_the_loop_ticks(app, client, worker):
    count = 2_000
    ids = [new_id() for _ in range(count)]
    members = [bound(client, task_id) for task_id in ids] + [bound(client, ids[0])]  # a duplicate id
    received_before = client.stats()['received']

    async def main() -> Tuple[List[Any], int]:
        # published in reverse order, from a thread, once the ticker ran: values must come back in member order
        ticker = Ticker(100, lambda: publish_soon(worker, client, [(t, {'i': i}) for i, t in reversed(
            list(enumerate(ids)))]))
        ticking = asyncio.ensure_future(ticker.run())
        values = await ResultSet(members, app=app).ajoin_native(timeout=BOUND - 10)
        ticker.running = False
        await ticking
        return values, ticker.ticks

    values, ticks = run(main())
    assert values == [{'i': i} for i in range(count)] + [{'i': 0}]
    assert ticks >= 100
    assert client.stats()['received'] - received_before == count


def test_aiter_native_yields_each_result_as_it_becomes_ready(app, client, worker):
    ids = [new_id() for _ in range(20)]
    done_before = new_id()
    publish(worker, client, [(done_before, 'before')])

    async def main() -> List[Tuple[str, Any]]:
        # lock step: result k+1 is published only after result k came out of the iterator,
        # so an iterator that waited for all of them would time out
        members = ResultSet([bound(client, done_before)] + [bound(client, task_id) for task_id in ids], app=app)
        got = []
        publish_soon(worker, client, [(ids[0], 0)])
        async for task_id, meta in members.aiter_native(timeout=30):
            got.append((task_id, meta['status'], meta['result']))
            if task_id in ids and len(got) <= len(ids):
                index = ids.index(task_id)
                if index + 1 < len(ids):
                    publish_soon(worker, client, [(ids[index + 1], index + 1)])
        return got

    got = run(main())
    assert [task_id for task_id, _, _ in got] == [done_before] + ids
    assert all(status == states.SUCCESS for _, status, _ in got)
    assert [value for _, _, value in got] == ['before'] + list(range(20))


def test_aclose_stops_an_aiter_native_early_and_removes_its_waiter(app, client, worker):
    first, never = new_id(), new_id()
    publish(worker, client, [(first, 'one')])

    async def main() -> Tuple[List[Any], List[int]]:
        members = ResultSet([bound(client, first), bound(client, never)], app=app)
        iterator = members.aiter_native(timeout=60)
        got = [await iterator.__anext__()]
        watched = await watched_waiters(client, 1)
        await iterator.aclose()
        with pytest.raises(StopAsyncIteration):
            await iterator.__anext__()
        return got, watched

    got, watched = run(main())
    assert [(task_id, meta['result']) for task_id, meta in got] == [(first, 'one')]
    assert_released(client, watched)


# -- timeouts and cancellation --------------------------------------------------------------------
def kinds(error: BaseException) -> Tuple[type, bool, bool]:
    return type(error), isinstance(error, builtins.TimeoutError), isinstance(error, asyncio.TimeoutError)


def test_timeout_raises_both_timeout_types_and_removes_the_waiter(app, client, worker):
    missing, present = new_id(), new_id()
    publish(worker, client, [(present, 'here')])

    async def main() -> Tuple[Any, ...]:
        watched: List[int] = []
        result = bound(client, missing)
        task = asyncio.ensure_future(result.aget(timeout=0.3))
        watched += await watched_waiters(client, 1)
        try:
            await task
        except BaseException as exc:  # checked below (the types only: a traceback holds the frames)
            error_one = kinds(exc)
        task = asyncio.ensure_future(
            ResultSet([bound(client, present), bound(client, missing)], app=app).ajoin_native(timeout=0.3))
        watched += await watched_waiters(client, 1)
        try:
            await task
        except BaseException as exc:
            error_join = kinds(exc)
        return watched, error_one, error_join

    watched, error_one, error_join = run(main())
    assert error_one == error_join == (TimeoutError, True, True)
    assert_released(client, watched)
    # the timeout did not forget the id: a reply that comes now (its results are collected, so it
    # waits in the early-arrival buffer) is kept for the next await
    publish(worker, client, [(missing, 'late')])
    assert run(bound(client, missing).aget(timeout=30)) == 'late'


def test_cancelling_an_await_removes_its_waiter(app, client, worker):
    ids = [new_id() for _ in range(5)]

    async def main() -> List[int]:
        single = asyncio.ensure_future(bound(client, ids[0]).aget())
        join = asyncio.ensure_future(ResultSet([bound(client, t) for t in ids[1:3]], app=app).ajoin_native())
        watched = await watched_waiters(client, 2)
        single.cancel()
        join.cancel()
        for task in (single, join):
            with pytest.raises(asyncio.CancelledError):
                await task
        # leaving an aiter_native early unwatches too
        iterator = ResultSet([bound(client, t) for t in ids[3:]], app=app).aiter_native(timeout=30)
        publish_soon(worker, client, [(ids[3], 'first')])
        async for task_id, meta in iterator:
            assert (task_id, meta['result']) == (ids[3], 'first')
            watched.append(client.stats()['aio_waits'])
            break
        del iterator
        return watched

    watched = run(main())
    assert watched == [2, 1]  # the two cancelled awaits, then the iterator's own wait
    assert_released(client, watched)
    publish(worker, client, [(ids[0], 'after-cancel')])
    assert run(bound(client, ids[0]).aget(timeout=30)) == 'after-cancel'


# -- many waiters ---------------------------------------------------------------------------------
def test_concurrent_awaits_and_sync_waiters_on_the_same_ids(app, client, worker):
    shared, other, only_sync = new_id(), new_id(), new_id()
    same_object = bound(client, shared)
    sync_calls = [Call(lambda tid=tid: bound(client, tid).get(timeout=40), name=f'sync-{n}')
                  for n, tid in enumerate([shared, shared, only_sync])]
    for call in sync_calls:
        call.start()

    async def main() -> Tuple[Any, ...]:
        awaits = ([asyncio.ensure_future(same_object.aget(timeout=40)) for _ in range(4)]
                  + [asyncio.ensure_future(bound(client, shared).aget(timeout=40)) for _ in range(4)])
        other_task = asyncio.ensure_future(bound(client, other).aget(timeout=40))
        await watched_waiters(client, 9)
        await publish_soon(worker, client, [(shared, 'shared'), (only_sync, 'sync')])
        values = await asyncio.gather(*awaits)
        await asyncio.sleep(0.05)
        other_still_waiting = not other_task.done()  # a reply for another id did not resolve it
        await publish_soon(worker, client, [(other, 'other')])
        return values, other_still_waiting, await other_task

    values, other_still_waiting, other_value = run(main())
    assert values == ['shared'] * 8
    assert other_still_waiting
    assert other_value == 'other'
    assert [call.result(timeout=40) for call in sync_calls] == ['shared', 'shared', 'sync']


def test_loops_in_several_threads_each_resolve_on_their_own(app, client, worker):
    shared = new_id()
    per_thread = {n: [new_id() for _ in range(50)] for n in range(3)}
    started = threading.Barrier(4, timeout=30)

    def in_thread(n: int) -> Tuple[Any, ...]:
        # tracked before anything is published: a reply for an id that nobody holds a tracked
        # result for any more (another thread's, already collected) is not kept
        members = ResultSet([bound(client, t) for t in per_thread[n]], app=app)
        mine = client.add_pending_result(bound(client, shared))

        async def main() -> Tuple[Any, ...]:
            loop = asyncio.get_running_loop()
            started.wait()
            values = await members.ajoin_native(timeout=40)
            value = await mine.aget(timeout=40)
            return values, value, asyncio.get_running_loop() is loop
        return run(main())

    calls = [Call(lambda n=n: in_thread(n), name=f'loop-{n}') for n in per_thread]
    for call in calls:
        call.start()
    started.wait()
    publish(worker, client, [(t, [n, i]) for n, ids in per_thread.items() for i, t in enumerate(ids)])
    publish(worker, client, [(shared, 'shared')])
    for n, call in enumerate(calls):
        values, value, same_loop = call.result(timeout=BOUND)
        assert values == [[n, i] for i in range(50)]
        assert value == 'shared'
        assert same_loop


# -- faults ---------------------------------------------------------------------------------------
@pytest.fixture
def proxied_client(broker_url: str) -> Iterator[Tuple[Any, TcpProxy]]:
    """A client backend whose broker connection goes through a TcpProxy of this test's own."""
    with TcpProxy.for_broker(broker_url) as proxy:
        application: App = make_app(proxy.url_for(broker_url), broker_heartbeat=0)
        try:
            application.backend.result_consumer.start()
            yield application.backend, proxy
        finally:
            application.close()


def test_connection_cut_during_an_await_still_delivers(proxied_client, worker):
    client, proxy = proxied_client
    ids = [new_id() for _ in range(300)]
    single = new_id()

    async def main() -> Tuple[Any, ...]:
        ping = new_id()
        publish_soon(worker, client, [(ping, 'ping')])
        assert await bound(client, ping).aget(timeout=30) == 'ping'  # consuming through the proxy
        base = client.stats()['received']
        one = asyncio.ensure_future(bound(client, single).aget(timeout=45))
        join = asyncio.ensure_future(ResultSet([bound(client, t) for t in ids]).ajoin_native(timeout=45))
        await watched_waiters(client, 2)
        await publish_soon(worker, client, [(t, i) for i, t in enumerate(ids[:100])])
        await until(lambda: client.stats()['received'] - base >= 100, 'the first 100 results to be read')
        assert proxy.stall() >= 1  # the link goes dead: the next results are held in flight, then lost
        await publish_soon(worker, client, [(t, i) for i, t in enumerate(ids[100:200], 100)])
        await until(proxy.held, 'results in flight on the dead link')
        assert proxy.cut() >= 1
        await publish_soon(worker, client, [(t, i) for i, t in enumerate(ids[200:], 200)])
        await publish_soon(worker, client, [(single, 'single')])
        return await one, await join

    value, values = run(main())
    assert value == 'single'
    assert values == list(range(300))
    assert client.stats()['reconnects'] >= 1
    assert proxy.accepted >= 2


# -- loops closed under an await, zero timeouts, fork ---------------------------------------------
def test_an_await_left_on_a_closed_loop_is_dropped_and_the_reader_thread_ends(client, worker):
    task_id = new_id()
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(bound(client, task_id).aget())
        loop.run_until_complete(asyncio.sleep(0.05))
        stats = client.stats()
        assert stats['aio_waits'] == 1 and stats['aio_reader'] == 1
    finally:
        loop.close()  # the task is never finished nor cancelled
    publish(worker, client, [(task_id, 'too late')])  # its wake-up finds the loop closed
    wait_until(lambda: client.stats()['aio_waits'] == 0, 10, 'the orphaned await to be dropped')
    assert client.stats()['waits'] == 0  # dropped: its waiter left the table
    wait_until(lambda: client.stats()['aio_reader'] == 0, 10, 'the asyncio reader thread to end')
    del task
    # the consumer still works for everyone else
    other = new_id()
    publish(worker, client, [(other, 7)])
    assert run(bound(client, other).aget(timeout=30)) == 7


def test_an_await_on_a_closed_loop_with_no_reply_coming_is_dropped_too(client):
    loop = asyncio.new_event_loop()
    try:
        loop.create_task(bound(client, new_id()).aget(timeout=None))
        loop.run_until_complete(asyncio.sleep(0.05))
        stats = client.stats()
        assert stats['aio_waits'] == 1 and stats['aio_reader'] == 1
    finally:
        loop.close()
    wait_until(lambda: client.stats()['aio_waits'] == 0, 10, 'the orphaned await to be dropped')
    wait_until(lambda: client.stats()['aio_reader'] == 0, 10, 'the asyncio reader thread to end')


def reply_in_socket(client: Any, worker: Any, task_id: str, value: Any) -> None:
    """Publish a reply and wait until it reached the client's socket (not read yet)."""
    publish(worker, client, [(task_id, value)])
    sock = client.result_consumer.connection.socket
    assert sock is not None
    assert wait_readable(sock, 10), 'the reply never reached the socket'


def test_zero_timeout_reads_what_the_socket_already_holds(app, client, worker):
    single, member, iterated = new_id(), new_id(), new_id()
    results = {task_id: bound(client, task_id) for task_id in (single, member, iterated)}
    for result in results.values():
        client.add_pending_result(result)

    async def main() -> Tuple[Any, ...]:
        reply_in_socket(client, worker, single, 'single')
        value = await results[single].aget(timeout=0)
        reply_in_socket(client, worker, member, 'member')
        values = await ResultSet([results[member]], app=app).ajoin_native(timeout=0)
        reply_in_socket(client, worker, iterated, 'iterated')
        got = [(task_id, meta['result'])
               async for task_id, meta in ResultSet([results[iterated]], app=app).aiter_native(timeout=0)]
        return value, values, got

    # not in debug mode: its slower loop would give a racing reader thread time to read first
    value, values, got = asyncio.run(asyncio.wait_for(main(), BOUND))
    assert value == 'single'
    assert values == ['member']
    assert got == [(iterated, 'iterated')]

    async def nothing_there() -> Any:
        return await bound(client, new_id()).aget(timeout=0)

    with pytest.raises(TimeoutError):
        run(nothing_there())


def test_an_await_in_a_forked_child_works(client, worker):
    """Forked while the parent's asyncio reader thread serves an await in progress (leading the
    read, it holds the reader election all but between read slices): the child's first await
    must not wedge on anything the parent's threads held at fork time; it gets its own reply on
    its own reply queue, and the parent's await is untouched."""
    parent_id = new_id()
    waiting = Call(lambda: run(bound(client, parent_id).aget(timeout=30)), name='parent-aget')
    waiting.start()
    wait_until(lambda: client.stats()['aio_waits'] == 1 and client.stats()['reading'] == 1, 10,
               "the parent's await to be read for")

    def child(report: Any) -> None:
        task_id = new_id()
        client.result_consumer.start()  # the child's own reply queue (a new oid)
        worker.mark_as_done(task_id, 'in the child', request=request_for(client, task_id))
        report['value'] = run(bound(client, task_id).aget(timeout=10), 20)
        report['parent_oid_reused'] = client.oid == parent_oid

    parent_oid = client.oid
    report, status = report_from_child(child, timeout=40)
    assert 'error' not in report, report.get('error')
    assert report['value'] == 'in the child'
    assert report['parent_oid_reused'] is False
    assert status is not None and os.waitstatus_to_exitcode(status) == 0
    # the parent's await is untouched by the fork
    publish(worker, client, [(parent_id, 'in the parent')])
    assert waiting.result(BOUND) == 'in the parent'
