"""Integrations with other libraries (imported on demand: each needs its own extra).

``rpcresults.contrib.celery``: a drop-in result backend for Celery apps
(``result_backend = "rpcresults.contrib.celery:RPCBackend"``).
"""
