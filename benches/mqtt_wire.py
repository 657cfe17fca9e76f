"""MQTT 3.1.1 packets as bytes, for the load scripts in this folder.

Just enough of the wire format for scripts that must run against any
broker with nothing but Python's standard library: the variable-length
integer of a fixed header, length-prefixed strings, and the few packets
the scripts send. Each returns the whole packet, ready for `sendall`.
"""

import struct


def remaining_length(n):
    """The fixed header's Remaining Length: 7 bits a byte, low first."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(b):
    """A UTF-8 string (or binary data) with its 16-bit length before it."""
    return struct.pack(">H", len(b)) + b


def connect(client_id, keep_alive=0):
    """CONNECT with Clean Session and no will, user or password."""
    body = string(b"MQTT") + bytes([4, 2]) + struct.pack(">H", keep_alive) + string(client_id)
    return b"\x10" + remaining_length(len(body)) + body


def publish(topic, payload, retain=False, qos=0, packet_id=1):
    """A PUBLISH; `packet_id` only at QoS 1 or 2."""
    body = string(topic) + (struct.pack(">H", packet_id) if qos else b"") + payload
    first = 0x30 | qos << 1 | (1 if retain else 0)
    return bytes([first]) + remaining_length(len(body)) + body


def subscribe(topic_filter, qos=0, packet_id=1):
    """SUBSCRIBE to one filter."""
    body = struct.pack(">H", packet_id) + string(topic_filter) + bytes([qos])
    return b"\x82" + remaining_length(len(body)) + body
