#!/usr/bin/env python3
"""How long subscribers that stop taking hold up an unrelated publisher.

A stop-and-wait QoS 1 publisher sends 64-byte messages to `v/x`, each after
the PUBACK of the one before, while a subscriber of `v/x` takes and
acknowledges them. Beside them, one of these subscribes to `#` at QoS 1:

  none     nobody (the baseline)
  newsub   a new subscriber every second that never reads or acknowledges
  cycle    one subscriber that reads and acknowledges for 1 s, then pauses
           for 2 s, over and over

Every message also matches the `#` subscribers, so their queues fill, and
the broker's overflow policy decides how long the publisher waits for them
(Tern: `limits.queue_full_wait_ms`, and docs/configuration.md, "Overflow
policy"). Prints the publisher's round trips (p50/p99/p99.9/max) and the
fraction of the run it spent in round trips over 50 ms ("stalled").

    python3 benches/stalling_subscribers.py --port 1883 --mode newsub --seconds 10

Loopback only; standard library only; MQTT 3.1.1.
"""

import argparse
import socket
import struct
import threading
import time

from mqtt_wire import connect as connect_packet
from mqtt_wire import remaining_length, string
from mqtt_wire import subscribe as subscribe_packet


def connect(port, client_id):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id.encode()))
    reader = Reader(sock)
    kind, _ = reader.packet()
    if kind >> 4 != 2:
        raise SystemExit(f"{client_id}: expected CONNACK, got packet type {kind >> 4}")
    return sock, reader


def subscribe(sock, topic_filter):
    sock.sendall(subscribe_packet(topic_filter.encode(), qos=1))


class Reader:
    """Splits a socket's bytes into MQTT packets (first byte, body)."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def packet(self):
        while True:
            length, multiplier, i = 0, 1, 1
            while i < len(self.buf):
                byte = self.buf[i]
                length += (byte & 127) * multiplier
                multiplier *= 128
                i += 1
                if not byte & 128:
                    if len(self.buf) >= i + length:
                        first, body = self.buf[0], self.buf[i:i + length]
                        self.buf = self.buf[i + length:]
                        return first, body
                    break
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data


def take_and_acknowledge(sock, reader, read_pause=None):
    """Acknowledges every QoS 1 PUBLISH; with (read_s, pause_s), only
    during the first read_s of every read_s + pause_s seconds."""
    start = time.time()
    while True:
        if read_pause:
            read_s, pause_s = read_pause
            phase = (time.time() - start) % (read_s + pause_s)
            if phase >= read_s:
                time.sleep(read_s + pause_s - phase)
        try:
            first, body = reader.packet()
        except (EOFError, OSError):
            return
        if first >> 4 == 3 and (first >> 1) & 3:
            topic_len = struct.unpack(">H", body[:2])[0]
            sock.sendall(b"\x40\x02" + body[2 + topic_len:4 + topic_len])


def adversaries(port, mode, held):
    if mode == "cycle":
        sock, reader = connect(port, "cycler")
        subscribe(sock, "#")
        held.append(sock)
        threading.Thread(target=take_and_acknowledge, args=(sock, reader, (1.0, 2.0)), daemon=True).start()
    elif mode == "newsub":
        n = 0
        while True:
            sock, _ = connect(port, f"stalled-{n}")
            subscribe(sock, "#")
            held.append(sock)  # never read
            n += 1
            time.sleep(1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--mode", choices=["none", "newsub", "cycle"], default="newsub")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    sub, sub_reader = connect(args.port, "victim-sub")
    subscribe(sub, "v/x")
    threading.Thread(target=take_and_acknowledge, args=(sub, sub_reader), daemon=True).start()
    time.sleep(0.2)
    held = []
    threading.Thread(target=adversaries, args=(args.port, args.mode, held), daemon=True).start()

    pub, reader = connect(args.port, "victim-pub")
    payload = b"x" * 64
    round_trips = []
    end = time.time() + args.seconds
    packet_id = 0
    while time.time() < end:
        packet_id = packet_id % 65535 + 1
        body = string(b"v/x") + struct.pack(">H", packet_id) + payload
        t0 = time.perf_counter()
        pub.sendall(b"\x32" + remaining_length(len(body)) + body)
        while reader.packet()[0] >> 4 != 4:
            pass
        round_trips.append(time.perf_counter() - t0)

    round_trips.sort()
    n = len(round_trips)
    stalled = sum(t for t in round_trips if t > 0.05) / sum(round_trips)
    print(
        f"mode={args.mode} messages={n} p50={round_trips[n // 2] * 1e3:.2f}ms "
        f"p99={round_trips[int(n * 0.99)] * 1e3:.2f}ms p99.9={round_trips[int(n * 0.999)] * 1e3:.1f}ms "
        f"max={round_trips[-1] * 1e3:.0f}ms stalled={stalled:.2f} subscribers_on_#={len(held)}"
    )


if __name__ == "__main__":
    main()
