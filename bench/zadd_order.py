#!/usr/bin/env python3
"""bench/zadd_order.py: what a plain ZADD costs Redis with oldest-first scores
(the stored layout: score = send_time, the newest at the tail) against
newest-first scores (score = -send_time, the newest at the head).

Usage: bench/zadd_order.py [--port P] [--rooms N] [--messages M] [--rounds R]

Issue 19 item 4 asks whether a layout change pays: a listpack sorted set
(up to 128 members) is scanned from its head on insert, so appending at the
tail walks every member, while a newest-first insert stops at the first.
FLUSHALLs the Redis on 127.0.0.1:P (default 6399: never point it at data
you keep), then ZADDs M messages (600,000) of 40 bytes to rooms picked from
N (10,000) with a fixed seed, pipelined 1,000 deep, once per order and R
times (2) alternating, and prints Redis's own accounting (INFO
commandstats): µs per ZADD. Only the ZADD: what im_send adds around it
(the Lua call, the ZRANGE of the newest, the SPUBLISH) is the same either
way; bench/im_send_cost.py measures the whole.
"""
import argparse
import random
import re

from im_send_cost import Conn, encode


def zadd_cost(conn, sign, rooms, messages):
    conn.call("FLUSHALL")
    conn.call("CONFIG", "RESETSTAT")
    rng = random.Random(1)
    t = 1_765_000_000_000_000
    batch = []
    for _ in range(messages):
        t += 1
        member = b"\x09" + t.to_bytes(8, "little") + b"\x12\x02a2\x1a\x13random number 12345"
        batch.append(encode(["ZADD", f"im:{{bench-room-{rng.randrange(rooms)}}}", str(sign * t), member]))
        if len(batch) == 1000:
            conn.sock.sendall(b"".join(batch))
            for _ in batch:
                conn.reply()
            batch = []
    stats = conn.call("INFO", "commandstats").decode()
    return float(re.search(r"cmdstat_zadd:calls=\d+,usec=\d+,usec_per_call=([\d.]+)", stats).group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=6399)
    p.add_argument("--rooms", type=int, default=10_000)
    p.add_argument("--messages", type=int, default=600_000)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    conn = Conn(a.port)
    for _ in range(a.rounds):
        oldest = zadd_cost(conn, 1, a.rooms, a.messages)
        newest = zadd_cost(conn, -1, a.rooms, a.messages)
        print(f"ZADD µs per call, {a.messages} messages to {a.rooms} rooms: "
              f"oldest-first {oldest:.2f}, newest-first {newest:.2f}")


if __name__ == "__main__":
    main()
