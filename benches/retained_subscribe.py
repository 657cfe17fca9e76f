#!/usr/bin/env python3
"""What wildcard SUBSCRIBEs over a large retained store cost other clients.

Stores `--retained` retained messages (32-byte payloads on `r/I/J`, a
hundred topics per `r/I`), then starts an unrelated "canary" pair: a QoS 0
publish to `canary` every 5 ms, timed until its subscriber has it. Half a
second later, `--subscribers` clients subscribe to `r/#` at QoS 0 at once,
and either read what they get (`--read`) or never read (4 KiB receive
buffers). Each SUBSCRIBE makes the broker find up to its
`max_pending_retained` of those messages and offer them to the session.
With `--qos 1` the retained messages and the subscriptions are QoS 1 (and
the subscribers never read): a session's queues then take only its
in-flight window and queue at once, and nearly all the others wait in it.
Prints the canary's round trips during that (p50/p99/max), how many
retained messages each subscriber got, and, with `--broker-pid`, the
broker's CPU seconds over the subscribe phase and its resident memory at
the end (with subscribers that never read, what waits in their sessions).

    python3 benches/retained_subscribe.py --port 1883 --retained 200000 \\
        --subscribers 5 --broker-pid PID

The retained messages stay in the broker: start a fresh one per run.
Loopback only; standard library only; MQTT 3.1.1.
"""

import argparse
import json
import os
import socket
import threading
import time

from mqtt_wire import connect as connect_packet
from mqtt_wire import publish, subscribe

CANARY_EVERY_S = 0.005
PAYLOAD = b"x" * 32


def receive(sock, n):
    data = sock.recv(n)
    if not data:
        raise EOFError("the broker closed the connection")
    return data


def connect(port, client_id, receive_buffer=None):
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id))
    if receive(sock, 4)[0] != 0x20:
        raise SystemExit(f"{client_id!r}: expected CONNACK")
    return sock


def topic(i):
    return b"r/%d/%d" % (i // 100, i % 100)


def store_retained(port, n, qos):
    """Publishes them, then waits until the last one is stored."""
    loader = connect(port, b"retainer")
    if qos:
        # Its PUBACKs are read and dropped, so that the broker can send them.
        threading.Thread(target=drain, args=(loader,), daemon=True).start()
    loader.sendall(b"".join(publish(topic(i), PAYLOAD, retain=True, qos=qos, packet_id=i % 65535 + 1) for i in range(n)))
    check = connect(port, b"retained-check")
    check.sendall(subscribe(topic(n - 1)))
    seen = b""
    while topic(n - 1) + PAYLOAD not in seen:
        seen += receive(check, 65536)
    check.close()
    loader.close()


def drain(sock):
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def canary(port, stop, round_trips):
    sub = connect(port, b"canary-sub")
    sub.sendall(subscribe(b"canary"))
    receive(sub, 5)
    pub = connect(port, b"canary-pub")
    packet = publish(b"canary", b"ping")
    while not stop.is_set():
        t0 = time.perf_counter()
        pub.sendall(packet)
        got = b""
        while b"ping" not in got:
            got += receive(sub, 4096)
        round_trips.append(time.perf_counter() - t0)
        time.sleep(CANARY_EVERY_S)


def read_until_quiet(sock, counts, i):
    """Counts the retained messages' topics in what arrives (one that
    straddles two reads counted once) until 2 s pass without any."""
    sock.settimeout(2)
    last = b""
    try:
        while True:
            data = last + receive(sock, 1 << 20)
            counts[i] += data.count(b"r/")
            last = data[-1:] if data.endswith(b"r") else b""
    except (socket.timeout, EOFError):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--retained", type=int, default=200_000)
    parser.add_argument("--subscribers", type=int, default=5)
    parser.add_argument("--read", action="store_true", help="the subscribers read what they get")
    parser.add_argument(
        "--qos",
        type=int,
        choices=[0, 1],
        default=0,
        help="the retained messages' QoS and the subscriptions' (1: only with subscribers that never read)",
    )
    parser.add_argument("--broker-pid", type=int, help="report the broker's CPU seconds (/proc)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    if args.qos and args.read:
        parser.error("--qos 1 needs subscribers that never read (they would have to acknowledge)")
    store_retained(args.port, args.retained, args.qos)
    stop, round_trips = threading.Event(), []
    canary_thread = threading.Thread(target=canary, args=(args.port, stop, round_trips))
    canary_thread.start()
    time.sleep(0.5)
    cpu_before = cpu_seconds(args.broker_pid) if args.broker_pid else None
    subscribers = [
        connect(args.port, b"wildcard-%d" % i, None if args.read else 4096) for i in range(args.subscribers)
    ]
    counts = [0] * len(subscribers)
    for sock in subscribers:
        sock.sendall(subscribe(b"r/#", qos=args.qos))
    if args.read:
        readers = [threading.Thread(target=read_until_quiet, args=(s, counts, i)) for i, s in enumerate(subscribers)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
    else:
        time.sleep(3)
    stop.set()
    canary_thread.join()
    cpu = round(cpu_seconds(args.broker_pid) - cpu_before, 3) if args.broker_pid else None
    rss = rss_mib(args.broker_pid) if args.broker_pid else None

    round_trips.sort()
    n = len(round_trips)
    result = {
        "retained": args.retained,
        "subscribers": args.subscribers,
        "read": args.read,
        "qos": args.qos,
        "canary_round_trips": n,
        "canary_p50_ms": round(round_trips[n // 2] * 1e3, 2),
        "canary_p99_ms": round(round_trips[int(n * 0.99)] * 1e3, 2),
        "canary_max_ms": round(round_trips[-1] * 1e3, 1),
        "received": counts if args.read else None,
        "broker_cpu_s": cpu,
        "broker_rss_mib": rss,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
