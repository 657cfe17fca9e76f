"""Shared fixtures for the Tern interoperability tests.

Every test gets its own broker process on an ephemeral port (parsed from the
"MQTT/TCP listener ready addr=..." log line), so tests are independent and can
run in parallel. The broker binary comes from $TERN_BIN (default
target/debug/tern, relative to the repository root).

The clients are real third-party clients: paho-mqtt (Python) and the Debian
mosquitto_pub / mosquitto_sub tools. Every process and client a test starts is
stopped by a finalizer, and every wait is bounded.
"""

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

REPO_ROOT = Path(__file__).resolve().parents[2]

# Default bound for one wait (a CONNACK, a SUBACK, a message that must arrive).
WAIT = 5.0
# How long to wait before concluding that something did NOT arrive.
QUIET = 0.4
# Safety net per test when pytest-timeout is not installed.
TEST_TIMEOUT = 40

READY_RE = re.compile(r"MQTT/TCP listener ready addr=([0-9.]+):(\d+)")


def tern_bin() -> Path:
    p = Path(os.environ.get("TERN_BIN", "target/debug/tern"))
    if not p.is_absolute():
        p = REPO_ROOT / p
    return p


# --------------------------------------------------------------------------
# Per-test hard timeout (safety net; explicit timeouts are used everywhere).
# --------------------------------------------------------------------------

def _have_pytest_timeout() -> bool:
    try:
        import pytest_timeout  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(autouse=True)
def _hard_timeout(request):
    if _have_pytest_timeout() or threading.current_thread() is not threading.main_thread():
        yield
        return
    # A module may set its own TEST_TIMEOUT (the crash tests need longer).
    limit = getattr(request.module, "TEST_TIMEOUT", TEST_TIMEOUT)

    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded {limit}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------
# Broker process
# --------------------------------------------------------------------------

class Broker:
    def __init__(self, config_text=None):
        binary = tern_bin()
        if not binary.exists():
            pytest.fail(f"broker binary {binary} not found (set TERN_BIN)")
        self.tmpdir = tempfile.mkdtemp(prefix="tern-interop-")
        # The default durability (fsync) with a store of its own per broker.
        args = [str(binary), "serve", "--bind", "127.0.0.1:0", "--ws-bind", "127.0.0.1:0",
                "--admin-bind", "127.0.0.1:0", "--data-dir", str(Path(self.tmpdir) / "data"),
                "--log-level", "info"]
        if config_text is not None:
            cfg = Path(self.tmpdir) / "tern.toml"
            cfg.write_text(config_text)
            args += ["--config", str(cfg)]
        self.log_lines = []
        self._ready = threading.Event()
        self.host = "127.0.0.1"
        self.port = None
        env = dict(os.environ, NO_COLOR="1")
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(10):
            self.stop()
            pytest.fail("broker did not report a ready listener within 10 s; log:\n" + self.log())

    def _read_log(self):
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log_lines.append(line)
            if self.port is None:
                m = READY_RE.search(line)
                if m:
                    self.host, self.port = m.group(1), int(m.group(2))
                    self._ready.set()
        self._ready.set()

    def log(self) -> str:
        return "\n".join(self.log_lines)

    def wait_for_log(self, needle, timeout=10.0):
        """Waits until a line of the broker's log contains `needle` (the log is
        read in the background, so a line can lag what a client saw)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in self.log_lines):
                return
            time.sleep(0.05)
        raise AssertionError(f"no log line with {needle!r}:\n" + self.log())

    def terminate(self, timeout=10.0):
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None

    def stop(self):
        if self.proc.poll() is None:
            self.terminate(5)
        close_log_reader(self._reader, self.proc)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def close_log_reader(reader: threading.Thread, proc: subprocess.Popen):
    """Joins the thread reading a broker's stderr, then closes the pipe."""
    reader.join(2)
    if not reader.is_alive():
        try:
            proc.stderr.close()
        except Exception:
            pass


@pytest.fixture
def broker_factory():
    started = []

    def make(config_text=None) -> Broker:
        b = Broker(config_text)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()
    panics = [line for b in started for line in b.log_lines if "panicked" in line]
    if panics:
        pytest.fail("broker panicked:\n" + "\n".join(panics))


