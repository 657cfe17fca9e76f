"""Topic permissions ([[auth.acl]]) with real clients: paho-mqtt over MQTT 5
(reason codes 0x87) and 3.1.1 (SUBACK 0x80), mosquitto_sub."""

import paho.mqtt.client as mqtt
import pytest

V5 = mqtt.MQTTv5

RULES = (
    "[[auth.users]]\n"
    'name = "ops"\n'
    'password = "secret"\n'
    "[[auth.acl]]\n"
    'topic = "public/#"\n'
    'access = "all"\n'
    "[[auth.acl]]\n"
    'topic = "devices/%c/#"\n'
    'access = "publish"\n'
    "[[auth.acl]]\n"
    'user = "ops"\n'
    'topic = "devices/#"\n'
    'access = "subscribe"\n'
)


@pytest.fixture
def acl_broker(broker_factory):
    return broker_factory(RULES)


def test_v5_publish_outside_the_rules_gets_0x87(acl_broker, paho):
    ops = paho("console", V5, broker_=acl_broker, connect=False, username="ops",
               password="secret")
    ops.connect()
    ops.subscribe("devices/#", 1)
    d1 = paho("d1", V5, broker_=acl_broker)
    assert d1.publish("devices/d1/temp", b"21", qos=1).value == 0x00
    m = ops.get()
    assert (m.topic, m.payload) == ("devices/d1/temp", b"21")
    rc = d1.publish("devices/d2/temp", b"99", qos=1)
    assert rc.value == 0x87, f"PUBACK 0x87 expected, got {rc}"
    ops.assert_no_message()


def test_subscriptions_outside_the_rules_are_refused(acl_broker, paho, mosq):
    d1 = paho("d1", V5, broker_=acl_broker)
    granted = d1.subscribe("devices/#", 1)
    assert [c.value for c in granted] == [0x87], granted
    granted = d1.subscribe("public/+", 1)
    assert [c.value for c in granted] == [1], granted
    # MQTT 3.1.1 has one failure code: 0x80.
    sub = mosq.sub("devices/#", broker_=acl_broker, client_id="d9")
    assert sub.granted == [128], sub.lines
