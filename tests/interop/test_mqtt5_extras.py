"""MQTT 5 features with paho-mqtt that the other files leave out: payload
format refusal, Response Information, server redirect, and the enhanced
authentication method check. (paho-mqtt cannot continue an AUTH exchange, so
the full SCRAM-SHA-256 flow is proven in broker/tests/enhanced_auth.rs with
an independent SCRAM client.)"""

import paho.mqtt.client as mqtt

from conftest import connect_props, publish_props

V5 = mqtt.MQTTv5
V311 = mqtt.MQTTv311


def test_v5_invalid_utf8_with_payload_format_indicator_is_refused(paho):
    sub = paho("pf-sub", V5)
    sub.subscribe("pf/t", 1)
    pub = paho("pf-pub", V5)
    rc = pub.publish("pf/t", b"\xff\xfe", qos=1, properties=publish_props(PayloadFormatIndicator=1))
    assert rc.value == 0x99, f"expected PUBACK 0x99 (payload format invalid), got {rc} ({rc.value:#x})"
    sub.assert_no_message()
    rc = pub.publish("pf/t", "valid text".encode(), qos=1, properties=publish_props(PayloadFormatIndicator=1))
    assert rc.value == 0
    assert sub.get().payload == b"valid text"


def test_v5_request_response_information(paho):
    asker = paho("rri", V5, properties=connect_props(RequestResponseInformation=1))
    info = getattr(asker.connack_props, "ResponseInformation", None)
    assert info == "response/rri", f"got {info!r}"
    quiet = paho("no-rri", V5)
    assert getattr(quiet.connack_props, "ResponseInformation", None) is None


def test_v5_server_reference_redirects(broker_factory, paho):
    b = broker_factory('[listeners]\ntcp = ["127.0.0.1:0"]\n[mqtt]\nserver_reference = "other:1883"\n')
    c = paho("redirected", V5, broker_=b, connect=False)
    _, rc, props = c.connect(expect_success=False)
    assert rc.value == 0x9C, f"expected 0x9C (use another server), got {rc} ({rc.value:#x})"
    assert getattr(props, "ServerReference", None) == "other:1883"
    # 3.1.1 clients cannot be redirected: they are served.
    old = paho("old", V311, broker_=b)
    assert old.connack_rc.value == 0


def test_v5_unknown_authentication_method_is_0x8c(paho):
    c = paho("auth", V5, properties=connect_props(AuthenticationMethod="KERBEROS-V9"), connect=False)
    _, rc, _ = c.connect(expect_success=False)
    assert rc.value == 0x8C, f"expected 0x8C (bad authentication method), got {rc} ({rc.value:#x})"
