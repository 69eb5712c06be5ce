#!/usr/bin/env python3
"""bench/im_send_cost.py: what one message costs Redis inside `im_send`.

Usage: bench/im_send_cost.py [--port P] [--rooms N] [--messages M] [--batch B]
                             [--library FILE] [--keep N] [--age-floor] [--stamped]

Loads the `im` function library from FILE (default src/store/redis/schema.rs, the
LIBRARY constant; give an older copy, e.g. from `git show`, for an A/B),
FLUSHALLs the Redis on 127.0.0.1:P (default 6399: never point it at data you
keep), then stores M messages (600,000) in calls of B (20) to rooms picked
from N (10,000) with a fixed seed, pipelined 50 calls deep, and prints
Redis's own accounting (INFO commandstats): FCALL µs per message, and µs
per call of the ZADD, ZRANGE and SPUBLISH it makes. The same seed and counts
give every run the same room sizes, which set the cost of a listpack ZADD.
No load generator's noise is in these numbers: they are Redis's CPU only.

With --keep N (retention, issue 21) the calls are `im_send_keep` keeping
each room's newest N (what `--retain-messages N` sends); --age-floor also
passes an age floor (one hour back: nothing expires, the check is paid).
With --stamped the calls are `im_send_stamped` (`im_send_stamped_keep`),
what the server sends for batches without idempotency keys: each chat's
messages together, each member stamped with its proposed send_time.
"""
import argparse
import random
import re
import socket
import time
from pathlib import Path


def encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.reader = self.sock.makefile("rb")

    def call(self, *args):
        self.sock.sendall(encode(args))
        return self.reply()

    def reply(self):
        line = self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise SystemExit(f"redis error: {rest.decode()}")
        if kind in (b"+", b":"):
            return rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.reader.read(n + 2)[:-2]
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise SystemExit(f"unexpected reply {line!r}")


def library(path):
    text = Path(path).read_text()
    found = re.search(r'const LIBRARY: &str = r#"(.*?)"#;', text, re.S)
    if found:
        return found.group(1)
    # Since issue 21: concat!(r#"..."#, include_str!("lifecycle.lua")).
    found = re.search(r'const LIBRARY: &str = concat!\(\s*r#"(.*?)"#,\s*include_str!\("([^"]+)"\)', text, re.S)
    if not found:
        raise SystemExit(f"no LIBRARY constant in {path}")
    return found.group(1) + (Path(path).parent / found.group(2)).read_text()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=6399)
    p.add_argument("--rooms", type=int, default=10_000)
    p.add_argument("--messages", type=int, default=600_000)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--library", default=str(Path(__file__).parent.parent / "src/store/redis/schema.rs"))
    p.add_argument("--keep", type=int, default=0)
    p.add_argument("--age-floor", action="store_true")
    p.add_argument("--stamped", action="store_true")
    opt = p.parse_args()
    redis = Conn(opt.port)
    redis.call("FUNCTION", "LOAD", "REPLACE", library(opt.library))
    redis.call("FLUSHALL")
    redis.call("CONFIG", "RESETSTAT")
    rooms = random.Random(7)
    # A StoredMessage without send_time: text (field 2), sender (field 3).
    member = b"\x12\x0bhello world\x1a\x02a1"
    calls, depth = opt.messages // opt.batch, 50
    done = 0
    while done < calls:
        burst = min(depth, calls - done)
        frames = []
        for _ in range(burst):
            keys = ["im:{bench-room-%d}" % rooms.randrange(opt.rooms) for _ in range(opt.batch)]
            now_us = int(time.time() * 1e6)
            now = str(now_us)
            keep = []
            if opt.keep or opt.age_floor:
                floor = str(now_us - 3_600_000_000) if opt.age_floor else "0"
                keep = [str(opt.keep), floor]
            suffix = "_keep" if keep else ""
            if opt.stamped:
                keys.sort()
                args = [now]
                for i, key in enumerate(keys):
                    run = run + 1 if i and keys[i - 1] == key else 0
                    t = now_us + run
                    if run:
                        args.append(str(t))
                    args.append(b"\x09" + t.to_bytes(8, "little", signed=True) + member)
                frames.append(encode(["FCALL", "im_send_stamped" + suffix, str(opt.batch), *keys, *args, *keep]))
            else:
                frames.append(encode(["FCALL", "im_send" + suffix, str(opt.batch), *keys,
                                      *[member] * opt.batch, now, *keep]))
        redis.sock.sendall(b"".join(frames))
        for _ in range(burst):
            redis.reply()
        done += burst
    stats = {}
    for line in redis.call("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_"):
            name, fields = line[len("cmdstat_"):].split(":", 1)
            kv = dict(f.split("=") for f in fields.split(","))
            stats[name] = (int(kv["calls"]), int(kv["usec"]))
    per_call = {n: (u / c if c else 0.0) for n, (c, u) in stats.items()}
    print(
        f"im_send: {stats['fcall'][1] / (calls * opt.batch):.2f} µs per message "
        f"({opt.messages} messages, {opt.rooms} rooms, {opt.batch} per call); per call: "
        + ", ".join(f"{n} {per_call.get(n, 0.0):.2f} µs"
                    for n in ("zadd", "zrange", "spublish", "zremrangebyrank", "zrem"))
    )


if __name__ == "__main__":
    main()
