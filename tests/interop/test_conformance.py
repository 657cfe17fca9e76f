"""Conformance checks modelled on the behaviours the Eclipse Paho interoperability
suites (paho.mqtt.testing: interoperability/client_test.py for MQTT 3.1.1 and
client_test5.py for MQTT 5) expect of a broker.

The code here is our own: paho-mqtt 2.x's public API where it can express the
case, raw sockets where it cannot (no PINGREQ, withheld acknowledgements, a
second CONNECT, a wrong protocol name, invalid filters that paho refuses
locally). Each test names the paho-suite test it mirrors. Timings are scaled
down (keep alive 1 s instead of 5 s, shorter expiries) so the file runs fast;
every wait is bounded.
"""

import socket
import time

import pytest

from conftest import (QUIET, WAIT, PacketTypes, SubscribeOptions, connect_packet_5,
                      connect_packet_311, connect_props, encode_varint, mqtt, mqtt_str, packet,
                      publish_props, v5_props)

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5

# The topic sets of the paho suites.
TOPICS = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
WILDTOPICS = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")


def cfg(limits: str) -> str:
    return '[listeners]\ntcp = ["127.0.0.1:0"]\n[limits]\n' + limits + "\n"


# --------------------------------------------------------------------------
# Raw MQTT helpers (our own encoding, used where paho cannot express a case)
# --------------------------------------------------------------------------

def p_u16(pid, v):
    return bytes([pid]) + v.to_bytes(2, "big")


def p_u32(pid, v):
    return bytes([pid]) + v.to_bytes(4, "big")


def p_pair(pid, k, v):
    return bytes([pid]) + mqtt_str(k) + mqtt_str(v)


def props(*items) -> bytes:
    body = b"".join(items)
    return encode_varint(len(body)) + body


_FIXED = {0x01: 1, 0x17: 1, 0x19: 1, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1,
          0x13: 2, 0x21: 2, 0x22: 2, 0x23: 2,
          0x02: 4, 0x11: 4, 0x18: 4, 0x27: 4}
_STRINGS = {0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F}


def read_varint(data, i):
    mult, value = 1, 0
    while True:
        b = data[i]
        i += 1
        value += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            return value, i


def decode_props(data, i):
    """Returns ({id: [values]}, index after the properties)."""
    length, i = read_varint(data, i)
    end = i + length
    out = {}
    while i < end:
        pid = data[i]
        i += 1
        if pid in _FIXED:
            n = _FIXED[pid]
            val = int.from_bytes(data[i:i + n], "big")
            i += n
        elif pid == 0x0B:
            val, i = read_varint(data, i)
        elif pid in _STRINGS:
            n = int.from_bytes(data[i:i + 2], "big")
            val = bytes(data[i + 2:i + 2 + n])
            i += 2 + n
        elif pid == 0x26:
            n = int.from_bytes(data[i:i + 2], "big")
            k = bytes(data[i + 2:i + 2 + n])
            i += 2 + n
            n = int.from_bytes(data[i:i + 2], "big")
            v = bytes(data[i + 2:i + 2 + n])
            i += 2 + n
            val = (k, v)
        else:
            raise AssertionError(f"unknown property id {pid:#x}")
        out.setdefault(pid, []).append(val)
    return out, end


def parse_publish(first, body, v5):
    qos = (first >> 1) & 3
    n = int.from_bytes(body[0:2], "big")
    topic = bytes(body[2:2 + n])
    i = 2 + n
    pid = None
    if qos:
        pid = int.from_bytes(body[i:i + 2], "big")
        i += 2
    pr = {}
    if v5:
        pr, i = decode_props(body, i)
    return dict(topic=topic, qos=qos, dup=bool(first & 0x08), retain=bool(first & 1),
                pid=pid, props=pr, payload=bytes(body[i:]))


def publish_packet(topic, payload=b"", qos=0, pid=None, v5=False, prop_bytes=b"\x00",
                   retain=False, dup=False):
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = mqtt_str(topic)
    if qos:
        body += pid.to_bytes(2, "big")
    if v5:
        body += prop_bytes
    return packet(first, body + payload)


def ack_packet(first, pid, v5=False):
    # v5 allows the reason code and properties to be omitted when 0x00 / none.
    return packet(first, pid.to_bytes(2, "big"))


def subscribe_packet(pid, filters, v5=False, prop_bytes=b"\x00"):
    body = pid.to_bytes(2, "big") + (prop_bytes if v5 else b"")
    for f, opts in filters:
        body += mqtt_str(f) + bytes([opts])
    return packet(0x82, body)


def connect_with_will(client_id, will_topic, will_payload, v5=False, keepalive=30, clean=True,
                      will_qos=0, connect_prop_bytes=b"\x00", will_prop_bytes=b"\x00"):
    flags = (0x02 if clean else 0) | 0x04 | (will_qos << 3)
    body = mqtt_str("MQTT") + bytes([5 if v5 else 4, flags]) + keepalive.to_bytes(2, "big")
    if v5:
        body += connect_prop_bytes
    body += mqtt_str(client_id)
    if v5:
        body += will_prop_bytes
    body += mqtt_str(will_topic) + mqtt_str(will_payload)
    return packet(0x10, body)


def read_connack(conn, v5=False):
    first, body = conn.read_packet()
    assert first == 0x20, f"expected CONNACK, got packet type {first:#04x}"
    pr = decode_props(body, 2)[0] if v5 and len(body) > 2 else {}
    return body[0], body[1], pr      # (ack flags, return/reason code, properties)


