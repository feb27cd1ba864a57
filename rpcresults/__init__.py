"""rpcresults: the result side of RPC over AMQP, wire-compatible with Celery's ``rpc://`` backend."""
from __future__ import annotations

from . import exceptions, states
from .protocol import USING_EXTENSION
from .app import App, default_app
from .exceptions import (BacklogLimitExceeded, ImproperlyConfigured, ReplyQueueLost, ResultBackendClosed,
                         ResultEvicted, ResultNotDelivered, SecurityError, TimeoutError)
from .result import AsyncResult, EagerResult, GroupResult, ResultSet, result_from_tuple
from .client import Client
from .responder import BadRequest, Request, Responder

__version__ = '0.1.0'

__all__ = (
    'App', 'default_app', 'AsyncResult', 'EagerResult', 'ResultSet', 'GroupResult',
    'result_from_tuple', 'states', 'exceptions', 'USING_EXTENSION', 'TimeoutError',
    'BacklogLimitExceeded', 'SecurityError', 'ReplyQueueLost', 'ResultEvicted', 'ImproperlyConfigured',
    'ResultNotDelivered', 'ResultBackendClosed',
    'Client', 'Responder', 'Request', 'BadRequest', '__version__',
)
