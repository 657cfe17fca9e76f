"""What an operator watches: the Prometheus endpoint, read with the official
Prometheus client library's parser, and the $SYS topics, read with
mosquitto_sub and paho-mqtt, while paho-mqtt clients make traffic."""

import json
import re
import time
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import WAIT

ADMIN_RE = re.compile(r"admin endpoint ready \(read-only\) addr=([0-9.]+):(\d+)")


def admin_url(broker) -> str:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for line in broker.log_lines:
            m = ADMIN_RE.search(line)
            if m:
                return f"http://{m.group(1)}:{m.group(2)}"
        time.sleep(0.02)
    raise AssertionError("no admin endpoint line in the log:\n" + broker.log())


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def scrape(broker) -> dict:
    status, content_type, text = get(admin_url(broker) + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        for s in family.samples:
            samples[s.name] = s.value
    return samples


def test_metrics_parse_as_prometheus_text_and_count_traffic(broker, paho):
    before = scrape(broker)
    assert before["tern_connections"] == 0
    sub = paho("obs-sub")
    sub.subscribe("obs/#", 1)
    pub = paho("obs-pub")
    for i in range(10):
        pub.publish("obs/t", b"m%d" % i, qos=1)
    sub.get_n(10)
    after = scrape(broker)
    assert after["tern_messages_received_total"] - before["tern_messages_received_total"] == 10
    assert after["tern_messages_delivered_total"] - before["tern_messages_delivered_total"] == 10
    assert after["tern_connections"] == 2
    assert after["tern_subscriptions"] == 1
    # A broker with a store (fsync, the default) reports its writer.
    assert after["tern_store_failures_total"] == 0
    assert after["tern_build_info"] == 1


def test_health_answers_json(broker):
    status, content_type, body = get(admin_url(broker) + "/health")
    assert status == 200
    assert content_type == "application/json"
    health = json.loads(body)
    assert health["status"] == "serving"
    assert health["durability"] == "fsync"
    assert health["store_failures"] == 0


def test_sys_topics_with_mosquitto_sub(broker, mosq):
    # Retained, so a new subscriber gets the current values at once.
    sub = mosq.sub(["$SYS/broker/version", "$SYS/broker/clients/connected"])
    got = {m["topic"]: m for m in sub.get_n(2)}
    assert got["$SYS/broker/version"]["payload"].startswith(b"tern ")
    assert got["$SYS/broker/version"]["retain"] == 1
    assert int(got["$SYS/broker/clients/connected"]["payload"]) >= 0


@pytest.mark.parametrize("proto", ["v311", "v5"])
def test_sys_topics_update_and_stay_out_of_wildcards(broker_factory, paho, proto):
    b = broker_factory("[mqtt]\nsys_interval_secs = 1\n")
    protocol = mqtt.MQTTv5 if proto == "v5" else mqtt.MQTTv311
    watcher = paho("sys-watch", protocol, broker_=b)
    watcher.subscribe("$SYS/broker/clients/connected", 0)
    wildcard = paho("sys-wild", protocol, broker_=b)
    wildcard.subscribe("#", 0)
    paho("sys-extra", protocol, broker_=b)
    # Within a few rounds the figure counts the three connections.
    deadline = time.monotonic() + WAIT
    seen = []
    while time.monotonic() < deadline and b"3" not in seen:
        seen.append(watcher.get(timeout=max(0.01, deadline - time.monotonic())).payload)
    assert b"3" in seen, seen
    wildcard.assert_no_message(wait=1.2)
