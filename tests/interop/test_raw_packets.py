"""Byte-level checks for cases no client library will send (refused or malformed input)."""

import pytest

from conftest import connect_packet_311, connect_packet_5, mqtt, mqtt_str, packet


def test_v311_empty_client_id_without_clean_session_refused(raw):
    # 3.1.1 3.1.3-8: zero-byte ClientId with CleanSession=0 -> CONNACK 0x02, then close.
    c = raw()
    c.send(connect_packet_311("", clean=False))
    first, body = c.read_packet()
    assert first == 0x20 and body == b"\x00\x02", f"got {first:#x} {body!r}"
    assert c.closed_by_peer()


def test_v311_connect_accepted_bytes(raw):
    c = raw()
    c.send(connect_packet_311("rawok", clean=True))
    assert c.read_packet() == (0x20, b"\x00\x00")
    c.send(b"\xc0\x00")  # PINGREQ
    assert c.read_packet() == (0xD0, b"")


def test_v5_connect_accepted_bytes(raw):
    c = raw()
    c.send(connect_packet_5("rawok5"))
    first, body = c.read_packet()
    assert first == 0x20 and body[:2] == b"\x00\x00", f"got {first:#x} {body!r}"


def test_first_packet_not_connect_closes(raw):
    # 3.1.1 3.1.0-1 / 5.0 3.1.0-1: the first packet must be CONNECT.
    c = raw()
    c.send(b"\xc0\x00")  # PINGREQ
    assert c.closed_by_peer()


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_second_connect_is_protocol_error(raw, v5):
    # 3.1.1 3.1.0-2 / 5.0 3.1.0-2: a second CONNECT is a protocol violation -> close.
    c = raw()
    cp = connect_packet_5("twice") if v5 else connect_packet_311("twice")
    c.send(cp)
    first, _ = c.read_packet()
    assert first == 0x20
    c.send(cp)
    if v5:
        # Optionally a DISCONNECT 0x82 (Protocol Error) first.
        try:
            first, body = c.read_packet()
            assert first == 0xE0 and body[:1] == b"\x82", f"got {first:#x} {body!r}"
        except EOFError:
            return
    assert c.closed_by_peer()


def test_v311_subscribe_with_bad_reserved_flags_closes(raw):
    # 3.1.1 3.8.1-1: SUBSCRIBE fixed header flags must be 0010; otherwise close.
    c = raw()
    c.send(connect_packet_311("badsub"))
    c.read_packet()
    body = (1).to_bytes(2, "big") + mqtt_str("a/b") + b"\x01"
    c.send(packet(0x80, body))  # flags 0000 instead of 0010
    assert c.closed_by_peer()


def test_v311_publish_qos3_closes(raw):
    # 3.1.1 3.3.1-4: a PUBLISH with both QoS bits set must close the connection.
    c = raw()
    c.send(connect_packet_311("qos3"))
    c.read_packet()
    c.send(packet(0x36, mqtt_str("a/b") + (1).to_bytes(2, "big") + b"x"))
    assert c.closed_by_peer()


def test_v311_wildcard_in_publish_topic_closes(raw):
    # 3.1.1 3.3.2-2: the Topic Name in a PUBLISH must not contain wildcards.
    c = raw()
    c.send(connect_packet_311("wild"))
    c.read_packet()
    c.send(packet(0x30, mqtt_str("a/+") + b"x"))
    assert c.closed_by_peer()


def test_v5_topic_alias_zero_is_protocol_error(raw):
    # 5.0 3.3.2.3.4: Topic Alias 0 is a Protocol Error -> DISCONNECT 0x94 (Topic Alias invalid).
    c = raw()
    c.send(connect_packet_5("alias0"))
    c.read_packet()
    props = b"\x23\x00\x00"  # Topic Alias = 0
    c.send(packet(0x30, mqtt_str("a/b") + bytes([len(props)]) + props + b"x"))
    try:
        first, body = c.read_packet()
    except EOFError:
        pytest.fail("connection closed without DISCONNECT reason code")
    assert first == 0xE0 and body[:1] in (b"\x94", b"\x82"), f"got {first:#x} {body!r}"
    assert c.closed_by_peer()


