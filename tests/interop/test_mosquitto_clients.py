"""Interoperability with the Debian mosquitto_pub / mosquitto_sub command line clients."""

import os
import signal
import time

import pytest

from conftest import WAIT, mqtt

VERSIONS = pytest.mark.parametrize("version", ["mqttv311", "mqttv5"], ids=["v311", "v5"])


@VERSIONS
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_pub_to_sub(mosq, version, qos):
    sub = mosq.sub("mq/t/#", version=version, qos=2)
    assert sub.granted == [2]
    for i in range(3):
        mosq.pub(f"mq/t/{i}", f"payload-{qos}-{i}", version=version, qos=qos)
    got = sub.get_n(3)
    assert sorted((m["topic"], m["payload"]) for m in got) == [
        (f"mq/t/{i}", f"payload-{qos}-{i}".encode()) for i in range(3)]
    assert all(m["qos"] == qos for m in got)
    assert all(m["retain"] == 0 for m in got)
    sub.assert_no_message()


@VERSIONS
def test_qos_downgrade(mosq, version):
    sub = mosq.sub("mq/down", version=version, qos=1)
    assert sub.granted == [1]
    mosq.pub("mq/down", "two", version=version, qos=2)
    m = sub.get()
    assert (m["payload"], m["qos"]) == (b"two", 1)


@VERSIONS
def test_binary_payload_from_file(mosq, version, tmp_path):
    data = bytes(range(256)) * 64 + os.urandom(4096)
    f = tmp_path / "payload.bin"
    f.write_bytes(data)
    sub = mosq.sub("mq/bin", version=version, qos=1)
    mosq.pub("mq/bin", version=version, qos=1, payload_file=f)
    assert sub.get()["payload"] == data


@VERSIONS
def test_retained(mosq, version):
    mosq.pub("mq/ret", "v1", version=version, qos=1, retain=True)
    mosq.pub("mq/ret", "v2", version=version, qos=1, retain=True)
    s1 = mosq.sub("mq/ret", version=version, qos=1, count=1, timeout_s=5)
    m = s1.get()
    assert (m["payload"], m["retain"], m["qos"]) == (b"v2", 1, 1)
    assert s1.wait_exit() == 0

    # Delete with an empty retained message (-r -n).
    mosq.pub("mq/ret", version=version, qos=1, retain=True, null=True)
    s2 = mosq.sub("mq/ret", version=version, qos=1)
    s2.assert_no_message()
    mosq.pub("mq/ret", "live", version=version, qos=1)
    m = s2.get()
    assert (m["payload"], m["retain"]) == (b"live", 0)


@VERSIONS
def test_will_fires_on_sigkill(mosq, version):
    watcher = mosq.sub("mq/will/#", version=version, qos=1)
    victim = mosq.sub("mq/unused", version=version, client_id=f"victim-{version}",
                      extra=["--will-topic", "mq/will/victim", "--will-payload", "victim died",
                             "--will-qos", "1"])
    watcher.assert_no_message(wait=0.2)
    victim.signal(signal.SIGKILL)
    m = watcher.get()
    assert (m["topic"], m["payload"], m["qos"]) == ("mq/will/victim", b"victim died", 1)


@VERSIONS
def test_no_will_on_clean_exit(mosq, version):
    watcher = mosq.sub("mq/will/#", version=version, qos=1)
    polite = mosq.sub("mq/unused", version=version, count=1, timeout_s=10,
                      extra=["--will-topic", "mq/will/polite", "--will-payload", "x"])
    mosq.pub("mq/unused", "done", version=version)  # -C 1: exits with DISCONNECT after one message
    assert polite.wait_exit() == 0
    watcher.assert_no_message(wait=0.8)