def read_until_closed(conn, timeout=WAIT):
    """Reads packets until the broker closes the connection; returns them (or None on timeout)."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        conn.sock.settimeout(left)
        try:
            got.append(conn.read_packet())
        except EOFError:
            return got
        except (ConnectionResetError, BrokenPipeError):
            return got
        except (socket.timeout, TimeoutError):
            return None


def rcv(rcs):
    return [rc.value for rc in rcs]


def user_props(msg):
    return list(getattr(msg.properties, "UserProperty", []) or [])


# ==========================================================================
# client_test.py (MQTT 3.1.1) and the matching client_test5.py tests
# ==========================================================================

# ---- testBasic / test_basic -----------------------------------------------

@pytest.mark.parametrize("proto", [V311, V5], ids=["v311", "v5"])
def test_basic_pubsub(paho, proto):
    """paho testBasic/test_basic: connect, disconnect, reconnect (session present 0),
    subscribe QoS 2, receive own QoS 0/1/2 publications."""
    a = paho("myclientid", proto)
    a.disconnect()
    a = paho("myclientid", proto)
    assert a.flags.session_present is False or a.flags.session_present == 0
    assert a.connack_rc.value == 0
    assert rcv(a.subscribe(TOPICS[0], 2)) == [2]
    a.c.publish(TOPICS[0], b"qos 0", 0)
    a.publish(TOPICS[0], b"qos 1", 1)
    a.publish(TOPICS[0], b"qos 2", 2)
    got = sorted((m.payload, m.qos) for m in a.get_n(3))
    assert got == [(b"qos 0", 0), (b"qos 1", 1), (b"qos 2", 2)]
    a.assert_no_message()


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_basic_second_connect_closes_connection(raw, v5):
    """paho testBasic/test_basic: a second CONNECT on one connection must fail.
    3.1.1 MQTT-3.1.0-2 / 5.0 MQTT-3.1.0-2: protocol violation, the server disconnects
    (5.0 may first send DISCONNECT 0x82)."""
    c = raw()
    c.send(connect_packet_5("myclientid") if v5 else connect_packet_311("myclientid"))
    assert read_connack(c, v5)[1] == 0
    c.send(connect_packet_5("myclientid") if v5 else connect_packet_311("myclientid"))
    got = read_until_closed(c)
    assert got is not None, "broker did not close the connection after a second CONNECT"
    types = [f for f, _ in got]
    assert 0x20 not in types, "second CONNECT must not be answered with a CONNACK"
    if v5:
        assert all(f == 0xE0 for f in types), types
        for _, body in got:
            assert body[0] == 0x82, f"DISCONNECT reason {body[0]:#x}, expected 0x82"
    else:
        assert types == [], f"3.1.1 has no DISCONNECT from the server; got {types}"


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_basic_wrong_protocol_name_refused(raw, v5):
    """paho testBasic/test_basic: CONNECT with protocol name "hj" must fail
    (MQTT-3.1.2-1: the server may disconnect; it must not treat it as MQTT)."""
    c = raw()
    body = mqtt_str("hj") + bytes([5 if v5 else 4, 0x02]) + (30).to_bytes(2, "big")
    if v5:
        body += b"\x00"
    body += mqtt_str("myclientid")
    c.send(packet(0x10, body))
    got = read_until_closed(c)
    assert got is not None, "broker did not close a connection with protocol name 'hj'"
    for first, b in got:
        if first == 0x20:
            assert b[1] != 0x00, "CONNACK success for protocol name 'hj'"


# ---- test_retained_messages / test_retained_message ------------------------

def test_v311_retained_messages(paho):
    """paho test_retained_messages: retained on 3 topics, subscribe +/+ gets 3;
    after deleting them with empty payloads a new subscription gets none (MQTT-3.3.1-5/-10/-11)."""
    a = paho("myclientid", V311)
    a.c.publish(TOPICS[1], b"qos 0", 0, retain=True)
    a.publish(TOPICS[2], b"qos 1", 1, retain=True)
    a.publish(TOPICS[3], b"qos 2", 2, retain=True)
    a.subscribe(WILDTOPICS[5], 2)
    got = a.get_n(3)
    assert sorted((m.topic, m.qos, m.retain) for m in got) == [
        ("Topic/C", 1, True), ("TopicA/B", 0, True), ("TopicA/C", 2, True)]
    a.assert_no_message()
    a.disconnect()

    b = paho("myclientid", V311)
    b.c.publish(TOPICS[1], b"", 0, retain=True)
    b.publish(TOPICS[2], b"", 1, retain=True)
    b.publish(TOPICS[3], b"", 2, retain=True)
    b.subscribe(WILDTOPICS[5], 2)
    b.assert_no_message(0.6)


def test_v5_retained_message_user_properties(paho):
    """paho test_retained_message (v5): retained messages keep their user properties
    (5.0 MQTT-3.3.2-17/-18) and QoS 0/1/2."""
    up = [("a", "2"), ("c", "3")]
    a = paho("myclientid", V5)
    a.c.publish(TOPICS[1], b"qos 0", 0, retain=True, properties=publish_props(UserProperty=up))
    a.publish(TOPICS[2], b"qos 1", 1, retain=True, properties=publish_props(UserProperty=up))
    a.publish(TOPICS[3], b"qos 2", 2, retain=True, properties=publish_props(UserProperty=up))
    a.subscribe(WILDTOPICS[5], 2)
    got = a.get_n(3)
    for m in got:
        assert user_props(m) in (up, up[::-1]), (m.topic, user_props(m))
        assert m.retain
    assert sorted(m.qos for m in got) == [0, 1, 2]


# ---- will_message_test / test_will_message ---------------------------------

def test_v311_will_message(paho):
    """paho will_message_test: a client that goes away without DISCONNECT has its
    will published (MQTT-3.1.2-8)."""
    a = paho("myclientid", V311, keepalive=2,
             will=dict(topic=TOPICS[2], payload=b"client not disconnected"))
    b = paho("myclientid2", V311, clean=False)
    b.subscribe(TOPICS[2], 2)
    a.kill_socket()
    m = b.get(5)
    assert (m.topic, m.payload) == (TOPICS[2], b"client not disconnected")
    b.assert_no_message()


def test_v5_will_message_on_keepalive_timeout_with_user_properties(broker, paho, raw):
    """paho test_will_message (v5): the will client (keep alive 2 s, never pings) is
    dropped by keep-alive timeout and its will arrives with its user properties in order
    (5.0 3.1.2.10, MQTT-3.3.2-17)."""
    b = paho("myclientid2", V5)
    b.subscribe(TOPICS[2], 2)
    a = raw()
    a.send(connect_with_will("myclientid", TOPICS[2], b"will message", v5=True, keepalive=1,
                             will_prop_bytes=props(p_u32(0x18, 0), p_pair(0x26, "a", "2"),
                                                   p_pair(0x26, "c", "3"))))
    assert read_connack(a, True)[1] == 0
    m = b.get(6)
    assert (m.topic, m.payload) == (TOPICS[2], b"will message")
    assert user_props(m) == [("a", "2"), ("c", "3")]


# ---- test_zero_length_clientid ---------------------------------------------

def test_v311_zero_length_clientid(raw):
    """paho test_zero_length_clientid (3.1.1): empty id with clean session 0 is refused
    with CONNACK 0x02 and closed (MQTT-3.1.3-8); with clean session 1 it is accepted
    (MQTT-3.1.3-6)."""
    c = raw()
    c.send(connect_packet_311("", clean=False))
    flags, rc, _ = read_connack(c)
    assert (flags, rc) == (0, 0x02)
    assert c.closed_by_peer(), "MQTT-3.1.3-9: the server must close after CONNACK 0x02"
    c2 = raw()
    c2.send(connect_packet_311("", clean=True))
    assert read_connack(c2)[:2] == (0, 0)


def test_v5_zero_length_clientid(paho):
    """paho test_zero_length_clientid (v5): an empty client id is accepted with Clean
    Start 0 and with Clean Start 1 (5.0 MQTT-3.1.3-6/-7)."""
    for clean in (False, True):
        c = paho("", V5, clean=clean)
        assert c.connack_rc.value == 0
        assert getattr(c.connack_props, "AssignedClientIdentifier", ""), "no assigned id"
        c.disconnect()


# ---- test_offline_message_queueing -----------------------------------------

@pytest.mark.parametrize("proto", [V311, V5], ids=["v311", "v5"])
def test_offline_message_queueing(paho, proto):
    """paho test_offline_message_queueing: a persistent session subscribed to +/+ gets
    the QoS 1 and 2 messages published while it was offline (QoS 0 optional), and
    CONNACK says session present (MQTT-3.2.2-2, MQTT-3.1.2-5)."""
    kw = dict(clean=False) if proto == V311 else dict(
        clean=True, properties=connect_props(SessionExpiryInterval=99999))
    a = paho("myclientid", proto, **kw)
    a.subscribe(WILDTOPICS[5], 2)
    a.disconnect()
    b = paho("myclientid2", proto)
    b.c.publish(TOPICS[1], b"qos 0", 0)
    b.publish(TOPICS[2], b"qos 1", 1)
    b.publish(TOPICS[3], b"qos 2", 2)
    b.disconnect()
    kw = dict(clean=False) if proto == V311 else dict(
        clean=False, properties=connect_props(SessionExpiryInterval=99999))
    a = paho("myclientid", proto, **kw)
    assert a.flags.session_present, "CONNACK session present must be 1"
    got = a.drain(1.0)
    payloads = sorted(m.payload for m in got)
    assert payloads in ([b"qos 1", b"qos 2"], [b"qos 0", b"qos 1", b"qos 2"]), payloads


# ---- test_overlapping_subscriptions ----------------------------------------

@pytest.mark.parametrize("proto", [V311, V5], ids=["v311", "v5"])
def test_overlapping_subscriptions(paho, proto):
    """paho test_overlapping_subscriptions: TopicA/# (QoS 2) and TopicA/+ (QoS 1):
    either one message at QoS 2 or one per subscription at QoS 2 and 1 (MQTT-3.3.5-1)."""
    a = paho("myclientid", proto)
    assert rcv(a.subscribe([(WILDTOPICS[6], 2), (WILDTOPICS[0], 1)])) == [2, 1]
    a.publish(TOPICS[3], b"overlapping topic filters", 2)
    got = a.drain(1.0)
    assert sorted(m.qos for m in got) in ([2], [1, 2]), [(m.topic, m.qos) for m in got]


# ---- test_keepalive --------------------------------------------------------

@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_keepalive_timeout_publishes_will(paho, raw, v5):
    """paho test_keepalive: a client that sends nothing is disconnected after 1.5 x keep
    alive and its will is published (MQTT-3.1.2-24, MQTT-3.1.2-8)."""
    b = paho("myclientid2", V5 if v5 else V311, keepalive=0)
    b.subscribe(TOPICS[4], 2)
    a = raw()
    start = time.monotonic()
    a.send(connect_with_will("myclientid", TOPICS[4], b"keepalive expiry", v5=v5, keepalive=1))
    assert read_connack(a, v5)[1] == 0
    m = b.get(6)
    elapsed = time.monotonic() - start
    assert (m.topic, m.payload) == (TOPICS[4], b"keepalive expiry")
    assert 1.0 <= elapsed <= 4.0, f"will after {elapsed:.2f}s for keep alive 1 s"
    got = read_until_closed(a, 2)
    assert got is not None, "connection not closed after keep-alive timeout"
    if v5:
        assert [(f, bd[:1]) for f, bd in got] in ([], [(0xE0, b"\x8d")]), got


# ---- test_redelivery_on_reconnect ------------------------------------------

@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_redelivery_on_reconnect(raw, v5):
    """paho test_redelivery_on_reconnect: a persistent client subscribed to TopicA/#
    publishes QoS 1 and 2 to itself but withholds PUBACK/PUBREC, disconnects and
    reconnects: the broker resends both PUBLISHes with DUP=1 (MQTT-4.4.0-1, MQTT-3.3.1-1)."""
    cprops = p_u32(0x11, 99999)   # connect_packet_5 adds the length
    conn_pkt = (connect_packet_5("myclientid2", clean=False, props=cprops) if v5
                else connect_packet_311("myclientid2", clean=False))
    c = raw()
    c.send(conn_pkt)
    read_connack(c, v5)
    c.send(subscribe_packet(1, [(WILDTOPICS[6], 2)], v5))
    first, body = c.read_packet()
    assert first == 0x90 and body[-1] == 2, (first, body)
    c.send(publish_packet(TOPICS[1], b"", 1, 10, v5))
    c.send(publish_packet(TOPICS[3], b"", 2, 11, v5))
    incoming, puback, pubcomp = [], False, False
    deadline = time.monotonic() + WAIT
    while not (puback and pubcomp and len(incoming) == 2):
        assert time.monotonic() < deadline, (incoming, puback, pubcomp)
        first, body = c.read_packet()
        kind = first & 0xF0
        if kind == 0x30:
            incoming.append(parse_publish(first, body, v5))      # not acknowledged
        elif kind == 0x40:
            puback = True
        elif kind == 0x50:
            c.send(ack_packet(0x62, int.from_bytes(body[:2], "big")))
        elif kind == 0x70:
            pubcomp = True
    c.send(packet(0xE0, b""))
    assert c.closed_by_peer()
    c.close()

    c2 = raw()
    c2.send(conn_pkt)
    flags, rc, _ = read_connack(c2, v5)
    assert (flags, rc) == (1, 0), "session present expected"
    resent = []
    deadline = time.monotonic() + WAIT
    while len(resent) < 2:
        assert time.monotonic() < deadline, resent
        first, body = c2.read_packet()
        if first & 0xF0 == 0x30:
            resent.append(parse_publish(first, body, v5))
    assert sorted((p["topic"], p["qos"]) for p in resent) == [(b"TopicA/B", 1), (b"TopicA/C", 2)]
    for p in resent:
        assert p["dup"], f"re-sent PUBLISH {p['topic']} without DUP (MQTT-3.3.1-1)"
    old = {p["topic"]: p["pid"] for p in incoming}
    assert {p["topic"]: p["pid"] for p in resent} == old, "packet identifiers must be kept"


# ---- test_subscribe_failure ------------------------------------------------

def test_subscribe_failure_invalid_filter_v5(raw):
    """paho test_subscribe_failure (the suite refuses "test/nosubscribe" by broker
    configuration; Tern has no such ACL, so the equivalent is a filter the broker must
    refuse): MQTT 5 refuses it alone, SUBACK 0x8F (3.9.3), and the connection stays."""
    c = raw()
    c.send(connect_packet_5("myclientid"))
    read_connack(c, True)
    c.send(subscribe_packet(7, [("test/#/nosubscribe", 2), ("TopicA", 2)], True))
    first, body = c.read_packet()
    assert first == 0x90
    assert int.from_bytes(body[:2], "big") == 7
    codes = list(body[-2:])
    assert codes == [0x8F, 2], [hex(x) for x in codes]
    c.send(packet(0xC0, b""))                                    # PINGREQ
    assert c.read_packet()[0] == 0xD0


def test_invalid_filter_closes_a_v311_connection(raw):
    """MQTT 3.1.1 has no code for an invalid filter: it breaks MQTT-4.7.1-2, a protocol
    violation, so the connection closes without a SUBACK (MQTT-4.8.0-1)."""
    c = raw()
    c.send(connect_packet_311("myclientid"))
    read_connack(c, False)
    c.send(subscribe_packet(7, [("TopicA", 2), ("test/#/nosubscribe", 2)], False))
    got = read_until_closed(c)
    assert got == [], f"closed without an answer, got {got}"


# ---- test_dollar_topics ----------------------------------------------------

@pytest.mark.parametrize("proto", [V311, V5], ids=["v311", "v5"])
def test_dollar_topics(paho, proto):
    """paho test_dollar_topics: +/+ does not match $TopicA/B (MQTT-4.7.2-1)."""
    b = paho("myclientid2", proto, keepalive=0)
    b.subscribe(WILDTOPICS[5], 2)
    b.publish("$" + TOPICS[1], b"", 1)
    b.assert_no_message(0.5)


# ---- test_unsubscribe ------------------------------------------------------

@pytest.mark.parametrize("proto", [V311, V5], ids=["v311", "v5"])
def test_unsubscribe(paho, proto):
    """paho test_unsubscribe: after unsubscribing TopicA only TopicA/B and Topic/C arrive
    (MQTT-3.10.4-1)."""
    b = paho("myclientid2", proto)
    for t in TOPICS[:3]:
        b.subscribe(t, 2)
    b.unsubscribe(TOPICS[0])
    a = paho("myclientid", proto)
    a.publish(TOPICS[0], b"topic 0 - unsubscribed", 1)
    a.publish(TOPICS[1], b"topic 1", 1)
    a.publish(TOPICS[2], b"topic 2", 1)
    got = b.get_n(2)
    assert sorted(m.payload for m in got) == [b"topic 1", b"topic 2"]
    b.assert_no_message()


# ==========================================================================
# client_test5.py only (MQTT 5)
# ==========================================================================

def test_v5_session_expiry(paho):
    """paho test_session_expiry: SEI 0 ends the session at disconnect; SEI N keeps it
    N seconds; DISCONNECT may change it, and DISCONNECT SEI 0 ends it
    (5.0 3.1.2.11.2, 3.14.2.2.2, MQTT-3.2.2-2/-3). Intervals scaled down."""
    def conn(clean, sei):
        return paho("myclientid", V5, clean=clean, properties=connect_props(SessionExpiryInterval=sei))

    c = conn(True, 0)
    assert not c.flags.session_present
    c.subscribe(TOPICS[0], 2)
    c.disconnect()
    # paho's disconnect() returns before the broker has necessarily handled the DISCONNECT;
    # reconnecting at once races with it (see test_takeover_does_not_resume_ended_session).
    time.sleep(0.2)
    c = conn(False, 0)
    assert not c.flags.session_present, "SEI 0: session must end at disconnect"
    c.disconnect()

    c = conn(True, 2)
    c.subscribe(TOPICS[0], 2)
    c.disconnect()
    time.sleep(0.5)
    c = conn(False, 2)
    assert c.flags.session_present, "SEI 2: session must survive 0.5 s offline"
    c.disconnect()
    time.sleep(3.0)
    c = conn(False, 2)
    assert not c.flags.session_present, "SEI 2: session must be gone after 3 s"
    c.disconnect()

    c = conn(True, 1)
    c.subscribe(TOPICS[0], 2)
    c.disconnect(properties=v5_props(PacketTypes.DISCONNECT, SessionExpiryInterval=3))
    time.sleep(1.6)
    c = conn(False, 1)
    assert c.flags.session_present, "DISCONNECT SEI 3 must extend the session past 1 s"
    c.disconnect(properties=v5_props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    time.sleep(0.2)
    c = conn(False, 1)
    assert not c.flags.session_present, "DISCONNECT SEI 0 must end the session"


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_takeover_does_not_resume_ended_session(raw, v5):
    """Deterministic form of a race in paho test_session_expiry (which reconnects with
    Clean Start 0 right after a DISCONNECT of a Session Expiry 0 session and expects
    session present 0): when the broker sees the new CONNECT while the old connection is
    still open, it is a takeover. The old connection's session lasts only as long as its
    Network Connection (3.1.1: clean session 1, MQTT-3.1.2-6 "MUST NOT be reused in any
    subsequent Session"; 5.0: Session Expiry 0, 3.1.2.11.2), the takeover closes that
    connection (MQTT-3.1.4-3) before Clean Start is processed (MQTT-3.1.4-4), so the new
    connection must get Session Present 0 (MQTT-3.2.2-2/-3) and no old subscription."""
    a = raw()
    a.send(connect_packet_5("tk", props=p_u32(0x11, 0)) if v5 else connect_packet_311("tk", clean=True))
    assert read_connack(a, v5)[1] == 0
    a.send(subscribe_packet(1, [("tk/t", 1)], v5))
    assert a.read_packet()[0] == 0x90
    b = raw()
    b.send(connect_packet_5("tk", clean=False, props=p_u32(0x11, 0)) if v5
           else connect_packet_311("tk", clean=False))
    flags, rc, _ = read_connack(b, v5)
    assert rc == 0
    got = read_until_closed(a)
    assert got is not None, "old connection not closed on takeover"
    assert flags == 0, ("session present 1: the taken-over session (clean session 1 / "
                        "Session Expiry 0) was resumed")
    b.send(publish_packet("tk/t", b"x", 1, 5, v5))
    first, _ = b.read_packet()
    assert first == 0x40
    b.sock.settimeout(QUIET)
    with pytest.raises((socket.timeout, TimeoutError)):
        extra = b.read_packet()
        raise AssertionError(f"old subscription still active: {extra}")


def test_v5_user_properties(paho):
    """paho test_user_properties: user properties pass through at QoS 0/1/2 (MQTT-3.3.2-17/-18)."""
    a = paho("myclientid", V5)
    a.subscribe(TOPICS[0], 2)
    up = [("a", "2"), ("c", "3")]
    for q in range(3):
        a.publish(TOPICS[0], b"", q, properties=publish_props(UserProperty=up)) if q else \
            a.c.publish(TOPICS[0], b"", 0, properties=publish_props(UserProperty=up))
    got = a.get_n(3)
    for m in got:
        assert user_props(m) in (up, up[::-1]), user_props(m)
    assert sorted(m.qos for m in got) == [0, 1, 2]


def test_v5_payload_format(paho):
    """paho test_payload_format: Payload Format Indicator and Content Type pass through
    (MQTT-3.3.2-4, MQTT-3.3.2-20)."""
    a = paho("myclientid", V5)
    a.subscribe(TOPICS[0], 2)
    pp = dict(PayloadFormatIndicator=1, ContentType="My name")
    a.c.publish(TOPICS[0], b"", 0, properties=publish_props(**pp))
    a.publish(TOPICS[0], b"", 1, properties=publish_props(**pp))
    a.publish(TOPICS[0], b"", 2, properties=publish_props(**pp))
    got = a.get_n(3)
    for m in got:
        assert getattr(m.properties, "ContentType", None) == "My name"
        assert getattr(m.properties, "PayloadFormatIndicator", None) == 1
    assert sorted(m.qos for m in got) == [0, 1, 2]


def test_v5_publication_expiry(paho):
    """paho test_publication_expiry: queued messages whose Message Expiry Interval has
    passed are not delivered; the others arrive with a reduced interval
    (MQTT-3.3.2-5, MQTT-3.3.2-6). Intervals scaled: 1 s expires, 10 s survives."""
    b = paho("myclientid2", V5, properties=connect_props(SessionExpiryInterval=99999))
    b.subscribe(TOPICS[0], 2)
    b.disconnect(properties=v5_props(PacketTypes.DISCONNECT, SessionExpiryInterval=999999999))
    a = paho("myclientid", V5)
    a.publish(TOPICS[0], b"qos 1 - expire", 1, properties=publish_props(MessageExpiryInterval=1))
    a.publish(TOPICS[0], b"qos 2 - expire", 2, properties=publish_props(MessageExpiryInterval=1))
    a.publish(TOPICS[0], b"qos 1 - don't expire", 1, properties=publish_props(MessageExpiryInterval=10))
    a.publish(TOPICS[0], b"qos 2 - don't expire", 2, properties=publish_props(MessageExpiryInterval=10))
    time.sleep(2.2)
    b = paho("myclientid2", V5, clean=False)
    assert b.flags.session_present
    got = b.get_n(2)
    b.assert_no_message(0.5)
    assert sorted(m.payload for m in got) == [b"qos 1 - don't expire", b"qos 2 - don't expire"]
    for m in got:
        mei = getattr(m.properties, "MessageExpiryInterval", None)
        assert mei is not None and mei < 10, mei


def test_v5_subscribe_options_no_local(paho):
    """paho test_subscribe_options (noLocal): a No Local subscriber does not get its own
    message, another No Local subscriber does (MQTT-3.8.3-3)."""
    a = paho("myclientid", V5)
    b = paho("myclientid2", V5)
    a.subscribe(TOPICS[0], options=SubscribeOptions(qos=2, noLocal=True))
    b.subscribe(TOPICS[0], options=SubscribeOptions(qos=2, noLocal=True))
    a.publish(TOPICS[0], b"noLocal test", 1)
    assert b.get().payload == b"noLocal test"
    a.assert_no_message()
    b.assert_no_message(0.1)


def test_v5_subscribe_options_retain_as_published(paho):
    """paho test_subscribe_options (retainAsPublished): live deliveries keep RETAIN
    (MQTT-3.3.1-12/-13)."""
    a = paho("myclientid", V5)
    a.subscribe(TOPICS[0], options=SubscribeOptions(qos=2, retainAsPublished=True))
    a.publish(TOPICS[0], b"retain as published false", 1, retain=False)
    a.publish(TOPICS[0], b"retain as published true", 1, retain=True)
    got = a.get_n(2)
    assert [(m.payload, m.retain) for m in got] == [
        (b"retain as published false", False), (b"retain as published true", True)]


def test_v5_subscribe_options_retain_handling(paho):
    """paho test_subscribe_options (retainHandling): 1 sends retained only for a new
    subscription, 2 never, 0 on every subscribe (MQTT-3.3.1-9/-10/-11)."""
    a = paho("myclientid", V5)
    a.c.publish(TOPICS[1], b"qos 0", 0, retain=True)
    a.publish(TOPICS[2], b"qos 1", 1, retain=True)
    a.publish(TOPICS[3], b"qos 2", 2, retain=True)
    opts = lambda rh: SubscribeOptions(qos=2, retainHandling=rh)  # noqa: E731
    a.subscribe(WILDTOPICS[5], options=opts(1))
    assert sorted(m.qos for m in a.get_n(3)) == [0, 1, 2]
    a.subscribe(WILDTOPICS[5], options=opts(1))
    a.assert_no_message(0.5)
    a.disconnect()

    a = paho("myclientid", V5)
    a.subscribe(WILDTOPICS[5], options=opts(2))
    a.assert_no_message(0.4)
    a.subscribe(WILDTOPICS[5], options=opts(2))
    a.assert_no_message(0.4)
    a.disconnect()

    a = paho("myclientid", V5)
    a.subscribe(WILDTOPICS[5], options=opts(0))
    assert sorted(m.qos for m in a.get_n(3)) == [0, 1, 2]
    a.subscribe(WILDTOPICS[5], options=opts(0))
    assert sorted(m.qos for m in a.get_n(3)) == [0, 1, 2]


def test_v5_assigned_clientid(paho):
    """paho test_assigned_clientid: an empty client id gets a non-empty Assigned Client
    Identifier (MQTT-3.2.2-16)."""
    c = paho("", V5)
    assert getattr(c.connack_props, "AssignedClientIdentifier", "") != ""


def test_v5_subscribe_identifiers(paho):
    """paho test_subscribe_identifiers: a message carries the identifier of the matching
    subscription; two overlapping subscriptions of one client give one copy carrying both
    identifiers (MQTT-3.3.4-3, MQTT-3.3.4-5)."""
    a = paho("myclientid", V5)
    a.subscribe(TOPICS[0], 2, properties=v5_props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=456789))
    b = paho("myclientid2", V5)
    b.subscribe(TOPICS[0], 2, properties=v5_props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=2))
    b.subscribe(TOPICS[0] + "/#", 2, properties=v5_props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=3))
    b.publish(TOPICS[0], b"sub identifier test", 1)
    m = a.get()
    assert list(m.properties.SubscriptionIdentifier) == [456789]
    m2 = b.get()
    assert set(m2.properties.SubscriptionIdentifier) == {2, 3}
    b.assert_no_message()


def test_v5_request_response(paho):
    """paho test_request_response: Response Topic and Correlation Data reach the responder
    unchanged (MQTT-3.3.2-15/-16) and the response reaches the requester."""
    a = paho("myclientid", V5)
    b = paho("myclientid2", V5)
    a.subscribe(TOPICS[0], options=SubscribeOptions(qos=2, noLocal=True))
    b.subscribe(TOPICS[0], options=SubscribeOptions(qos=2, noLocal=True))
    a.publish(TOPICS[0], b"request", 1,
              properties=publish_props(ResponseTopic=TOPICS[0], CorrelationData=b"334"))
    req = b.get()
    assert req.properties.ResponseTopic == TOPICS[0]
    assert req.properties.CorrelationData == b"334"
    b.publish(req.properties.ResponseTopic, b"response", 1,
              properties=publish_props(ResponseTopic=req.properties.ResponseTopic,
                                       CorrelationData=req.properties.CorrelationData))
    resp = a.get()
    assert resp.payload == b"response"
    assert resp.properties.CorrelationData == b"334"


def test_v5_client_topic_alias_zero(raw):
    """paho test_client_topic_alias (first step): a PUBLISH with Topic Alias 0 must end the
    connection (MQTT-3.3.2-8). The suite only checks that a DISCONNECT arrives; this test
    also asks for 0x94 "Topic Alias invalid", the code Tern documents (docs/mqtt5.md) and
    that mosquitto and HiveMQ use. paho-mqtt refuses to encode alias 0, hence a raw socket."""
    c = raw()
    c.send(connect_packet_5("myclientid"))
    assert read_connack(c, True)[1] == 0
    c.send(publish_packet(TOPICS[0], b"topic alias 0", 1, 1, True, props(p_u16(0x23, 0))))
    got = read_until_closed(c)
    assert got is not None, "connection not closed after Topic Alias 0"
    assert [f for f, _ in got] == [0xE0], f"expected one DISCONNECT, got {got}"
    assert got[0][1][:1] == b"\x94", f"DISCONNECT reason {got[0][1][0]:#x}, expected 0x94"


def test_v5_client_topic_alias(paho):
    """paho test_client_topic_alias (rest): an alias set on one connection works on it;
    after reconnecting (session kept) the old alias is unknown and using it closes the
    connection (MQTT-3.3.2-7; 0x82 Protocol Error or 0x94 accepted)."""
    a = paho("myclientid", V5, properties=connect_props(TopicAliasMaximum=0, SessionExpiryInterval=99999))
    tam = getattr(a.connack_props, "TopicAliasMaximum", 0)
    assert tam >= 1, "Tern advertises a Topic Alias Maximum"
    a.subscribe(TOPICS[0], 2)
    a.publish(TOPICS[0], b"topic alias 1", 1, properties=publish_props(TopicAlias=1))
    assert a.get().payload == b"topic alias 1"
    a.publish("", b"topic alias 2", 1, properties=publish_props(TopicAlias=1))
    m = a.get()
    assert (m.topic, m.payload) == (TOPICS[0], b"topic alias 2")
    a.disconnect()

    a = paho("myclientid", V5, clean=False)
    assert a.flags.session_present
    a.publish(TOPICS[0], b"topic alias 3", 1)
    assert a.get().payload == b"topic alias 3"
    a.c.publish("", b"topic alias 4", 1, properties=publish_props(TopicAlias=1))
    rc, _ = a.wait_disconnect()
    assert rc.value in (0x82, 0x94), f"stale alias: DISCONNECT {rc.value:#x}"
    a.assert_no_message(0.2)


def test_v5_server_topic_alias(paho):
    """paho test_server_topic_alias: with the client's Topic Alias Maximum 1 the broker's
    first PUBLISH carries the topic and an alias, later ones the alias and an empty topic;
    with no or 0 Topic Alias Maximum no alias is sent (MQTT-3.3.2-9/-10, MQTT-3.1.2-26/-27)."""
    a = paho("myclientid", V5, properties=connect_props(TopicAliasMaximum=1))
    a.subscribe(TOPICS[0], 2)
    a.c.publish(TOPICS[0], b"topic alias 1", 0)
    a.publish(TOPICS[0], b"topic alias 1", 1)
    a.publish(TOPICS[0], b"topic alias 1", 2)
    got = a.get_n(3)
    alias = getattr(got[0].properties, "TopicAlias", None)
    assert alias is not None and 1 <= alias <= 1, f"first PUBLISH alias {alias}"
    assert got[0].topic == TOPICS[0]
    for m in got[1:]:
        assert getattr(m.properties, "TopicAlias", None) == alias
        assert m.topic == ""
    a.disconnect()

    for cp in (connect_props(), connect_props(TopicAliasMaximum=0)):
        a = paho("myclientid", V5, properties=cp)
        a.subscribe(TOPICS[0], 2)
        a.c.publish(TOPICS[0], b"topic alias 1", 0)
        a.publish(TOPICS[0], b"topic alias 1", 1)
        a.publish(TOPICS[0], b"topic alias 1", 2)
        for m in a.get_n(3):
            assert not hasattr(m.properties, "TopicAlias"), m.properties
            assert m.topic == TOPICS[0]
        a.disconnect()


def test_v5_maximum_packet_size_server(broker_factory, paho):
    """paho test_maximum_packet_size (server part): with a server Maximum Packet Size
    under 65535 (the suite skips this part otherwise; Tern's default is 1 MiB, so it is
    configured here), a PUBLISH of that many payload bytes gets DISCONNECT 0x95 (MQTT-3.2.2-15)."""
    b = broker_factory(cfg("max_packet_size = 1024"))
    a = paho("myclientid", V5, broker_=b)
    mps = getattr(a.connack_props, "MaximumPacketSize", None)
    assert mps == 1024
    a.c.publish(TOPICS[0], b"." * mps, 0)
    rc, _ = a.wait_disconnect()
    assert rc.value == 0x95, f"DISCONNECT {rc.value:#x}, expected 0x95 Packet too large"


def test_v5_maximum_packet_size_client(paho):
    """paho test_maximum_packet_size (client part): with the client's Maximum Packet Size
    64, a 32-byte payload is delivered and a 64-byte one is not (MQTT-3.1.2-24/-25)."""
    a = paho("myclientid", V5, properties=connect_props(MaximumPacketSize=64))
    a.subscribe(TOPICS[0], 2)
    a.c.publish(TOPICS[0], b"." * 32, 0)
    assert a.get().payload == b"." * 32
    a.publish(TOPICS[0], b"." * 64, 1)
    a.assert_no_message(0.6)
    a.publish(TOPICS[0], b"small", 1)        # the connection still works
    assert a.get().payload == b"small"


def test_v5_server_keep_alive(broker_factory, paho):
    """paho test_server_keep_alive: keep alive 120 is answered with Server Keep Alive 60.
    That value is the paho test broker's configuration; Tern's default
    (max_keepalive_secs = 0) sends no Server Keep Alive, so it is configured here
    (MQTT-3.2.2-21)."""
    b = broker_factory(cfg("max_keepalive_secs = 60"))
    a = paho("myclientid", V5, broker_=b, keepalive=120)
    assert getattr(a.connack_props, "ServerKeepAlive", None) == 60


def test_v5_flow_control_client_receive_maximum(raw):
    """paho test_flow_control1: with the client's Receive Maximum 2 and three QoS 1
    messages, the broker sends two PUBLISHes, then the third only after a PUBACK
    (MQTT-3.3.4-7/-9)."""
    c = raw()
    c.send(connect_packet_5("myclientid", props=p_u16(0x21, 2) + p_u32(0x11, 0)))
    read_connack(c, True)
    c.send(subscribe_packet(1, [(TOPICS[0], 2)], True))
    assert c.read_packet()[0] == 0x90
    for i in (1, 2, 3):
        c.send(publish_packet(TOPICS[0], b"message %d" % i, 1, i, True))
    pubs, acks = [], 0
    deadline = time.monotonic() + WAIT
    while acks < 3 or len(pubs) < 2:
        assert time.monotonic() < deadline, (acks, pubs)
        first, body = c.read_packet()
        if first & 0xF0 == 0x30:
            pubs.append(parse_publish(first, body, True))
        else:
            assert first == 0x40, hex(first)
            acks += 1
    assert len(pubs) == 2 and all(p["qos"] == 1 for p in pubs)
    c.sock.settimeout(QUIET + 0.3)
    with pytest.raises((socket.timeout, TimeoutError)):
        extra = c.read_packet()
        raise AssertionError(f"third PUBLISH sent beyond Receive Maximum 2: {extra}")
    c.sock.settimeout(WAIT)
    c.send(ack_packet(0x40, pubs[0]["pid"]))
    first, body = c.read_packet()
    assert first & 0xF0 == 0x30, hex(first)
    third = parse_publish(first, body, True)
    assert third["payload"] == b"message 3" and third["qos"] == 1
    c.send(ack_packet(0x40, pubs[1]["pid"]))
    c.send(ack_packet(0x40, third["pid"]))


def test_v5_flow_control_server_receive_maximum(raw):
    """paho test_flow_control2: sending Receive Maximum + 1 QoS 2 PUBLISHes without
    PUBREL gets DISCONNECT 0x93 (MQTT-3.3.4-8). Default configuration."""
    c = raw()
    c.send(connect_packet_5("myclientid", props=p_u32(0x11, 0)))
    _, rc, pr = read_connack(c, True)
    assert rc == 0
    rm = pr.get(0x21, [65535])[0]
    data = b"".join(publish_packet(TOPICS[0], b"message %d" % i, 2, i, True)
                    for i in range(1, rm + 2))
    try:
        c.send(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    got = read_until_closed(c, 10)
    assert got is not None, "not disconnected after exceeding Receive Maximum"
    disc = [b for f, b in got if f == 0xE0]
    assert disc and disc[0][0] == 0x93, f"expected DISCONNECT 0x93; last packets {got[-3:]}"
    assert sum(1 for f, _ in got if f == 0x50) == rm, "each allowed QoS 2 PUBLISH gets a PUBREC"


@pytest.mark.parametrize("wdi,sei,lo,hi", [(2, 4, 2.0, 3.0), (5, 0, 0.0, 1.0), (5, 1, 1.0, 2.0)],
                         ids=["delay<expiry", "expiry0", "expiry<delay"])
def test_v5_will_delay(paho, wdi, sei, lo, hi):
    """paho test_will_delay: the will is published at the earlier of the Will Delay
    Interval and the session's end (5.0 3.1.3.2.2, MQTT-3.1.3-9). Intervals scaled."""
    b = paho("myclientid2", V5)
    b.subscribe(TOPICS[0], 2)
    a = paho("myclientid", V5, properties=connect_props(SessionExpiryInterval=sei),
             will=dict(topic=TOPICS[0], payload=b"test_will_delay will message",
                       properties=v5_props(PacketTypes.WILLMESSAGE, WillDelayInterval=wdi)))
    assert not a.flags.session_present
    a.kill_socket()
    start = time.monotonic()
    m = b.get(hi + 1.5)
    elapsed = time.monotonic() - start
    assert (m.topic, m.payload) == (TOPICS[0], b"test_will_delay will message")
    # The broker starts the delay when it sees the close, after `start`: never earlier than lo.
    assert lo - 0.02 <= elapsed <= hi, f"will after {elapsed:.2f}s (delay {wdi}, expiry {sei})"


def test_v5_shared_subscriptions(paho):
    """paho test_shared_subscriptions: two clients subscribe (in one SUBSCRIBE) to a shared
    filter and a normal one; a normal message reaches both, a shared one exactly one
    (5.0 4.8.2)."""
    shared, topic = "$share/sharename/client_test5/x", "client_test5/x"
    a = paho("myclientid", V5)
    assert rcv(a.subscribe([(shared, SubscribeOptions(qos=2)), (TOPICS[0], SubscribeOptions(qos=2))])) == [2, 2]
    b = paho("myclientid2", V5)
    assert rcv(b.subscribe([(shared, SubscribeOptions(qos=2)), (TOPICS[0], SubscribeOptions(qos=2))])) == [2, 2]
    b.c.publish(TOPICS[0], b"message 0", 0)
    assert a.get().payload == b"message 0"
    assert b.get().payload == b"message 0"
    b.c.publish(topic, b"message 0", 0)
    got = a.drain(0.8) + b.drain(0.1)
    assert len(got) == 1, [(m.topic, m.payload) for m in got]
