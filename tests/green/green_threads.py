"""Run in a subprocess by tests/integration/test_green_drainers.py: monkey-patch with gevent or
eventlet but keep real OS threads, wait from green threads of two OS threads (two hubs) on the
real broker, print a JSON report.

    python -m tests.green.green_threads gevent|eventlet BROKER_URL
"""
from __future__ import annotations

from tests.green import green_lib

LIBRARY = green_lib.patch(threads=False)

import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from typing import Any, Dict  # noqa: E402

from rpcresults import App, AsyncResult  # noqa: E402
from tests.green.green_lib import Ticker, outcome, spawn, wait_for  # noqa: E402


def main() -> Dict[str, Any]:
    app = App(sys.argv[2], result_reply_queue_expires=60)
    client = app.backend
    worker = app.create_backend()
    drainer = client.result_consumer.drainer
    client.result_consumer.start()  # the socket belongs to this (the main) thread's hub
    report: Dict[str, Any] = {'drainer': type(drainer).__name__}

    def publish(task_id: str, value: Any) -> None:
        worker.mark_as_done(task_id, value, request={'reply_to': client.oid, 'correlation_id': task_id})

    def result(task_id: str) -> AsyncResult:
        return AsyncResult(task_id, backend=client, app=app)

    # another OS thread waits first: its hub runs the reader
    first, second, third = (str(uuid.uuid4()) for _ in range(3))
    in_thread: Dict[str, Any] = {}

    def thread_body() -> None:
        try:
            in_thread['value'] = result(first).get(timeout=20)
        except Exception as exc:  # reported
            in_thread['value'] = repr(exc)

    thread = threading.Thread(target=thread_body, daemon=True)
    thread.start()
    # that wait started the one reader there is (on that thread's hub) and waits through it
    report['reader_in_thread'] = wait_for(lambda: drainer.waiting == 1 and drainer.readers_started == 1, 10)
    # green threads of this thread wait too, while the ticker of this hub keeps running
    ticker = Ticker()
    here = spawn(lambda: result(second).get(timeout=20))
    green_lib.sleep(0.3)
    report['ticked_while_waiting'] = ticker.ticked_on(50, 10)
    publish(second, 'second')
    report['main_got'] = outcome(here, 25)
    publish(first, 'first')
    thread.join(25)
    report['thread_got'] = in_thread.get('value')
    report['thread_ended'] = not thread.is_alive()
    # the thread (and the hub its reader lived on) is gone: later waits still work
    publish(third, 'third')
    try:
        report['later_got'] = result(third).get(timeout=10)
    except Exception as exc:  # reported
        report['later_got'] = repr(exc)
    report['readers_started'] = drainer.readers_started
    ticker.stop()
    worker.close()
    app.close()
    return report


if __name__ == '__main__':
    print('REPORT ' + json.dumps(main()), flush=True)
