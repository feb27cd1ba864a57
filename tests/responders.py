"""A Responder answering in a thread of the test's own, for tests that need a live request side."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from rpcresults import App, Responder
from tests.helpers import Call

#: How long a responder's run() may keep going after stop() before the test fails.
STOP_TIMEOUT = 30.0


class ServedResponder:
    """``Responder(app, queue, fn, **options)`` running in a thread until :meth:`close`.

    The queue expires a minute after its last use unless ``expires`` says otherwise
    (``expires=None``: a plain queue, as Celery declares it)."""

    def __init__(self, app: Optional[App], queue: str, fn: Any, *, expires: Optional[float] = 60,
                 **options: Any) -> None:
        self.responder = Responder(app, queue, fn, expires=expires, **options).start()
        self.thread = Call(lambda: self.responder.run(timeout=120), name='responder')
        self.thread.start()

    def close(self) -> Optional[BaseException]:
        """Stop and close the responder; what its run() raised, or None."""
        self.responder.stop()
        _, error = self.thread.outcome(STOP_TIMEOUT)
        self.responder.close()
        return error


@contextmanager
def serving(app: Optional[App], queue: str, fn: Any, **options: Any) -> Iterator[ServedResponder]:
    """A :class:`ServedResponder` for the ``with`` block; on a clean exit, fails if its run() raised."""
    served = ServedResponder(app, queue, fn, **options)
    try:
        yield served
    finally:
        error = served.close()
    assert error is None, f'the responder stopped with {error!r}'
