"""Durable state across broker crashes and restarts (`tern serve --data-dir`).

What these tests prove, with real clients (paho-mqtt 2.x) against the real
binary, killed with SIGKILL (no shutdown code runs: only what was synced to
the store survives) or stopped with SIGTERM, and restarted on the same data
directory:

* QoS 1: every message whose PUBACK the publisher received is delivered to a
  persistent subscriber that was offline the whole time, even though the
  broker was SIGKILLed four times while publishers were flooding it
  (duplicates are legal for QoS 1 and only counted).
* QoS 2: the same with PUBCOMP as the acknowledgement, and no message is ever
  delivered twice; a message whose PUBCOMP never came arrives at most once.
* QoS 2 while delivering: a subscriber online and draining a large offline
  backlog loses nothing and receives nothing twice when the broker is
  SIGKILLed mid-delivery and restarted (the in-flight QoS 2 state on both
  sides survives: the broker's in its store, the client's in the same paho
  object, which keeps its inbound QoS 2 packet ids across reconnects for a
  clean_session=False session).
* Subscribers online through the kills lose nothing either: a 3.1.1 and an
  MQTT 5 session, two members of a shared group and an offline session,
  under a QoS 1 and a QoS 2 flood SIGKILLed four times, each reconnecting
  after every restart, receive every acknowledged message (the group: one
  of its members), and a QoS 2 subscription never receives one twice.
* Retained messages (QoS 0 and 1; a cleared one stays cleared) and sessions
  with their subscriptions and granted QoS survive SIGKILL; the reconnecting
  client gets CONNACK session present = 1.
* Restored subscriptions route at once after a restart (the rmqtt #477 case):
  messages published right after the restart, before the subscriber is back,
  are queued for it, and a subscriber back first receives them live.
* An MQTT 5 session whose Session Expiry Interval ran out while the broker
  was down is purged at restart (session present = 0, subscription gone),
  while a longer-lived session is kept; a session whose client was connected
  (for longer than its interval) when the broker was killed is kept, with
  the messages acknowledged to their publisher.
* A shared subscription's messages outlive the member that held them: a
  persistent member that comes back with Clean Start hands what it queued to
  the other member (also across SIGKILLs before and after), which receives
  every acknowledged message.
* A will is published once: not again at later restarts, whether the
  restart published it (its client was connected at the SIGKILL) or its
  delay timer did.
* `tern admin sessions --json` lists the persistent session both through the
  running broker's admin endpoint and from the stopped broker's directory.

Each broker is started with `max_queued_messages` raised (see LIMITS), so the
default bound of 1000 queued messages per session (whose overflow is dropped
by design after the PUBACK, docs/configuration.md) does not mix with what is
tested here: durability.

Every wait is bounded, every broker process is killed by pid in a finalizer
and its temporary directory removed.
"""

import json
from collections import Counter
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import (READY_RE, WAIT, PacketTypes, PahoClient, close_log_reader, connect_props,
                      mqtt, tern_bin, v5_props)

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5

ADMIN_RE = re.compile(r"admin endpoint ready \(read-only\) addr=([0-9.]+):(\d+)")
RESTORED_RE = re.compile(r"durable state restored .*")

# The per-session queue bound is raised so that nothing acknowledged is dropped
# by the (documented) overflow policy; these tests are about durability.
LIMITS = """
[limits]
max_queued_messages = 100000
"""

# Safety net per test when pytest-timeout is not installed (conftest.py's
# fixture reads it in place of its 40 s; the crash cycles need a little more).
TEST_TIMEOUT = 80
# Silence that ends a collection ("everything that was coming has come").
SILENCE = 2.0
# Upper bound of one collection.
COLLECT_MAX = 40.0
# Bound for a broker to start (recovery included) or to exit.
START_TIMEOUT = 20.0


# --------------------------------------------------------------------------
# A broker that can be killed and restarted on the same data directory
# --------------------------------------------------------------------------

