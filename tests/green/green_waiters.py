"""Run in a subprocess by tests/integration/test_green_drainers.py: monkey-patch with gevent or
eventlet, wait on results from many green threads on the real broker, print a JSON report.

    python -m tests.green.green_waiters gevent|eventlet BROKER_URL [N]
"""
from __future__ import annotations

from tests.green import green_lib

LIBRARY = green_lib.patch()

import json  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from typing import Any, Dict, List  # noqa: E402

import rpcresults.protocol  # noqa: E402
from rpcresults import App, AsyncResult  # noqa: E402
from rpcresults.backends.asynchronous import detect_environment  # noqa: E402
from rpcresults.exceptions import TimeoutError  # noqa: E402
from tests.green.green_lib import Ticker, join_all, spawn, wait_for  # noqa: E402


def main() -> Dict[str, Any]:
    broker_url = sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    app = App(broker_url, result_reply_queue_expires=60)
    client = app.backend
    worker = app.create_backend()
    consumer = client.result_consumer
    drainer = consumer.drainer
    report: Dict[str, Any] = {'library': LIBRARY, 'environment': detect_environment(),
                              'drainer': type(drainer).__name__, 'table': type(consumer.table).__module__,
                              'using_extension': rpcresults.protocol.USING_EXTENSION}
    consumer.start()
    ids = [str(uuid.uuid4()) for _ in range(count)]
    got: Dict[str, Any] = {}
    errors: List[str] = []

    def waiter(task_id: str) -> None:
        try:
            got[task_id] = AsyncResult(task_id, backend=client, app=app).get(timeout=30)
        except Exception as exc:  # reported
            errors.append(repr(exc))

    ticker = Ticker()
    threads = [spawn(lambda tid=tid: waiter(tid)) for tid in ids]
    report['all_waiting'] = wait_for(lambda: getattr(drainer, 'waiting', 0) == count, 30)
    # the green threads block only themselves: the ticker keeps running while they wait
    report['ticked_while_waiting'] = ticker.ticked_on(50, 30)
    for index, task_id in reversed(list(enumerate(ids))):
        worker.mark_as_done(task_id, {'index': index}, request={'reply_to': client.oid, 'correlation_id': task_id})
    report['joined'] = join_all(threads, 60)
    report['values_ok'] = [got.get(tid) for tid in ids] == [{'index': i} for i in range(count)]
    report['errors'] = errors
    report['received'] = len(got)

    # a timeout raises and leaves nothing behind; the reader ends when nobody waits
    try:
        AsyncResult(str(uuid.uuid4()), backend=client, app=app).get(timeout=0.2)
        report['timeout'] = 'no error'
    except TimeoutError as exc:
        report['timeout'] = type(exc).__name__
    report['waiting_after'] = getattr(drainer, 'waiting', None)
    readers_started = getattr(drainer, 'readers_started', None)
    report['readers_started'] = readers_started

    def replaced() -> bool:
        """Whether a new wait starts a new reader: only once the last one has ended (a wait joins a live one)."""
        try:
            AsyncResult(str(uuid.uuid4()), backend=client, app=app).get(timeout=0)
        except TimeoutError:
            pass
        return getattr(drainer, 'readers_started', 0) > (readers_started or 0)

    report['reader_ended'] = readers_started is not None and wait_for(replaced, 10)
    ticker.stop()
    worker.close()
    app.close()
    return report


if __name__ == '__main__':
    print('REPORT ' + json.dumps(main()), flush=True)
