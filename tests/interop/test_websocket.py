"""MQTT over WebSocket with paho-mqtt's `transport="websockets"`.

The broker fixture starts Tern with `--ws-bind 127.0.0.1:0`; the WebSocket
port comes from its "MQTT/WebSocket listener ready addr=... path=..." line.
"""

import queue
import re
import time

import pytest

from conftest import WAIT, mqtt

WS_READY_RE = re.compile(r"MQTT/WebSocket listener ready addr=([0-9.]+):(\d+) path=(\S+)")


def ws_endpoint(broker):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for line in list(broker.log_lines):
            m = WS_READY_RE.search(line)
            if m:
                return m.group(1), int(m.group(2)), m.group(3)
        time.sleep(0.02)
    pytest.fail("no WebSocket listener line in the broker log:\n" + broker.log())


class WsPaho:
    """A paho client over WebSocket with queues for its events."""

    def __init__(self, broker, client_id, protocol=mqtt.MQTTv311, will=None, clean=True):
        self.host, self.port, self.path = ws_endpoint(broker)
        kwargs = dict(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                      client_id=client_id, protocol=protocol, transport="websockets",
                      reconnect_on_failure=False)
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(**kwargs)
        self.c.ws_set_options(path=self.path)
        self.protocol = protocol
        self.connacks = queue.Queue()
        self.messages = queue.Queue()
        self.subacks = queue.Queue()
        self.pubacks = queue.Queue()
        self.c.on_connect = lambda c, u, flags, rc, props: self.connacks.put((flags, rc))
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.c.on_publish = lambda c, u, mid, rc, props: self.pubacks.put(mid)
        if will is not None:
            self.c.will_set(**will)
        self.started = False

    def connect(self):
        self.c.connect(self.host, self.port, keepalive=30)
        self.c.loop_start()
        self.started = True
        flags, rc = self.connacks.get(timeout=WAIT)
        assert not rc.is_failure, f"CONNACK refused: {rc}"
        return flags

    def subscribe(self, topic, qos=0):
        self.c.subscribe(topic, qos)
        return self.subacks.get(timeout=WAIT)

    def publish(self, topic, payload, qos=0):
        info = self.c.publish(topic, payload, qos=qos)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        if qos:
            info.wait_for_publish(WAIT)
            assert info.is_published()

    def get(self):
        try:
            return self.messages.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no message within {WAIT}s")

    def close(self):
        try:
            self.c.disconnect()
        except Exception:
            pass
        if self.started:
            self.c.loop_stop()
            self.started = False


@pytest.fixture
def ws_paho(broker):
    clients = []

    def make(client_id, **kw):
        c = WsPaho(broker, client_id, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv31, mqtt.MQTTv311, mqtt.MQTTv5],
                         ids=["3.1", "3.1.1", "5.0"])
def test_websocket_pubsub_with_tcp_client(broker, ws_paho, paho, protocol):
    ws = ws_paho("ws-client", protocol=protocol)
    ws.connect()
    ws.subscribe("mix/#", qos=1)
    tcp = paho("tcp-client", protocol=mqtt.MQTTv311)
    tcp.subscribe("mix/from-ws", qos=1)

    tcp.publish("mix/from-tcp", b"over tcp", qos=1)
    m = ws.get()
    assert (m.topic, m.payload, m.qos) == ("mix/from-tcp", b"over tcp", 1)

    payload = bytes(range(256)) * 300  # 76,800 bytes: 64-bit WebSocket length
    ws.publish("mix/from-ws", payload, qos=1)
    m = tcp.get()
    assert (m.topic, m.payload) == ("mix/from-ws", payload)
    m = ws.get()  # its own message, through its own subscription
    assert m.payload == payload


def test_websocket_will_on_abrupt_close(broker, ws_paho, paho):
    watcher = paho("watcher")
    watcher.subscribe("wills/#", qos=1)
    ws = ws_paho("ws-doomed", will=dict(topic="wills/ws-doomed", payload=b"gone", qos=1))
    ws.connect()
    # Close the socket under the WebSocket: no close frame, no DISCONNECT.
    sock = ws.c.socket()
    ws.c.loop_stop()
    ws.started = False
    sock.close()
    m = watcher.get()
    assert (m.topic, m.payload) == ("wills/ws-doomed", b"gone")


def test_websocket_takes_over_tcp_session(broker, ws_paho, paho):
    tcp = paho("roamer", clean=False)
    tcp.subscribe("roam/#", qos=1)
    ws = ws_paho("roamer", clean=False)
    flags = ws.connect()
    assert flags.session_present
    tcp.wait_disconnect()
    publisher = paho("publisher")
    publisher.publish("roam/x", b"follow", qos=1)
    assert ws.get().payload == b"follow"
