"""The private RabbitMQ of the AMQP tests (tests/broker.py): it takes, counts and hands back
messages, keeps a durable queue's persistent messages across a stop and start, and leaves no
process behind."""

from __future__ import annotations

import os

import pika
import pytest

import broker as brokerlib


def test_publish_count_drain(broker):
    broker.declare("fixture-basic")
    broker.publish("fixture-basic", [b"one", "two", b"\xff three"], message_id="m", content_type="text/plain")
    assert broker.count("fixture-basic") == 3
    taken = broker.drain("fixture-basic")
    assert [body for body, _ in taken] == [b"one", b"two", b"\xff three"]
    assert all(p.delivery_mode == 2 and p.message_id == "m" and p.content_type == "text/plain" for _, p in taken)
    assert broker.count("fixture-basic") == 0
    assert broker.drain("fixture-basic") == []


def test_publish_to_a_missing_queue_is_unroutable(broker):
    with pytest.raises(pika.exceptions.UnroutableError):
        broker.publish("fixture-no-such-queue", [b"lost"])


def test_dead_letter_queue(broker):
    broker.declare_exchange("fixture-dlx")
    broker.declare("fixture-dead")
    broker.bind("fixture-dead", "fixture-dlx")
    broker.declare("fixture-work", dead_letter_exchange="fixture-dlx")
    broker.publish("fixture-work", [b"poison"])
    with broker.connection() as conn:
        channel = conn.channel()
        method, _, body = channel.basic_get("fixture-work")
        assert body == b"poison"
        channel.basic_reject(method.delivery_tag, requeue=False)
    assert [body for body, _ in broker.drain("fixture-dead")] == [b"poison"]
    assert broker.count("fixture-work") == 0


@pytest.mark.slow  # stops and starts a broker: seconds each
def test_stop_and_start_keep_persistent_messages_of_a_durable_queue(broker):
    broker.declare("fixture-durable")
    broker.publish("fixture-durable", [b"kept-1", b"kept-2"])
    broker.publish("fixture-durable", [b"transient"], delivery_mode=1)
    port, beam = broker.port, broker.beam_pid()
    broker.stop()
    assert not broker.running()
    assert not os.path.exists(f"/proc/{beam}")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(broker.url + "?connection_attempts=1"))
    broker.start()
    assert broker.port == port and broker.beam_pid() != beam
    assert [body for body, _ in broker.drain("fixture-durable")] == [b"kept-1", b"kept-2"]


@pytest.mark.slow  # stops and starts a broker: seconds each
def test_close_ends_every_process_it_caused_and_removes_the_data():
    brokerlib.need()
    node = brokerlib.Broker()
    try:
        node.start()
        beam, epmd = node.beam_pid(), node.epmd.pid
        assert node._marked(), "the broker's processes carry the marker"
    finally:
        node.close()
    assert node._marked() == []
    for pid in (beam, epmd):
        assert not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z"
    assert not node.dir.exists()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
