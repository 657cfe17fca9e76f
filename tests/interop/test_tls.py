"""MQTT over TLS with real clients: paho-mqtt (Python's ssl, OpenSSL) and
Debian's mosquitto_pub / mosquitto_sub (OpenSSL), verifying the broker's
certificate against the test CA in tests/certs."""

import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import types

import paho.mqtt.client as mqtt
import pytest

from conftest import REPO_ROOT, WAIT

CERTS = REPO_ROOT / "tests" / "certs"
CA = str(CERTS / "ca.pem")
TLS_RE = re.compile(r"MQTT/TLS listener ready addr=([0-9.]+):(\d+)")
WSS_RE = re.compile(r"MQTT/WSS listener ready addr=([0-9.]+):(\d+)")


@pytest.fixture
def tls_broker(broker_factory):
    b = broker_factory(
        "[listeners]\n"
        'tls = ["127.0.0.1:0"]\n'
        'wss = ["127.0.0.1:0"]\n'
        f'tls_cert = "{CERTS / "server.pem"}"\n'
        f'tls_key = "{CERTS / "server.key"}"\n'
    )
    b.tls = _listener(b, TLS_RE)
    b.wss = _listener(b, WSS_RE)
    return b


def _listener(b, pattern):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for line in b.log_lines:
            m = pattern.search(line)
            if m:
                return types.SimpleNamespace(host=m.group(1), port=int(m.group(2)))
        time.sleep(0.02)
    raise AssertionError(f"no {pattern.pattern} line in the log:\n" + b.log())


def paho_tls(paho, broker, client_id, protocol=mqtt.MQTTv311, ca=CA):
    """A paho client (stopped by the fixture) set up for TLS, not connected."""
    c = paho(client_id, protocol, broker_=broker.tls, connect=False)
    c.c.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
    return c


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_paho_over_tls_receives_from_mosquitto_pub_over_tls(tls_broker, mosq, paho, protocol):
    sub = paho_tls(paho, tls_broker, "tls-paho", protocol)
    sub.connect()
    sub.subscribe("tls/#", 1)
    mosq.pub("tls/t", "secret", qos=1, broker_=tls_broker.tls, extra=["--cafile", CA])
    m = sub.get()
    assert (m.topic, m.payload) == ("tls/t", b"secret")
    # mosquitto_pub names the server by its IP address in the handshake,
    # which the TLS library would log as a warning per connection.
    assert not [l for l in tls_broker.log_lines if "WARN" in l], tls_broker.log()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_paho_over_secure_websocket(tls_broker, paho, protocol):
    """wss:// with paho's WebSocket transport over Python's TLS."""
    def client(client_id):
        c = paho(client_id, protocol, broker_=tls_broker.wss, connect=False,
                 transport="websockets")
        c.c.ws_set_options(path="/mqtt")
        c.c.tls_set(ca_certs=CA, cert_reqs=ssl.CERT_REQUIRED)
        c.connect()
        return c
    sub = client("wss-sub")
    sub.subscribe("wss/#", 1)
    pub = client("wss-pub")
    payload = bytes(range(256)) * 400   # 100 KiB: many TLS records and frames
    pub.publish("wss/t", payload, qos=1)
    m = sub.get()
    assert (m.topic, m.payload) == ("wss/t", payload)


def test_mosquitto_sub_over_tls_receives_from_plain_tcp(tls_broker, mosq, paho):
    sub = mosq.sub("mixed/#", qos=1, broker_=tls_broker.tls, extra=["--cafile", CA])
    pub = paho("plain-pub", broker_=tls_broker)
    pub.publish("mixed/x", b"from tcp", qos=1)
    assert sub.get()["payload"] == b"from tcp"


def test_plain_mqtt_to_the_tls_port_fails(tls_broker):
    # mosquitto_pub without --cafile speaks plain MQTT to the TLS port.
    r = subprocess.run(
        ["mosquitto_pub", "-h", tls_broker.tls.host, "-p", str(tls_broker.tls.port),
         "-t", "x", "-m", "y", "-q", "1"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT + 5)
    assert r.returncode != 0, r.stdout + r.stderr
    assert _eventually_logged(tls_broker, "TLS handshake failed"), tls_broker.log()


def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_broker, paho):
    # The server certificate itself as the only "CA": it is not a CA and did
    # not sign itself, so verification fails on the client's side.
    c = paho_tls(paho, tls_broker, "distrust", ca=str(CERTS / "server.pem"))
    with pytest.raises(ssl.SSLError):
        c.c.connect(tls_broker.tls.host, tls_broker.tls.port, 30)


def _eventually_logged(broker, text):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if any(text in line for line in broker.log_lines):
            return True
        time.sleep(0.05)
    return False


def _mtls_broker(broker_factory, listeners="", rest=""):
    """A broker with a TLS listener that requires a client certificate from
    the test CA; `listeners` adds lines to [listeners], `rest` tables after
    it."""
    b = broker_factory(
        "[listeners]\n"
        'tls = ["127.0.0.1:0"]\n'
        f'tls_cert = "{CERTS / "server.pem"}"\n'
        f'tls_key = "{CERTS / "server.key"}"\n'
        f'tls_client_ca = "{CA}"\n' + listeners + rest
    )
    b.tls = _listener(b, TLS_RE)
    return b


@pytest.fixture
def mtls_broker(broker_factory):
    """TLS listeners that require a client certificate from the test CA, and
    no anonymous clients."""
    return _mtls_broker(broker_factory, rest="[auth]\nallow_anonymous = false\n")


