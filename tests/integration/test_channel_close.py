"""The broker closing the reply channel: the consumer reconnects, nothing is lost.

py-amqp answers a ``channel.close`` by re-opening the channel with a synchronous
read of its own, which would skip bytes our frame parser already holds; the fast
reader therefore never hands it that frame and recovers the connection instead.
"""
from __future__ import annotations

import logging
import struct

import pytest

from rpcresults import ResultSet
from rpcresults.engine.channel import ChannelClosedByBroker

from ..conftest import new_id, request_for
from tests.helpers import bound

pytestmark = pytest.mark.twins  # the frame parser of the selected twin reads the close


def channel_close_frame(channel_id: int, code: int, text: str) -> bytes:
    reason = text.encode()
    payload = struct.pack('>HHHB', 20, 40, code, len(reason)) + reason + struct.pack('>HH', 60, 80)
    return struct.pack('>BHI', 1, channel_id, len(payload)) + payload + b'\xce'


@pytest.fixture(params=['fast-read', 'py-amqp-read'])
def read_mode(request, monkeypatch):
    if request.param == 'py-amqp-read':
        monkeypatch.setenv('RPCRESULTS_NO_FAST_READ', '1')
    else:
        monkeypatch.delenv('RPCRESULTS_NO_FAST_READ', raising=False)
    return request.param


def test_broker_closing_the_reply_channel_loses_nothing(read_mode, client, worker):
    consumer = client.result_consumer
    consumer.start()
    assert client.stats()['fast_read'] == (read_mode == 'fast-read')
    before = [bound(client, new_id()) for _ in range(200)]
    for result in before:
        worker.store_result(result.id, result.id[:8], 'SUCCESS', request=request_for(client, result.id))
    # acking a tag the broker never sent is a channel error: the broker closes the channel (406)
    consumer.connection.channel.basic_ack(10 ** 9)
    after = [bound(client, new_id()) for _ in range(200)]
    for result in after:
        worker.store_result(result.id, result.id[:8], 'SUCCESS', request=request_for(client, result.id))
    everything = before + after
    values = ResultSet(everything, app=client.app).join_native(timeout=30)
    assert values == [result.id[:8] for result in everything]
    stats = client.stats()
    assert stats['reconnects'] >= 1


def test_fast_reader_never_lets_py_amqp_revive_the_channel(client, worker, monkeypatch, caplog):
    monkeypatch.delenv('RPCRESULTS_NO_FAST_READ', raising=False)
    consumer = client.result_consumer
    consumer.start()
    assert client.stats()['fast_read'] == 1
    channel = consumer.connection.channel
    transport = channel.connection.transport  # py-amqp's: where its read-ahead bytes wait
    sent = []
    monkeypatch.setattr(channel, 'send_method', lambda *a, **k: sent.append(a))
    # a channel.close followed by the first bytes of another frame, all in one read
    transport._read_buffer = channel_close_frame(channel.channel_id, 406, 'PRECONDITION_FAILED') + b'\x08\x00'
    with caplog.at_level(logging.WARNING, logger='rpcresults.engine.connection'):
        consumer.drain_events(1.0)  # the read meets the close: the consumer recovers the connection
    errors = [arg for record in caplog.records if record.name == 'rpcresults.engine.connection'
              for arg in (record.args if isinstance(record.args, tuple) else ())
              if isinstance(arg, ChannelClosedByBroker)]
    assert len(errors) == 1, 'the close must end the read as ChannelClosedByBroker, and be recovered from'
    assert errors[0].reply_code == 406 and 'PRECONDITION_FAILED' in errors[0].reply_text
    assert sent == []  # py-amqp neither answered nor re-opened the channel
    monkeypatch.undo()
    assert consumer.connection.channel is not channel  # consuming on a new connection
    result = bound(client, new_id())
    worker.store_result(result.id, 'after', 'SUCCESS', request=request_for(client, result.id))
    assert result.get(timeout=15) == 'after'
    assert client.stats()['reconnects'] == 1