def test_v5_unknown_topic_alias_is_protocol_error(raw):
    # 5.0 3.3.4: an empty topic with an alias that has no mapping -> DISCONNECT 0x82.
    c = raw()
    c.send(connect_packet_5("alias-unknown"))
    c.read_packet()
    props = b"\x23\x00\x05"  # Topic Alias = 5, never set
    c.send(packet(0x30, mqtt_str("") + bytes([len(props)]) + props + b"x"))
    try:
        first, body = c.read_packet()
    except EOFError:
        pytest.fail("connection closed without DISCONNECT reason code")
    assert first == 0xE0 and body[:1] in (b"\x82", b"\x94"), f"got {first:#x} {body!r}"
    assert c.closed_by_peer()


def test_v311_bad_password_connack_byte(broker_factory, raw):
    b = broker_factory('[auth]\nallow_anonymous = false\n[[auth.users]]\nname = "u"\npassword = "p"\n'
                       '[listeners]\ntcp = ["127.0.0.1:0"]\n')
    c = raw(b)
    body = (mqtt_str("MQTT") + bytes([4, 0x02 | 0x80 | 0x40]) + (30).to_bytes(2, "big")
            + mqtt_str("bad") + mqtt_str("u") + mqtt_str("nope"))
    c.send(packet(0x10, body))
    first, body = c.read_packet()
    assert first == 0x20 and body in (b"\x00\x04", b"\x00\x05"), f"got {first:#x} {body!r}"
    assert c.closed_by_peer()


def test_v311_qos2_duplicate_publish_delivered_once(raw, paho):
    # 3.1.1 4.3.3 / 5.0 4.3.3: a re-sent QoS 2 PUBLISH (same packet id, DUP=1) before
    # PUBREL must not cause a second delivery.
    sub = paho("sub")
    sub.subscribe("dup/t", 2)
    c = raw()
    c.send(connect_packet_311("dup-pub"))
    c.read_packet()
    body = mqtt_str("dup/t") + (7).to_bytes(2, "big") + b"once"
    c.send(packet(0x34, body))                       # PUBLISH QoS 2
    assert c.read_packet() == (0x50, b"\x00\x07")    # PUBREC
    c.send(packet(0x3C, body))                       # same, DUP=1
    assert c.read_packet() == (0x50, b"\x00\x07")    # PUBREC again
    c.send(packet(0x62, b"\x00\x07"))                # PUBREL
    assert c.read_packet() == (0x70, b"\x00\x07")    # PUBCOMP
    m = sub.get()
    assert m.payload == b"once"
    sub.assert_no_message()


def test_v311_unacked_qos1_redelivered_with_dup_on_reconnect(raw, paho):
    # 3.1.1 4.4: on reconnect with CleanSession=0 the server re-sends unacknowledged
    # QoS 1 PUBLISH packets with DUP=1 and the original packet identifier.
    c = raw()
    c.send(connect_packet_311("redeliver", clean=False))
    assert c.read_packet() == (0x20, b"\x00\x00")
    c.send(packet(0x82, (1).to_bytes(2, "big") + mqtt_str("rd/t") + b"\x01"))
    assert c.read_packet() == (0x90, b"\x00\x01\x01")
    pub = paho("pub")
    pub.publish("rd/t", b"ack-me", qos=1)
    first, body = c.read_packet()
    assert first & 0xF0 == 0x30 and (first >> 1) & 3 == 1, f"{first:#x}"
    assert first & 0x08 == 0, "first delivery must have DUP=0"
    tlen = int.from_bytes(body[:2], "big")
    pid = body[2 + tlen:4 + tlen]
    assert body[4 + tlen:] == b"ack-me"
    c.close()   # no PUBACK

    c2 = raw()
    c2.send(connect_packet_311("redeliver", clean=False))
    assert c2.read_packet() == (0x20, b"\x01\x00"), "session present expected"
    first, body2 = c2.read_packet()
    assert first & 0xF0 == 0x30 and first & 0x08, f"redelivery must set DUP=1, got {first:#x}"
    assert body2[2 + tlen:4 + tlen] == pid, "same packet identifier on redelivery"
    assert body2[4 + tlen:] == b"ack-me"
    c2.send(packet(0x40, pid))   # PUBACK


