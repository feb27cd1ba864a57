"""asyncio: awaiting results without blocking the loop.

``await result`` (or ``await result.aget(timeout=...)``), ``await resultset.ajoin_native()``
and ``async for task_id, meta in resultset.aiter_native()`` wait through the same wait
core as their blocking twins (:mod:`rpcresults.engine.wait`), driven by
:class:`~rpcresults.engine.asyncio_driver.AsyncDriver`. Cancelling or timing out an
await removes its waiter; timeouts raise :class:`rpcresults.exceptions.TimeoutError`,
which is also an ``asyncio.TimeoutError``.
"""
from __future__ import annotations

from .resultset import NativeIterator

__all__ = ('NativeIterator',)