@pytest.fixture
def broker(broker_factory) -> Broker:
    return broker_factory()


# --------------------------------------------------------------------------
# paho-mqtt wrapper
# --------------------------------------------------------------------------

class PahoClient:
    """A paho client with a background network loop and queues of events."""

    def __init__(self, broker, client_id="", protocol=mqtt.MQTTv311,
                 clean=True, properties=None, will=None, keepalive=30,
                 connect=True, username=None, password=None, transport="tcp"):
        self.broker = broker
        self.protocol = protocol
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.subacks = {}
        self.unsubacks = {}
        self.pubacks = {}
        self.disconnects = queue.Queue()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        kwargs = dict(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                      client_id=client_id, protocol=protocol,
                      reconnect_on_failure=False, transport=transport)
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        self.clean = clean
        self.c = mqtt.Client(**kwargs)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = self._on_disconnect
        if username is not None:
            self.c.username_pw_set(username, password)
        if will is not None:
            self.c.will_set(**will)
        self.connect_properties = properties
        self.keepalive = keepalive
        self.flags = None
        self.connack_rc = None
        self.connack_props = None
        self._started = False
        if connect:
            self.connect()

    # callbacks -----------------------------------------------------------
    def _on_connect(self, client, userdata, flags, rc, props):
        self.connacks.put((flags, rc, props))

    def _on_message(self, client, userdata, msg):
        self.messages.put(msg)

    def _on_subscribe(self, client, userdata, mid, rcs, props):
        with self._cond:
            self.subacks[mid] = (rcs, props)
            self._cond.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, rcs, props):
        with self._cond:
            self.unsubacks[mid] = (rcs, props)
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, rc, props):
        with self._cond:
            self.pubacks[mid] = (rc, props)
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, dflags, rc, props):
        self.disconnects.put((rc, props))

    # actions -------------------------------------------------------------
    def connect(self, timeout=WAIT, expect_success=True):
        kwargs = dict(host=self.broker.host, port=self.broker.port, keepalive=self.keepalive)
        if self.protocol == mqtt.MQTTv5:
            kwargs["clean_start"] = self.clean
            if self.connect_properties is not None:
                kwargs["properties"] = self.connect_properties
        self.c.connect(**kwargs)
        self.c.loop_start()
        self._started = True
        try:
            flags, rc, props = self.connacks.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no CONNACK within %.1fs" % timeout)
        self.flags, self.connack_rc, self.connack_props = flags, rc, props
        if expect_success:
            assert not rc.is_failure, f"CONNACK refused: {rc} ({rc.value:#x})"
        return flags, rc, props

    def _wait_for(self, table, mid, timeout):
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in table:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no acknowledgement for mid {mid} within {timeout}s")
                self._cond.wait(left)
            return table.pop(mid)

    def subscribe(self, topic, qos=0, options=None, properties=None, timeout=WAIT):
        """Subscribe and wait for SUBACK; returns the list of ReasonCodes."""
        if options is not None:
            result, mid = self.c.subscribe(topic, options=options, properties=properties)
        elif isinstance(topic, list):
            result, mid = self.c.subscribe(topic, properties=properties)
        else:
            result, mid = self.c.subscribe(topic, qos, properties=properties)
        assert result == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {result}"
        rcs, _props = self._wait_for(self.subacks, mid, timeout)
        return rcs

    def unsubscribe(self, topic, timeout=WAIT):
        result, mid = self.c.unsubscribe(topic)
        assert result == mqtt.MQTT_ERR_SUCCESS
        return self._wait_for(self.unsubacks, mid, timeout)[0]

    def publish(self, topic, payload=b"", qos=0, retain=False, properties=None, timeout=WAIT):
        """Publish; for QoS > 0 wait for the flow to complete. Returns the reason code (v5) or None."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed locally: {info.rc}"
        rc, _props = self._wait_for(self.pubacks, info.mid, timeout)
        return rc

    def get(self, timeout=WAIT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout}s")

    def get_n(self, n, timeout=WAIT):
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"expected {n} messages, got {len(out)}: "
                    + repr([(m.topic, m.payload) for m in out]))
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                pass
        return out

    def assert_no_message(self, wait=QUIET):
        try:
            m = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message: topic={m.topic!r} payload={m.payload!r} "
                             f"qos={m.qos} retain={m.retain}")

    def drain(self, wait=QUIET):
        out = []
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                return out

    def wait_disconnect(self, timeout=WAIT):
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"not disconnected within {timeout}s")

    def disconnect(self, reasoncode=None, properties=None):
        if self.c.is_connected():
            self.c.disconnect(reasoncode=reasoncode, properties=properties)
            try:
                self.disconnects.get(timeout=WAIT)
            except queue.Empty:
                pass
        self.stop_loop()

    def kill_socket(self):
        """Close the TCP connection abruptly, without sending DISCONNECT."""
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            try:
                # Wakes paho's network thread at once (it sees the connection lost and,
                # with reconnect_on_failure=False, ends) without any DISCONNECT on the wire.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.stop_loop()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def stop_loop(self):
        if self._started:
            self._started = False
            self.c.loop_stop()

    def close(self):
        try:
            if self.c.is_connected():
                self.c.disconnect()
        except Exception:
            pass
        self.stop_loop()
        try:
            sock = self.c.socket()
            if sock is not None:
                sock.close()
        except Exception:
            pass


@pytest.fixture
def paho(broker):
    """Factory: paho(client_id=..., protocol=..., ...) -> connected PahoClient on `broker`."""
    clients = []

    def make(client_id="", protocol=mqtt.MQTTv311, broker_=None, connect=True, **kw):
        c = PahoClient(broker_ or broker, client_id=client_id, protocol=protocol,
                       connect=False, **kw)
        clients.append(c)   # registered before connecting, so a failed connect is cleaned up
        if connect:
            c.connect()
        return c

    yield make
    for c in clients:
        c.close()


def v5_props(packet_type, **values):
    p = Properties(packet_type)
    for k, v in values.items():
        setattr(p, k, v)
    return p


def connect_props(**values):
    return v5_props(PacketTypes.CONNECT, **values)


def publish_props(**values):
    return v5_props(PacketTypes.PUBLISH, **values)


# --------------------------------------------------------------------------
# mosquitto_pub / mosquitto_sub
# --------------------------------------------------------------------------

MSG_PREFIX = "MSG|"
MOSQ_FORMAT = MSG_PREFIX + "%q|%r|%E|%x|%P|%t"


class MosqSub:
    """A running mosquitto_sub whose output is parsed in the background."""

    def __init__(self, broker, topics, version="mqttv311", qos=0, extra=(), count=None,
                 timeout_s=None, client_id=None, wait_subscribed=True):
        if shutil.which("mosquitto_sub") is None:
            pytest.skip("mosquitto_sub not installed")
        # mosquitto_sub block-buffers stdout on a pipe; force line buffering.
        prefix = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        args = prefix + ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port),
                "-V", version, "-q", str(qos), "-d", "-F", MOSQ_FORMAT]
        for t in ([topics] if isinstance(topics, str) else topics):
            args += ["-t", t]
        if client_id is not None:
            args += ["-i", client_id]
        if count is not None:
            args += ["-C", str(count)]
        if timeout_s is not None:
            args += ["-W", str(timeout_s)]
        args += list(extra)
        self.args = args
        self.lines = []
        self.messages = queue.Queue()
        self.subscribed = threading.Event()
        self.granted = None
        self.connack = threading.Event()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_subscribed:
            if not self.subscribed.wait(WAIT):
                self.stop()
                raise AssertionError("mosquitto_sub did not get a SUBACK; output:\n" + "\n".join(self.lines))

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if line.startswith(MSG_PREFIX):
                # The topic goes last (it may contain "|"); user properties are
                # only used with simple values in these tests.
                qos, retain, expiry, hexpayload, props, topic = line[len(MSG_PREFIX):].split("|", 5)
                self.messages.put(dict(topic=topic, qos=int(qos), retain=int(retain),
                                       expiry=expiry, props=props,
                                       payload=bytes.fromhex(hexpayload)))
            elif line.startswith("Subscribed (mid:"):
                # "Subscribed (mid: 1): 1" (one granted QoS / reason code per filter)
                self.granted = [int(x) for x in line.split(":", 2)[2].replace(",", " ").split()]
                self.subscribed.set()
            elif "received CONNACK" in line:
                self.connack.set()

    def get(self, timeout=WAIT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"mosquitto_sub got no message within {timeout}s; output:\n"
                                 + "\n".join(self.lines))

    def get_n(self, n, timeout=WAIT):
        deadline = time.monotonic() + timeout
        return [self.get(max(0.01, deadline - time.monotonic())) for _ in range(n)]

    def assert_no_message(self, wait=QUIET):
        try:
            m = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message in mosquitto_sub: {m}")

    def wait_exit(self, timeout=WAIT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("mosquitto_sub did not exit; output:\n" + "\n".join(self.lines))

    def signal(self, sig):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        # The reader sees EOF once the process is gone; close the pipe only after it.
        self._reader.join(2)
        if not self._reader.is_alive():
            try:
                self.proc.stdout.close()
            except Exception:
                pass


@pytest.fixture
def mosq(broker):
    """Helpers to run mosquitto_sub (background) and mosquitto_pub (blocking, bounded)."""
    subs = []

    class Mosq:
        def sub(self, topics, broker_=None, **kw) -> MosqSub:
            s = MosqSub(broker_ or broker, topics, **kw)
            subs.append(s)
            return s

        def pub(self, topic, message=None, version="mqttv311", qos=0, retain=False,
                extra=(), broker_=None, null=False, client_id=None, timeout=WAIT,
                payload_file=None, debug=False, check=True):
            if shutil.which("mosquitto_pub") is None:
                pytest.skip("mosquitto_pub not installed")
            b = broker_ or broker
            args = ["mosquitto_pub", "-h", b.host, "-p", str(b.port), "-V", version,
                    "-q", str(qos), "-t", topic]
            if null:
                args.append("-n")
            elif payload_file is not None:
                args += ["-f", str(payload_file)]
            else:
                args += ["-m", message]
            if retain:
                args.append("-r")
            if client_id is not None:
                args += ["-i", client_id]
            if debug:
                args.append("-d")
            args += list(extra)
            r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
            assert not check or r.returncode == 0, (f"{' '.join(args)} exited {r.returncode}: "
                                       f"{r.stdout.decode()} {r.stderr.decode()}")
            return r

    yield Mosq()
    for s in subs:
        s.stop()


# --------------------------------------------------------------------------
# Raw socket helpers (only for cases a client library cannot express)
# --------------------------------------------------------------------------

def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def mqtt_str(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_varint(len(body)) + body


class RawConn:
    def __init__(self, broker, timeout=WAIT):
        self.sock = socket.create_connection((broker.host, broker.port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError("connection closed by broker")
            self.buf += chunk

    def read_packet(self):
        """Returns (first_byte, body) or raises EOFError / socket.timeout."""
        self._fill(2)
        mult, length, i = 1, 0, 1
        while True:
            self._fill(i + 1)
            b = self.buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        self._fill(i + length)
        first, body = self.buf[0], self.buf[i:i + length]
        self.buf = self.buf[i + length:]
        return first, body

    def closed_by_peer(self, timeout=WAIT) -> bool:
        """True if the broker closes the connection (after any remaining packets) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return True
        except (socket.timeout, TimeoutError):
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def raw(broker):
    conns = []

    def make(broker_=None) -> RawConn:
        c = RawConn(broker_ or broker)
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.close()


def connect_packet_311(client_id: str, clean=True, keepalive=30) -> bytes:
    flags = 0x02 if clean else 0x00
    body = mqtt_str("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + mqtt_str(client_id)
    return packet(0x10, body)


def connect_packet_5(client_id: str, clean=True, keepalive=30, props=b"") -> bytes:
    flags = 0x02 if clean else 0x00
    body = (mqtt_str("MQTT") + bytes([5, flags]) + keepalive.to_bytes(2, "big")
            + encode_varint(len(props)) + props + mqtt_str(client_id))
    return packet(0x10, body)


__all__ = [
    "mqtt", "PacketTypes", "Properties", "ReasonCode", "SubscribeOptions", "WAIT", "QUIET",
    "connect_props", "publish_props", "v5_props", "packet", "mqtt_str", "encode_varint",
    "connect_packet_311", "connect_packet_5",
]