def test_keepalive_timeout_closes_and_sends_will(raw, paho):
    # 3.1.1 3.1.2.10: no packet within 1.5 x keep alive -> the server disconnects,
    # and the will is published (3.1.2.8: not a DISCONNECT).
    watcher = paho("watcher")
    watcher.subscribe("ka/will", 0)
    c = raw()
    flags = 0x02 | 0x04   # clean session, will flag, will QoS 0
    body = (mqtt_str("MQTT") + bytes([4, flags]) + (1).to_bytes(2, "big")
            + mqtt_str("silent") + mqtt_str("ka/will") + mqtt_str("timeout"))
    c.send(packet(0x10, body))
    assert c.read_packet() == (0x20, b"\x00\x00")
    assert c.closed_by_peer(timeout=4.0), "broker did not close a silent connection after 1.5 x keep alive"
    assert watcher.get(timeout=2).payload == b"timeout"


def test_v5_client_receive_maximum_respected(raw, paho):
    # 5.0 3.1.2.11.3 / 4.9: the server must not have more unacknowledged QoS 1/2
    # PUBLISH packets in flight than the client's Receive Maximum.
    c = raw()
    props = b"\x21\x00\x02"   # Receive Maximum = 2
    c.send(connect_packet_5("rm2", props=props))
    first, _ = c.read_packet()
    assert first == 0x20
    c.send(packet(0x82, (1).to_bytes(2, "big") + b"\x00" + mqtt_str("rm/t") + b"\x01"))
    first, body = c.read_packet()
    assert first == 0x90 and body[-1:] == b"\x01"
    pub = paho("pub", mqtt.MQTTv5)
    for i in range(5):
        pub.publish("rm/t", str(i).encode(), qos=1)

    def read_publish():
        first, body = c.read_packet()
        assert first & 0xF0 == 0x30, f"{first:#x}"
        tlen = int.from_bytes(body[:2], "big")
        pid = body[2 + tlen:4 + tlen]
        plen_start = 4 + tlen
        # skip the property block (a one-byte length is enough here)
        payload = body[plen_start + 1 + body[plen_start]:]
        return pid, payload

    inflight = [read_publish(), read_publish()]
    c.sock.settimeout(0.5)
    try:
        extra = c.read_packet()
        pytest.fail(f"third PUBLISH sent while 2 were unacknowledged: {extra!r}")
    except (TimeoutError, OSError):
        pass
    c.sock.settimeout(5)
    got = [p for _, p in inflight]
    for _ in range(3):
        pid, _payload = inflight.pop(0)
        c.send(packet(0x40, pid))      # PUBACK frees one slot
        inflight.append(read_publish())
        got.append(inflight[-1][1])
    assert got == [b"0", b"1", b"2", b"3", b"4"]


def test_v5_topic_alias_above_maximum(raw):
    # 5.0 3.3.2.3.4: an alias greater than the server's Topic Alias Maximum -> DISCONNECT 0x94.
    c = raw()
    c.send(connect_packet_5("alias-big"))
    first, body = c.read_packet()
    assert first == 0x20
    props = b"\x23\xff\xff"   # Topic Alias 65535 (default maximum is 64)
    c.send(packet(0x30, mqtt_str("a/b") + bytes([len(props)]) + props + b"x"))
    try:
        first, body = c.read_packet()
    except EOFError:
        pytest.fail("connection closed without DISCONNECT reason code")
    assert first == 0xE0 and body[:1] == b"\x94", f"got {first:#x} {body!r}"