def test_client_certificates_with_paho_and_mosquitto(mtls_broker, paho, mosq):
    # paho with the CA-signed client certificate: authenticated by it alone.
    sub = paho("cert-sub", broker_=mtls_broker.tls, connect=False)
    sub.c.tls_set(ca_certs=CA, certfile=str(CERTS / "client.pem"),
                  keyfile=str(CERTS / "client.key"), cert_reqs=ssl.CERT_REQUIRED)
    sub.connect()
    sub.subscribe("mtls/#", 1)
    # mosquitto_pub with the same certificate.
    mosq.pub("mtls/t", "signed", qos=1, broker_=mtls_broker.tls,
             extra=["--cafile", CA, "--cert", str(CERTS / "client.pem"),
                    "--key", str(CERTS / "client.key")])
    m = sub.get()
    assert (m.topic, m.payload) == ("mtls/t", b"signed")
    # Without a certificate, or with one the CA did not sign: refused.
    for extra in (["--cafile", CA],
                  ["--cafile", CA, "--cert", str(CERTS / "rogue.pem"),
                   "--key", str(CERTS / "rogue.key")]):
        r = mosq.pub("mtls/t", "x", qos=1, broker_=mtls_broker.tls, extra=extra, check=False)
        assert r.returncode != 0, (extra, r.stdout, r.stderr)
    sub.assert_no_message()


def test_a_certificate_common_name_is_the_acl_user(broker_factory, paho, mosq):
    """With tls_client_identity = "common_name", client.pem (CN sensor-1) is
    the user sensor-1 for the ACL: its own topics and no one else's; a
    certificate from the CA that names no one is refused."""
    b = _mtls_broker(
        broker_factory,
        listeners='tls_client_identity = "common_name"\n',
        rest='[[auth.acl]]\nuser = "sensor-1"\ntopic = "devices/%u/#"\naccess = "all"\n',
    )
    cert = ["--cafile", CA, "--cert", str(CERTS / "client.pem"),
            "--key", str(CERTS / "client.key")]
    sub = paho("cn-sub", mqtt.MQTTv5, broker_=b.tls, connect=False)
    sub.c.tls_set(ca_certs=CA, certfile=str(CERTS / "client.pem"),
                  keyfile=str(CERTS / "client.key"), cert_reqs=ssl.CERT_REQUIRED)
    sub.connect()
    # devices/# covers more than devices/sensor-1/#: not authorized (0x87).
    assert [rc.value for rc in sub.subscribe("devices/#", 1)] == [0x87]
    assert [rc.value for rc in sub.subscribe("devices/sensor-1/#", 1)] == [1]
    mosq.pub("devices/sensor-2/t", "not mine", qos=1, version="mqttv5", broker_=b.tls,
             extra=cert, check=False)
    mosq.pub("devices/sensor-1/t", "mine", qos=1, version="mqttv5", broker_=b.tls, extra=cert)
    m = sub.get()
    assert (m.topic, m.payload) == ("devices/sensor-1/t", b"mine")
    sub.assert_no_message()
    nameless = ["--cafile", CA, "--cert", str(CERTS / "nameless.pem"),
                "--key", str(CERTS / "nameless.key")]
    r = mosq.pub("devices/x", "x", qos=1, version="mqttv5", broker_=b.tls, extra=nameless,
                 check=False)
    assert r.returncode != 0, (r.stdout, r.stderr)


def test_a_revoked_client_certificate_is_refused(broker_factory, mosq, paho):
    """tls_client_crl: mosquitto_pub with the certificate crl.pem revokes
    cannot connect; with another from the same CA it can."""
    b = _mtls_broker(broker_factory, listeners=f'tls_client_crl = "{CERTS / "crl.pem"}"\n')
    sub = paho("crl-sub", broker_=b)
    sub.subscribe("crl/#", 1)

    def pub(name, check=True):
        return mosq.pub("crl/t", name, qos=1, broker_=b.tls, check=check,
                        extra=["--cafile", CA, "--cert", str(CERTS / f"{name}.pem"),
                               "--key", str(CERTS / f"{name}.key")])
    r = pub("revoked", check=False)
    assert r.returncode != 0, (r.stdout, r.stderr)
    pub("client")
    m = sub.get()
    assert (m.topic, m.payload) == ("crl/t", b"client")
    sub.assert_no_message()


def _presented(listener):
    """The certificate (DER) an OpenSSL client is shown, verified against the test CA."""
    ctx = ssl.create_default_context(cafile=CA)
    with socket.create_connection((listener.host, listener.port), timeout=WAIT) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            return t.getpeercert(binary_form=True)


def test_sighup_reloads_the_certificate(broker_factory, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(CERTS / "server.pem", cert)
    shutil.copy(CERTS / "server.key", key)
    b = broker_factory(
        "[listeners]\n"
        'tls = ["127.0.0.1:0"]\n'
        f'tls_cert = "{cert}"\n'
        f'tls_key = "{key}"\n'
    )
    tls = _listener(b, TLS_RE)
    der = lambda name: ssl.PEM_cert_to_DER_cert((CERTS / name).read_text())  # noqa: E731
    assert _presented(tls) == der("server.pem")
    # Renewed files, then SIGHUP: new connections get the new certificate.
    shutil.copy(CERTS / "server2.pem", cert)
    shutil.copy(CERTS / "server2.key", key)
    b.proc.send_signal(signal.SIGHUP)
    assert _eventually_logged(b, "TLS certificate reloaded"), b.log()
    assert _presented(tls) == der("server2.pem")
    # A broken renewal: logged, and the certificate in use stays.
    key.write_text("not a key")
    b.proc.send_signal(signal.SIGHUP)
    assert _eventually_logged(b, "TLS certificate not reloaded"), b.log()
    assert _presented(tls) == der("server2.pem")
    assert b.proc.poll() is None, "the broker keeps running"
