"""Result objects, under Celery's module name: ``AsyncResult``, ``EagerResult``, ``ResultSet``, ``GroupResult``."""
from __future__ import annotations

from .asyncresult import AsyncResult, EagerResult, ResultBase, result_from_tuple
from .graph import DependencyGraph
from .resultset import GroupResult, NativeIterator, ResultSet

__all__ = ('ResultBase', 'AsyncResult', 'EagerResult', 'ResultSet', 'GroupResult', 'result_from_tuple',
           'DependencyGraph', 'NativeIterator')