class DurableBroker:
    """`tern serve` on a fixed data directory; each start gets fresh free ports.

    `host` / `port` are those of the current (or last) run, so conftest's
    PahoClient can connect (and reconnect after a restart) through it.
    """

    def __init__(self, root: Path, config_text: str = LIMITS):
        binary = tern_bin()
        if not binary.exists():
            pytest.fail(f"broker binary {binary} not found (set TERN_BIN)")
        self.binary = binary
        self.root = root
        self.data_dir = root / "data"
        self.config = root / "tern.toml"
        self.config.write_text(config_text)
        self.host = "127.0.0.1"
        self.port = None
        self.admin_port = None
        self.proc = None
        self.runs = []          # log lines of every run, one list per run
        self._reader = None
        self.restored_line = None

    # lifecycle -----------------------------------------------------------
    def start(self):
        assert not self.running(), "broker already running"
        args = [str(self.binary), "serve", "--config", str(self.config),
                "--bind", "127.0.0.1:0", "--ws-bind", "127.0.0.1:0",
                "--admin-bind", "127.0.0.1:0", "--data-dir", str(self.data_dir),
                "--durability", "fsync", "--log-level", "info"]
        lines = []
        self.runs.append(lines)
        self.port = None
        self.admin_port = None
        self.restored_line = None
        ready = threading.Event()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=dict(os.environ, NO_COLOR="1"))
        proc = self.proc

        def read_log():
            for raw in iter(proc.stderr.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                lines.append(line)
                if self.restored_line is None and RESTORED_RE.search(line):
                    self.restored_line = line
                m = ADMIN_RE.search(line)
                if m:
                    self.admin_port = int(m.group(2))
                m = READY_RE.search(line)
                if m and self.port is None:
                    self.host, self.port = m.group(1), int(m.group(2))
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read_log, daemon=True)
        self._reader.start()
        t0 = time.monotonic()
        if not ready.wait(START_TIMEOUT) or self.port is None:
            self._hard_kill()
            pytest.fail(f"broker did not report a ready listener within {START_TIMEOUT}s "
                        f"(exit status {self.proc.returncode}); log:\n" + "\n".join(lines))
        self.start_seconds = time.monotonic() - t0
        # The admin line follows the MQTT listener line closely; give it a moment.
        deadline = time.monotonic() + 2
        while self.admin_port is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        """SIGKILL by pid: no shutdown code runs, only what was synced survives."""
        assert self.running(), "kill9 of a broker that is not running:\n" + self.log()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._join_reader()

    def stop(self, timeout=10.0):
        """SIGTERM (graceful shutdown) and wait; returns the exit status."""
        assert self.running(), "stop of a broker that is not running:\n" + self.log()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._hard_kill()
            raise AssertionError(f"broker did not exit within {timeout}s of SIGTERM; log:\n"
                                 + self.log())
        self._join_reader()
        return rc

    def _hard_kill(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._join_reader()

    def _join_reader(self):
        if self._reader is not None:
            close_log_reader(self._reader, self.proc)

    def cleanup(self):
        self._hard_kill()

    # logs -----------------------------------------------------------------
    def log(self) -> str:
        return "\n".join(self.runs[-1]) if self.runs else ""

    def all_logs(self) -> str:
        return "\n".join(f"--- run {i + 1} ---\n" + "\n".join(r) for i, r in enumerate(self.runs))

    def panics(self):
        return [line for r in self.runs for line in r if "panicked" in line]

    def error_lines(self):
        return [line for r in self.runs for line in r if " ERROR " in line or " WARN " in line]

    def print_warnings(self, limit=5):
        lines = self.error_lines()
        print(f"broker WARN/ERROR lines over {len(self.runs)} runs: {len(lines)}")
        for line in lines[:limit]:
            print("   ", line)

    def admin(self, *args, timeout=WAIT):
        return subprocess.run([str(self.binary), "admin", *args], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout,
                              env=dict(os.environ, NO_COLOR="1"))


@pytest.fixture
def durable():
    """Factory of DurableBrokers, each on a data directory of its own."""
    root = Path(tempfile.mkdtemp(prefix="tern-crash-"))
    brokers = []
    clients = []

    def make() -> DurableBroker:
        d = root / f"b{len(brokers)}"
        d.mkdir()
        b = DurableBroker(d)
        brokers.append(b)
        return b

    make.clients = clients
    try:
        yield make
    finally:
        for c in clients:
            try:
                c.close()
            except Exception:
                pass
        for b in brokers:
            b.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    panics = [line for b in brokers for line in b.panics()]
    if panics:
        pytest.fail("broker panicked:\n" + "\n".join(panics))


def client(durable, broker, client_id, protocol=V311, clean=True, properties=None,
           connect=True) -> PahoClient:
    """A conftest PahoClient, registered for cleanup before it connects."""
    c = PahoClient(broker, client_id=client_id, protocol=protocol, clean=clean,
                   properties=properties, connect=False)
    durable.clients.append(c)
    if connect:
        c.connect()
    return c


def reconnect(c: PahoClient, timeout=WAIT):
    """Reconnect the SAME paho object (its session state, e.g. inbound QoS 2 ids,
    is kept) to the broker's current port; returns the CONNACK flags."""
    c.stop_loop()                 # joins the network thread that ended with the old connection
    while not c.connacks.empty():
        c.connacks.get_nowait()
    flags, _rc, _props = c.connect(timeout=timeout)
    return flags


def settle():
    """paho reports a disconnect once it has sent DISCONNECT; the broker may
    still be handling it. Tests that need the session offline wait a moment."""
    time.sleep(0.3)


def collect(c: PahoClient, silence=SILENCE, total=COLLECT_MAX, need=()):
    """Messages until `silence` seconds without one, bounded by `total` seconds.

    With `need` (numbers that must arrive), a silence before all of them came
    does not end the collection (a loaded machine may stall a while); only
    `total` does, so a loss still fails in bounded time."""
    out = []
    missing = set(need)
    deadline = time.monotonic() + total
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out
        try:
            m = c.messages.get(timeout=min(silence, left))
        except queue.Empty:
            if not missing:
                return out
            continue
        out.append(m)
        if missing:
            missing.discard(int(m.payload))


def numbers(msgs):
    return [int(m.payload) for m in msgs]


# --------------------------------------------------------------------------
# A publisher that floods as fast as the broker acknowledges
# --------------------------------------------------------------------------

class FloodPublisher:
    """paho publisher (clean session) sending numbered payloads from a thread.

    paho fires on_publish on PUBACK (QoS 1) / PUBCOMP (QoS 2) only; the
    MQTTMessageInfo of each publish records it. The thread keeps at most
    `window` messages unacknowledged (64 of them in flight, paho's
    max_inflight_messages_set) so paho's own queue stays bounded.
    """

    def __init__(self, broker, client_id, topic, qos, first, window=256, limit=None):
        self.topic, self.qos, self.first, self.window = topic, qos, first, window
        self.limit = limit            # publish at most this many (None: until stopped)
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=client_id, protocol=V311, clean_session=True,
                             reconnect_on_failure=False)
        self.c.max_inflight_messages_set(64)
        self.c.on_publish = self._on_publish
        self.c.on_connect = lambda *a: self._connected.set()
        self._connected = threading.Event()
        self._cond = threading.Condition()
        self.acks_seen = 0            # on_publish calls
        self.sent = []                # (number, MQTTMessageInfo)
        self.next = first
        self.stopping = threading.Event()
        self.c.connect(broker.host, broker.port, keepalive=30)
        self.c.loop_start()
        if not self._connected.wait(WAIT):
            self.close()
            raise AssertionError(f"publisher {client_id}: no CONNACK within {WAIT}s")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_publish(self, client, userdata, mid, rc, props):
        with self._cond:
            self.acks_seen += 1
            self._cond.notify_all()

    def _run(self):
        n = self.first
        while not self.stopping.is_set():
            with self._cond:
                while (len(self.sent) - self.acks_seen >= self.window
                       and not self.stopping.is_set()):
                    self._cond.wait(0.05)
            if self.stopping.is_set() or (self.limit is not None
                                          and n - self.first >= self.limit):
                break
            info = self.c.publish(self.topic, str(n).encode(), qos=self.qos)
            self.sent.append((n, info))
            n += 1
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break                 # the connection is gone (broker killed)
        self.next = n

    def start(self):
        self._thread.start()

    def wait_acked(self, count, timeout):
        """Wait until `count` messages were sent and acknowledged."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.acks_seen < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"only {self.acks_seen} of {count} acknowledged "
                                         f"within {timeout}s")
                self._cond.wait(min(left, 0.1))

    def finish(self):
        """Stop the thread and the network loop; returns (sent numbers, acked numbers)."""
        self.stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join(10)
            assert not self._thread.is_alive(), "publisher thread did not stop"
        self.close()
        sent = [n for n, _ in self.sent]
        acked = set()
        for n, info in self.sent:
            try:
                if info.is_published():
                    acked.add(n)
            except (ValueError, RuntimeError):
                pass                  # never queued / never sent: not acknowledged
        assert len(acked) == self.acks_seen, (
            f"paho bookkeeping mismatch: {len(acked)} published infos, "
            f"{self.acks_seen} on_publish calls")
        return sent, acked

    def close(self):
        try:
            if self.c.is_connected():
                self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()
        try:
            sock = self.c.socket()
            if sock is not None:
                sock.close()
        except Exception:
            pass


def crash_cycles(durable, broker, topic, qos, cycles=4):
    """`cycles` times: a new publisher floods `topic`, the broker is SIGKILLed
    after 0.3-1.5 s and restarted. Returns (all sent, all acknowledged)."""
    all_sent, all_acked = [], set()
    nxt = 0
    for cycle in range(cycles):
        if not broker.running():
            broker.start()
        pub = FloodPublisher(broker, f"crash-pub-q{qos}-{cycle}", topic, qos, nxt)
        durable.clients.append(pub)
        pub.start()
        delay = random.uniform(0.3, 1.5)
        time.sleep(delay)
        broker.kill9()
        sent, acked = pub.finish()
        nxt = pub.next
        print(f"cycle {cycle + 1}: SIGKILL after {delay:.2f}s: sent {len(sent)}, "
              f"acknowledged {len(acked)}")
        all_sent += sent
        all_acked |= acked
    return all_sent, all_acked


# --------------------------------------------------------------------------
# 1. QoS 1 under SIGKILL
# --------------------------------------------------------------------------

def crash_scenario(durable, client_id, version, topic, qos, properties=None):
    """A persistent subscriber goes offline; publishers flood `topic` while
    the broker is SIGKILLed four times; after the last restart the
    subscriber comes back and collects. Returns (broker, sent, acked, got)."""
    b = durable().start()
    sub = client(durable, b, client_id, version, clean=False, properties=properties)
    assert [rc.value for rc in sub.subscribe(topic, qos)] == [qos]
    sub.disconnect()
    settle()

    sent, acked = crash_cycles(durable, b, topic, qos)
    assert acked, "no publish was acknowledged at all: the test proved nothing"

    b.start()
    print("restart:", b.restored_line)
    flags = reconnect(sub)
    assert flags.session_present, "the persistent session must be restored"
    got = numbers(collect(sub, need=acked))
    b.print_warnings()
    return b, sent, acked, got


def assert_none_lost(b, sent, acked, received, what):
    lost = sorted(acked - received)
    assert not lost, (f"{len(lost)} {what} messages lost, first {lost[:20]}; "
                      f"broker logs:\n" + b.all_logs())
    assert received <= set(sent), f"received numbers never published: {sorted(received - set(sent))[:20]}"


def test_qos1_acknowledged_messages_survive_sigkill(durable):
    b, sent, acked, got = crash_scenario(durable, "crash-sub-q1", V311, "crash/q1", 1)
    received = set(got)
    print(f"QoS 1: sent {len(sent)}, acknowledged {len(acked)}, received {len(got)} "
          f"({len(received)} distinct, {len(got) - len(received)} duplicates, "
          f"{len(received - acked)} unacknowledged that arrived anyway)")
    assert_none_lost(b, sent, acked, received, "acknowledged QoS 1")


# --------------------------------------------------------------------------
# 2. QoS 2 under SIGKILL
# --------------------------------------------------------------------------

def test_qos2_acknowledged_messages_survive_sigkill_without_duplicates(durable):
    # MQTT 5 with a Session Expiry Interval this time (test 1 covers 3.1.1).
    b, sent, acked, got = crash_scenario(
        durable, "crash-sub-q2", V5, "crash/q2", 2,
        properties=connect_props(SessionExpiryInterval=3600))
    received = set(got)
    dups = sorted({n for n in got if got.count(n) > 1}) if len(got) != len(received) else []
    print(f"QoS 2: sent {len(sent)}, completed {len(acked)}, received {len(got)} "
          f"({len(received)} distinct, {len(got) - len(received)} duplicates, "
          f"{len(received - acked)} not completed that arrived once)")
    assert not dups, f"QoS 2 messages delivered more than once: {dups[:20]}"
    assert_none_lost(b, sent, acked, received, "PUBCOMP'd QoS 2")


# --------------------------------------------------------------------------
# 3. SIGKILL while a QoS 2 subscriber drains its backlog
# --------------------------------------------------------------------------

def test_subscriber_killed_mid_delivery_qos2_no_duplicates(durable):
    total = 2000
    b = durable().start()
    # One paho object for the whole test: paho keeps its inbound QoS 2 state
    # (packet ids awaiting PUBREL) across reconnects of a clean_session=False
    # client, which is what the receiver side of the protocol requires.
    sub = client(durable, b, "crash-sub-mid", V311, clean=False)
    assert [rc.value for rc in sub.subscribe("crash/mid", 2)] == [2]
    sub.disconnect()
    settle()

    pub = FloodPublisher(b, "crash-pub-mid", "crash/mid", 2, 0, limit=total)
    durable.clients.append(pub)
    t0 = time.monotonic()
    pub.start()
    pub.wait_acked(total, timeout=40)
    sent, acked = pub.finish()
    expected = set(range(total))
    assert acked == expected and sorted(sent) == list(range(total))
    print(f"backlog of {total} QoS 2 messages completed in {time.monotonic() - t0:.1f}s")

    flags = reconnect(sub)
    assert flags.session_present
    kill_after = random.randint(200, 800)
    deadline = time.monotonic() + 20
    while sub.messages.qsize() < kill_after:
        assert time.monotonic() < deadline, (
            f"only {sub.messages.qsize()} of the backlog delivered in 20 s; log:\n" + b.log())
        time.sleep(0.005)
    b.kill9()
    sub.wait_disconnect()
    first = []
    while not sub.messages.empty():
        first.append(sub.messages.get_nowait())
    # The point of the test: the kill came with part of the backlog delivered.
    assert 0 < len(first) < total, f"{len(first)} of {total} delivered before the SIGKILL"

    b.start()
    print("restart:", b.restored_line)
    flags = reconnect(sub)
    assert flags.session_present, "the persistent session must survive the SIGKILL"
    second = collect(sub, need=expected - set(numbers(first)))
    first_n, second_n = numbers(first), numbers(second)
    got = first_n + second_n
    received = set(got)
    dups = sorted({n for n in got if got.count(n) > 1}) if len(got) != len(received) else []
    print(f"QoS 2 mid-delivery: backlog {len(expected)}, "
          f"SIGKILL after {len(first_n)} received, {len(second_n)} after restart, "
          f"{len(got) - len(received)} duplicates")
    b.print_warnings()

    lost = sorted(expected - received)
    assert not lost, (f"{len(lost)} completed QoS 2 messages never delivered, first {lost[:20]}; "
                      f"broker logs:\n" + b.all_logs())
    assert not dups, (f"QoS 2 messages delivered twice: {dups[:20]} "
                      f"(in first connection: {[n for n in dups if n in first_n][:20]})")
    assert received <= expected


# --------------------------------------------------------------------------
# 4. Retained messages and sessions
# --------------------------------------------------------------------------

def test_retained_and_sessions_survive_sigkill(durable):
    b = durable().start()
    pub = client(durable, b, "ret-pub")
    # QoS 0 ones first: they get no acknowledgement of their own, the later
    # QoS 1 PUBACKs (sent after a sync covering everything before) vouch for them.
    pub.c.publish("keep/zero", b"z0", qos=0, retain=True)
    pub.c.publish("keep/gone0", b"will be cleared", qos=0, retain=True)
    pub.publish("keep/one", b"o1", qos=1, retain=True)
    pub.publish("keep/deep/er", b"d1", qos=1, retain=True)
    pub.publish("keep/gone1", b"will be cleared", qos=1, retain=True)
    pub.publish("keep/one", b"o1-replaced", qos=1, retain=True)
    pub.publish("keep/gone1", b"", qos=1, retain=True)        # clear
    pub.publish("keep/gone0", b"", qos=1, retain=True)        # clear
    pub.disconnect()

    sess = client(durable, b, "persist-two-subs", V311, clean=False)
    assert [rc.value for rc in sess.subscribe([("sess/one", 1), ("sess/two/#", 2)])] == [1, 2]
    sess.disconnect()
    settle()

    b.kill9()
    b.start()
    print("restart:", b.restored_line)

    fresh = client(durable, b, "ret-fresh")
    fresh.subscribe("keep/#", 2)
    got = collect(fresh, silence=1.0, total=10)
    retained = {m.topic: (m.payload, m.qos, m.retain) for m in got}
    assert len(got) == len(retained), f"a retained message came twice: {[m.topic for m in got]}"
    assert retained == {
        "keep/zero": (b"z0", 0, True),
        "keep/one": (b"o1-replaced", 1, True),
        "keep/deep/er": (b"d1", 1, True),
    }, "retained set after SIGKILL"

    flags = reconnect(sess)
    assert flags.session_present, "CONNACK session present must be 1 after the SIGKILL"
    # The subscriptions came back with their granted QoS: a QoS 2 publish is
    # delivered at QoS 1 on sess/one and at QoS 2 on sess/two/#.
    pub2 = client(durable, b, "ret-pub2")
    pub2.publish("sess/one", b"to-one", qos=2)
    pub2.publish("sess/two/x", b"to-two", qos=2)
    got = {m.topic: (m.payload, m.qos) for m in sess.get_n(2)}
    assert got == {"sess/one": (b"to-one", 1), "sess/two/x": (b"to-two", 2)}
    sess.assert_no_message()


# --------------------------------------------------------------------------
# 5. Restored subscriptions route at once (rmqtt #477)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["publish_first", "subscriber_first"])
@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_restored_subscriptions_route_immediately(durable, stop, order):
    b = durable().start()
    sub = client(durable, b, "restart-sub", V311, clean=False)
    assert [rc.value for rc in sub.subscribe("restart/+", 1)] == [1]
    sub.disconnect()
    settle()

    if stop == "sigterm":
        rc = b.stop()
        assert rc == 0, f"graceful stop exited {rc}; log:\n" + b.log()
    else:
        b.kill9()
    b.start()
    expected = [f"m{i}".encode() for i in range(10)]

    if order == "subscriber_first":
        flags = reconnect(sub)
        assert flags.session_present
    pub = client(durable, b, "restart-pub")
    for p in expected:
        pub.publish("restart/x", p, qos=1)
    if order == "publish_first":
        flags = reconnect(sub)
        assert flags.session_present
    got = sub.get_n(10, timeout=10)
    assert [m.payload for m in got] == expected
    assert all(m.topic == "restart/x" and m.qos == 1 for m in got)
    sub.assert_no_message()


# --------------------------------------------------------------------------
# 6. Expiry while the broker is down
# --------------------------------------------------------------------------

def test_expired_session_is_purged_at_restart(durable):
    b = durable().start()
    short = client(durable, b, "expire-short", V5, clean=False,
                   properties=connect_props(SessionExpiryInterval=2))
    short.subscribe("expire/t", 1)
    short.disconnect()
    long_ = client(durable, b, "expire-long", V5, clean=False,
                   properties=connect_props(SessionExpiryInterval=3600))
    long_.subscribe("expire/t", 1)
    long_.disconnect()
    settle()
    assert b.stop() == 0
    time.sleep(3)
    b.start()
    print("restart:", b.restored_line)

    flags = reconnect(short)
    assert not flags.session_present, "a session expired while the broker was down must be gone"
    # ... and so must its subscription (the reconnect created a new, empty session).
    flags = reconnect(long_)
    assert flags.session_present, "a session that has not expired must be kept"
    pub = client(durable, b, "expire-pub")
    pub.publish("expire/t", b"after", qos=1)
    assert long_.get().payload == b"after"
    short.assert_no_message()


def test_shared_messages_of_an_ending_member_survive_sigkill(durable):
    # Two persistent members of one shared group, both offline: floods split
    # between their queues while the broker is SIGKILLed. After a restart
    # member A comes back with Clean Start, so its old session ends and hands
    # what it queued to B (MQTT 5 4.8.2), and the broker is SIGKILLed right
    # after A's CONNACK. After the next restart B comes back: every
    # acknowledged message reaches it (A's new session subscribed to nothing).
    b = durable().start()
    members = {}
    for name in ("share-a", "share-b"):
        m = client(durable, b, name, V5, clean=False,
                   properties=connect_props(SessionExpiryInterval=3600))
        assert [rc.value for rc in m.subscribe("$share/g/share/jobs", 1)] == [1]
        m.disconnect()
        members[name] = m
    settle()

    sent, acked = crash_cycles(durable, b, "share/jobs", 1, cycles=2)
    assert acked, "no publish was acknowledged at all: the test proved nothing"

    b.start()
    print("restart:", b.restored_line)
    fresh = client(durable, b, "share-a", V5, clean=True,
                   properties=connect_props(SessionExpiryInterval=3600))
    assert not fresh.flags.session_present
    b.kill9()

    b.start()
    print("restart:", b.restored_line)
    member_b = members["share-b"]
    flags = reconnect(member_b)
    assert flags.session_present, "B's persistent session must be restored"
    got = numbers(collect(member_b, need=acked))
    b.print_warnings()
    assert_none_lost(b, sent, acked, set(got), "shared QoS 1")
    print(f"B received {len(got)} messages ({len(got) - len(set(got))} duplicates) "
          f"for {len(acked)} acknowledged")


def test_online_subscribers_of_every_kind_lose_nothing_across_sigkills(durable):
    # Subscribers connected while the broker is SIGKILLed under a QoS 1 and a
    # QoS 2 flood: a 3.1.1 session (QoS 1), an MQTT 5 session (QoS 2), two
    # members of a shared group, and one 3.1.1 session (QoS 2) offline
    # throughout. Each kill catches deliveries in flight, held for the
    # subscriber's acknowledgement, or queued. After every restart the online
    # ones reconnect with the same paho objects. In the end every message
    # whose publisher was acknowledged has reached every subscriber (the
    # shared group: one of its members), and none that a QoS 2 subscription
    # received at QoS 2 arrived twice.
    b = durable().start()
    expiry = connect_props(SessionExpiryInterval=3600)
    online = {
        "chaos-311": (client(durable, b, "chaos-311", V311, clean=False), "chaos/#", 1),
        "chaos-5": (client(durable, b, "chaos-5", V5, clean=False, properties=expiry),
                    "chaos/#", 2),
        "chaos-share-a": (client(durable, b, "chaos-share-a", V5, clean=False,
                                 properties=expiry), "$share/g/chaos/#", 1),
        "chaos-share-b": (client(durable, b, "chaos-share-b", V5, clean=False,
                                 properties=expiry), "$share/g/chaos/#", 1),
    }
    for name, (c, topic, qos) in online.items():
        assert [rc.value for rc in c.subscribe(topic, qos)] == [qos], name
    offline = client(durable, b, "chaos-offline", V311, clean=False)
    assert [rc.value for rc in offline.subscribe("chaos/#", 2)] == [2]
    offline.disconnect()
    settle()

    # QoS 1 numbers count from 0, QoS 2 numbers from QOS2_BASE.
    qos2_base = 10_000_000
    sent, acked = [], set()
    nxt = {1: 0, 2: qos2_base}
    for cycle in range(4):
        if not b.running():
            b.start()
            for name, (c, _topic, _qos) in online.items():
                assert reconnect(c).session_present, f"{name}: session lost at restart {cycle}"
        pubs = {}
        for qos, topic in ((1, "chaos/one"), (2, "chaos/two")):
            pubs[qos] = FloodPublisher(b, f"chaos-pub-q{qos}-{cycle}", topic, qos, nxt[qos])
            durable.clients.append(pubs[qos])
        for pub in pubs.values():
            pub.start()
        delay = random.uniform(0.5, 1.5)
        time.sleep(delay)
        b.kill9()
        counts = []
        for qos, pub in pubs.items():
            s, a = pub.finish()
            nxt[qos] = pub.next
            sent += s
            acked |= a
            counts.append(f"QoS {qos} sent {len(s)} acknowledged {len(a)}")
        print(f"cycle {cycle + 1}: SIGKILL after {delay:.2f}s: " + ", ".join(counts))
    assert any(n < qos2_base for n in acked) and any(n >= qos2_base for n in acked), \
        "a publisher had nothing acknowledged: the test proved nothing"

    b.start()
    print("restart:", b.restored_line)
    for name, (c, _topic, _qos) in online.items():
        assert reconnect(c).session_present, f"{name}: session lost at the last restart"
    assert reconnect(offline).session_present, "the offline session must be restored"

    # One deadline for every collection, so that a loss fails within the
    # test's time limit. The messages wait in each client's queue meanwhile.
    deadline = time.monotonic() + COLLECT_MAX
    got = {}
    for name, c in (("chaos-311", online["chaos-311"][0]), ("chaos-5", online["chaos-5"][0]),
                    ("chaos-offline", offline)):
        got[name] = numbers(collect(c, total=max(0.1, deadline - time.monotonic()),
                                    need=acked))
    # The group's members between them: collect from both until the union
    # holds every acknowledged message (or a silence after it does).
    shared = []
    missing = set(acked)
    members = [online["chaos-share-a"][0], online["chaos-share-b"][0]]
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        took = False
        for m in members:
            try:
                msg = m.messages.get(timeout=0.05)
            except queue.Empty:
                continue
            took = True
            shared.append(int(msg.payload))
            missing.discard(shared[-1])
        if took:
            quiet_since = time.monotonic()
        elif not missing and time.monotonic() - quiet_since > SILENCE:
            break
    got["the shared group"] = shared
    b.print_warnings()

    for name, numbers_got in got.items():
        received = set(numbers_got)
        print(f"{name}: received {len(numbers_got)} ({len(numbers_got) - len(received)} "
              f"duplicates) for {len(acked)} acknowledged")
        assert_none_lost(b, sent, acked, received, f"acknowledged ({name})")
    for name in ("chaos-5", "chaos-offline"):
        twice = sorted(n for n, k in Counter(got[name]).items() if n >= qos2_base and k > 1)
        assert not twice, f"{name}: QoS 2 messages delivered more than once: {twice[:20]}"


def test_a_session_connected_longer_than_its_expiry_survives_sigkill(durable):
    # The expiry interval counts from when the connection closes (MQTT 5
    # 3.1.2.11.2): a client connected for longer than its interval when the
    # broker is killed keeps its session and the messages acknowledged to
    # their publisher.
    b = durable().start()
    sub = client(durable, b, "long-lived", V5, clean=False,
                 properties=connect_props(SessionExpiryInterval=2))
    assert [rc.value for rc in sub.subscribe("lived/t", 1)] == [1]
    time.sleep(3)
    # Still connected, but no longer reading: what follows stays unacknowledged.
    sub.stop_loop()
    pub = client(durable, b, "lived-pub")
    for i in range(5):
        pub.publish("lived/t", str(i).encode(), qos=1)
    b.kill9()
    b.start()
    print("restart:", b.restored_line)
    flags = reconnect(sub)
    assert flags.session_present, "the session of a client connected at the crash must be kept"
    got = numbers(collect(sub, need={0, 1, 2, 3, 4}))
    assert set(got) == {0, 1, 2, 3, 4}, f"acknowledged messages lost: got {got}"


def test_a_published_will_is_not_published_again_after_a_restart(durable):
    # MQTT-3.1.2-10: a will is removed from the session once published. One
    # published at the restart after a SIGKILL (its client was connected), one
    # published by its delay timer: each reaches the subscriber once, however
    # often the broker restarts afterwards.
    b = durable().start()
    watcher = client(durable, b, "will-watcher", V311, clean=False)
    assert [rc.value for rc in watcher.subscribe("gone/#", 1)] == [1]
    watcher.disconnect()
    settle()
    kept = dict(protocol=V5, clean=False, properties=connect_props(SessionExpiryInterval=3600))
    at_crash = PahoClient(b, "will-at-crash", will=dict(topic="gone/at-crash", payload=b"x", qos=1),
                          connect=False, **kept)
    durable.clients.append(at_crash)
    at_crash.connect()
    delayed = PahoClient(b, "will-delayed", connect=False, **kept,
                         will=dict(topic="gone/delayed", payload=b"y", qos=1,
                                   properties=v5_props(PacketTypes.WILLMESSAGE, WillDelayInterval=1)))
    durable.clients.append(delayed)
    delayed.connect()
    # The delayed one's connection drops (no DISCONNECT): its will goes out
    # after 1 s, while the broker runs.
    delayed.stop_loop()
    delayed.c.socket().close()
    time.sleep(2.5)
    b.kill9()
    b.start()
    reconnect(watcher)
    got = sorted(m.topic for m in collect(watcher, silence=1.5, total=15))
    assert got == ["gone/at-crash", "gone/delayed"], f"wills after the first restart: {got}"
    watcher.disconnect()
    settle()
    for stop in ("sigterm", "sigkill"):
        if stop == "sigterm":
            assert b.stop() == 0
        else:
            b.kill9()
        b.start()
        reconnect(watcher)
        again = [m.topic for m in collect(watcher, silence=1.5, total=10)]
        assert again == [], f"wills published again after a {stop} restart: {again}"
        watcher.disconnect()
        settle()


# --------------------------------------------------------------------------
# 7. tern admin, online and offline
# --------------------------------------------------------------------------

def _admin_sessions(b, *where):
    r = b.admin(*where, "--json", "sessions")
    if r.returncode != 0 and b"unrecognized subcommand" in r.stderr:
        pytest.skip("the `tern admin` subcommand is not wired yet")
    assert r.returncode == 0, f"tern admin {' '.join(where)} failed: {r.stderr.decode()}"
    return {row["client_id"]: row for row in json.loads(r.stdout)}


def test_admin_offline_and_online(durable):
    b = durable().start()
    sub = client(durable, b, "admin-sub", V311, clean=False)
    sub.subscribe("admin/t", 1)
    sub.disconnect()
    settle()
    pub = client(durable, b, "admin-pub")
    for i in range(3):
        pub.publish("admin/t", str(i).encode(), qos=1)
    pub.disconnect()
    settle()

    assert b.admin_port is not None, "no admin endpoint in the log:\n" + b.log()
    online = _admin_sessions(b, "--url", f"http://127.0.0.1:{b.admin_port}")
    assert "admin-sub" in online, f"online listing: {online}"
    assert "admin-pub" not in online, "a clean session is not durable"
    assert online["admin-sub"]["subscriptions"] == 1
    assert online["admin-sub"]["queue_depth"] == 3

    assert b.stop() == 0
    offline = _admin_sessions(b, "--data-dir", str(b.data_dir))
    assert "admin-sub" in offline, f"offline listing: {offline}"
    assert offline["admin-sub"]["subscriptions"] == 1
    assert offline["admin-sub"]["queue_depth"] == 3
