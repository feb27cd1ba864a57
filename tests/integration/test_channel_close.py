"""The broker closing the reply channel: the consumer reconnects, nothing is lost (issue 4).

py-amqp answers a ``channel.close`` by re-opening the channel with a synchronous
read of its own, which would skip bytes our frame parser already holds; the fast
reader therefore never hands it that frame and recovers the connection instead.
"""
from __future__ import annotations

import struct

import pytest

from rpcresults import ResultSet
from rpcresults._consume import ChannelClosedByBroker

from ..conftest import new_id, request_for
from tests.helpers import bound


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
    assert consumer._replies.fast == (read_mode == 'fast-read')
    before = [bound(client, new_id()) for _ in range(200)]
    for result in before:
        worker.store_result(result.id, result.id[:8], 'SUCCESS', request=request_for(client, result.id))
    # acking a tag the broker never sent is a channel error: the broker closes the channel (406)
    consumer._replies.channel.basic_ack(10 ** 9)
    after = [bound(client, new_id()) for _ in range(200)]
    for result in after:
        worker.store_result(result.id, result.id[:8], 'SUCCESS', request=request_for(client, result.id))
    everything = before + after
    values = ResultSet(everything, app=client.app).join_native(timeout=30)
    assert values == [result.id[:8] for result in everything]
    stats = client.stats()
    assert stats['reconnects'] >= 1


def test_fast_reader_never_lets_py_amqp_revive_the_channel(client, worker, monkeypatch):
    monkeypatch.delenv('RPCRESULTS_NO_FAST_READ', raising=False)
    consumer = client.result_consumer
    consumer.start()
    replies = consumer._replies
    assert replies.fast
    channel = replies.channel
    transport = replies._transport
    sent = []
    monkeypatch.setattr(channel, 'send_method', lambda *a, **k: sent.append(a))
    # a channel.close followed by the first bytes of another frame, all in one read
    transport._read_buffer = channel_close_frame(channel.channel_id, 406, 'PRECONDITION_FAILED') + b'\x08\x00'
    with pytest.raises(ChannelClosedByBroker) as info:
        replies.read(consumer._connection, 1.0)
    assert info.value.reply_code == 406 and 'PRECONDITION_FAILED' in info.value.reply_text
    assert sent == []  # py-amqp neither answered nor re-opened the channel
    monkeypatch.undo()
    consumer._recover(info.value)  # what _drain_once does with it
    result = bound(client, new_id())
    worker.store_result(result.id, 'after', 'SUCCESS', request=request_for(client, result.id))
    assert result.get(timeout=15) == 'after'
    assert client.stats()['reconnects'] == 1
