"""``AsyncResult.revoke`` / ``ResultSet.revoke``: Celery's control broadcast, checked on the wire
against Celery's own ``control.revoke`` and against a real ``celery worker -P solo`` that skips the
revoked task and reports REVOKED to our reply queue.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

from rpcresults import App, AsyncResult, ResultSet
from rpcresults.exceptions import TaskRevokedError
from tests.celery_tasks import TASK_ECHO, TASK_TOUCH, TASK_WAIT_FOR_FILE, make_client
from tests.celery_worker import CeleryWorker, worker_fixture
from tests.helpers import raw_connection, wait_until

pytestmark = pytest.mark.celery

TIMEOUT = 30.0
PIDBOX_EXCHANGE = 'celery.pidbox'

solo_worker = worker_fixture(backend='rpc://')


@pytest.fixture
def pidbox_tap(broker_url: str) -> Iterator[Callable[[str], Dict[str, Any]]]:
    """Our own queue on Celery's control exchange: ``tap(task_id)`` is the next revoke naming it."""
    conn = raw_connection(broker_url)
    channel = conn.channel()
    channel.exchange_declare(PIDBOX_EXCHANGE, 'fanout', durable=False, auto_delete=False)  # as kombu's Mailbox
    queue, _, _ = channel.queue_declare('', exclusive=True)
    channel.queue_bind(queue, PIDBOX_EXCHANGE)

    def tap(task_id: str) -> Dict[str, Any]:
        def next_match() -> Any:
            while True:
                message = channel.basic_get(queue, no_ack=True)
                if message is None:
                    return None
                body = json.loads(message.body)
                named = body.get('arguments', {}).get('task_id')
                if body.get('method') == 'revoke' and task_id in (named if isinstance(named, list) else [named]):
                    return {'body': body, 'headers': dict(message.headers or {}),
                            'content_type': message.properties.get('content_type')}
        return wait_until(next_match, timeout=TIMEOUT, what=f'the revoke of {task_id}', interval=0.02)

    yield tap
    conn.close()


def _comparable(captured: Dict[str, Any]) -> Dict[str, Any]:
    headers = dict(captured['headers'])
    assert isinstance(headers.pop('clock'), int)
    assert headers.pop('expires') > 0
    return {'body': captured['body'], 'headers': headers, 'content_type': captured['content_type']}


@pytest.mark.parametrize('options', [{}, {'terminate': True, 'signal': 'SIGKILL'}])
def test_revoke_broadcast_is_celerys(app: App, broker_url: str, pidbox_tap: Any, options: Dict[str, Any]) -> None:
    celery_app = make_client(broker_url=broker_url)
    try:
        ours_id, theirs_id = str(uuid.uuid4()), str(uuid.uuid4())
        AsyncResult(ours_id, app=app).revoke(**options)
        celery_app.control.revoke(theirs_id, **options)
        ours, theirs = _comparable(pidbox_tap(ours_id)), _comparable(pidbox_tap(theirs_id))
        theirs['body']['arguments']['task_id'] = ours_id
        assert ours == theirs

        ids: List[str] = [str(uuid.uuid4()) for _ in range(3)]
        ResultSet([AsyncResult(i, app=app) for i in ids]).revoke(**options)
        celery_app.control.revoke(list(reversed(ids)), **options)
        ours, theirs = _comparable(pidbox_tap(ids[0])), _comparable(pidbox_tap(ids[-1]))
        assert ours['body']['arguments']['task_id'] == ids
        theirs['body']['arguments']['task_id'] = ids
        assert ours == theirs
    finally:
        celery_app.close()


def _pidbox_ready(channel: Any, queue: str) -> int:
    return channel.queue_declare(queue=queue, passive=True)[1]


def test_worker_skips_a_revoked_task_and_reports_revoked(app: App, solo_worker: CeleryWorker,
                                                         tmp_path: Path) -> None:
    client = app.backend
    client.result_consumer.start()  # our reply queue exists before the worker answers to it
    started, gate, marker, after = (str(tmp_path / name) for name in ('started', 'gate', 'marker', 'after'))
    sender = make_client(queue=solo_worker.queue)
    try:
        # the solo worker blocks on this one; acked late with prefetch 1, what follows stays queued
        blocker = sender.send_task(TASK_WAIT_FOR_FILE, (started, gate, TIMEOUT), reply_to=client.oid)
        wait_until(lambda: Path(started).exists(), timeout=TIMEOUT,
                   what=f'the blocking task to start; worker log:\n{solo_worker.log()}')
        victim_id = sender.send_task(TASK_TOUCH, (marker,), reply_to=client.oid).id
        follower_id = sender.send_task(TASK_TOUCH, (after,), reply_to=client.oid).id

        with app.connection() as conn:
            AsyncResult(victim_id, app=app).revoke(connection=conn)
            # same channel as the broadcast: the count includes it until the worker has it
            pidbox = f'{solo_worker.hostname}.celery.pidbox'
            wait_until(lambda: _pidbox_ready(conn.default_channel, pidbox) == 0, timeout=TIMEOUT,
                       what='the worker to receive the revoke')
        Path(gate).touch()

        assert AsyncResult(blocker.id, app=app).get(timeout=TIMEOUT) is True
        victim = AsyncResult(victim_id, app=app)
        with pytest.raises(Exception) as raised:
            victim.get(timeout=TIMEOUT)
        # the worker's exception, rebuilt: Celery's class where celery is importable, else ours
        assert type(raised.value).__name__ == TaskRevokedError.__name__, repr(raised.value)
        assert victim.state == 'REVOKED'
        assert AsyncResult(follower_id, app=app).get(timeout=TIMEOUT) == after  # the worker went on
        assert not Path(marker).exists(), f'the revoked task ran; worker log:\n{solo_worker.log()}'
        assert Path(after).exists()
    finally:
        Path(gate).touch()  # never leave the worker blocked
        sender.close()


def test_revoke_before_sending_with_terminate(app: App, solo_worker: CeleryWorker, tmp_path: Path) -> None:
    """``terminate=True`` for a task not yet started is a plain revoke: it never runs."""
    client = app.backend
    client.result_consumer.start()
    marker = tmp_path / 'marker'
    victim_id = str(uuid.uuid4())
    with app.connection() as conn:
        ResultSet([AsyncResult(victim_id, app=app)]).revoke(connection=conn, terminate=True, signal='SIGKILL')
        pidbox = f'{solo_worker.hostname}.celery.pidbox'
        wait_until(lambda: _pidbox_ready(conn.default_channel, pidbox) == 0, timeout=TIMEOUT,
                   what='the worker to receive the revoke')
    sender = make_client(queue=solo_worker.queue)
    try:
        # the worker handles its control queue between tasks: this echo proves the revoke was seen
        echo = sender.send_task(TASK_ECHO, ('sync',), reply_to=client.oid)
        assert AsyncResult(echo.id, app=app).get(timeout=TIMEOUT) == 'sync'
        sender.send_task(TASK_TOUCH, (str(marker),), task_id=victim_id, reply_to=client.oid)
        victim = AsyncResult(victim_id, app=app)
        assert victim.get(timeout=TIMEOUT, propagate=False) is not None
        assert victim.state == 'REVOKED'
        assert not marker.exists(), f'the revoked task ran; worker log:\n{solo_worker.log()}'
    finally:
        sender.close()