@VERSIONS
def test_persistent_session_receives_queued_messages(mosq, version):
    cid = f"persistent-{version}"
    first = mosq.sub("mq/ps/#", version=version, qos=1, client_id=cid, extra=["-c"])
    first.signal(signal.SIGINT)   # mosquitto_sub disconnects cleanly on SIGINT
    first.wait_exit()

    for i in range(3):
        mosq.pub(f"mq/ps/{i}", f"queued-{i}", version=version, qos=1)
    mosq.pub("mq/ps/q2", "queued-q2", version=version, qos=2)

    second = mosq.sub("mq/ps/#", version=version, qos=1, client_id=cid, extra=["-c"],
                      count=4, timeout_s=10, wait_subscribed=False)
    got = second.get_n(4)
    assert sorted(m["payload"] for m in got) == [b"queued-0", b"queued-1", b"queued-2", b"queued-q2"]
    assert all(m["qos"] == 1 for m in got)
    assert second.wait_exit() == 0


def test_v5_properties_forwarded(mosq):
    sub = mosq.sub("mq/props", version="mqttv5", qos=1)
    mosq.pub("mq/props", "p", version="mqttv5", qos=1,
             extra=["-D", "publish", "user-property", "color", "blue",
                    "-D", "publish", "message-expiry-interval", "120"])
    m = sub.get()
    assert m["payload"] == b"p"
    assert "color:blue" in m["props"]
    assert m["expiry"] and 0 < int(m["expiry"]) <= 120


def test_v5_dollar_topic_puback_0x87(mosq):
    spy = mosq.sub(["#", "$SYS/forged"], version="mqttv5", qos=1)
    r = mosq.pub("$SYS/forged", "x", version="mqttv5", qos=1, debug=True, check=False)
    out = r.stdout.decode() + r.stderr.decode()
    assert "received PUBACK (Mid: 1, RC:135)" in out, out
    spy.assert_no_message()


def test_shared_subscription_two_mosquitto_subs(mosq):
    a = mosq.sub("$share/grp/mq/sh", version="mqttv5", qos=1)
    b = mosq.sub("$share/grp/mq/sh", version="mqttv5", qos=1)
    for i in range(6):
        mosq.pub("mq/sh", str(i), version="mqttv5", qos=1)
    got_a, got_b = [], []
    deadline = time.monotonic() + WAIT
    while len(got_a) + len(got_b) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
        while not a.messages.empty():
            got_a.append(int(a.messages.get_nowait()["payload"]))
        while not b.messages.empty():
            got_b.append(int(b.messages.get_nowait()["payload"]))
    a.assert_no_message(wait=0.2)
    b.assert_no_message(wait=0.0)
    assert sorted(got_a + got_b) == list(range(6))
    assert got_a and got_b, f"a={got_a} b={got_b}"


@pytest.mark.parametrize("pub_version,sub_version", [("mqttv5", "mqttv311"), ("mqttv311", "mqttv5")])
def test_cross_version_mosquitto(mosq, pub_version, sub_version):
    sub = mosq.sub("mq/x", version=sub_version, qos=2)
    mosq.pub("mq/x", "cross", version=pub_version, qos=2, retain=False)
    m = sub.get()
    assert (m["payload"], m["qos"]) == (b"cross", 2)


def test_paho_and_mosquitto_together(mosq, paho):
    # paho v5 publisher -> mosquitto_sub 3.1.1; mosquitto_pub 3.1.1 -> paho v5 subscriber.
    msub = mosq.sub("mix/#", version="mqttv311", qos=1)
    psub = paho("psub", mqtt.MQTTv5)
    psub.subscribe("mix/#", 1)
    ppub = paho("ppub", mqtt.MQTTv5)
    ppub.publish("mix/from-paho", b"p5", qos=1)
    mosq.pub("mix/from-mosq", "m311", version="mqttv311", qos=1)
    got_m = sorted((m["topic"], m["payload"]) for m in msub.get_n(2))
    got_p = sorted((m.topic, m.payload) for m in psub.get_n(2))
    expected = [("mix/from-mosq", b"m311"), ("mix/from-paho", b"p5")]
    assert got_m == expected
    assert got_p == expected
