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


DENY_RULES = (
    "[[auth.acl]]\n"
    'topic = "#"\n'
    'access = "all"\n'
    "[[auth.acl]]\n"
    'topic = "test/nosubscribe"\n'
    'access = "subscribe"\n'
    'permission = "deny"\n'
)


def test_a_deny_rule_refuses_its_topic_and_withholds_it_from_wildcards(broker_factory, paho, mosq):
    # The rule Eclipse Paho's interoperability suite asks of a broker for its
    # subscribe-failure test, with everything else allowed.
    b = broker_factory(DENY_RULES)
    v311 = paho("sub311", broker_=b)
    assert [c.value for c in v311.subscribe("test/nosubscribe", 2)] == [0x80]
    v5 = paho("sub5", V5, broker_=b)
    assert [c.value for c in v5.subscribe("test/nosubscribe", 2)] == [0x87]
    assert [c.value for c in v5.subscribe("test/#", 1)] == [1]
    every = mosq.sub("#", broker_=b, client_id="every", qos=1)
    assert every.granted == [1], every.lines
    pub = paho("pub", V5, broker_=b)
    assert pub.publish("test/nosubscribe", b"hidden", qos=1).value == 0x00
    assert pub.publish("test/open", b"seen", qos=1).value == 0x00
    m = v5.get()
    assert (m.topic, m.payload) == ("test/open", b"seen")
    assert every.get()["topic"] == "test/open"
    v5.assert_no_message()
    every.assert_no_message()


def test_sighup_reloads_auth_and_disconnects_only_the_changed(broker_factory, paho):
    import signal
    b = broker_factory(RULES)
    ops = paho("console", V5, broker_=b, connect=False, username="ops", password="secret")
    ops.connect()
    ops.subscribe("devices/#", 1)
    d1 = paho("d1", V5, broker_=b)
    assert d1.publish("devices/d1/temp", b"21", qos=1).value == 0x00
    assert ops.get().payload == b"21"

    # ops's password changes; the rules of anonymous clients like d1 do not.
    config = b.tmpdir + "/tern.toml"
    with open(config, "w") as f:
        f.write(RULES.replace('password = "secret"', 'password = "renewed"'))
    b.proc.send_signal(signal.SIGHUP)
    rc, _ = ops.wait_disconnect()
    assert rc.value == 0x87, f"DISCONNECT 0x87 expected, got {rc}"
    b.wait_for_log("[auth] reloaded")
    assert d1.publish("devices/d1/temp", b"22", qos=1).value == 0x00

    old = paho("console", V5, broker_=b, connect=False, username="ops", password="secret")
    old.connect(expect_success=False)
    assert old.connack_rc.value == 0x86, old.connack_rc
    new = paho("console", V5, broker_=b, connect=False, username="ops", password="renewed")
    new.connect()
    new.subscribe("devices/#", 1)
    assert d1.publish("devices/d1/temp", b"23", qos=1).value == 0x00
    assert new.get().payload == b"23"
