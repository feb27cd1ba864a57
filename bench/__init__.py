"""Benchmarks of rpcresults against Celery's ``rpc://`` backend, raw py-amqp, aio-pika and C peers.

``python -m bench`` (or ``python bench/run.py``) runs the performance targets P1-P7, prints one
table per target and writes a bar chart (SVG); ``pytest bench/ --benchmark-only`` runs the
pytest-benchmark cases. Every peer of the plain runner runs in its own subprocess
(``bench.peers``), so the compiled / pure choice is made cleanly by the environment and memory
figures are not shared.
"""
