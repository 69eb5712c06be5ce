#!/usr/bin/env python3
"""bench/retention_memory.py: Redis `used_memory` over time under a steady
send load, to see retention hold it flat (issue 21).

Usage: bench/retention_memory.py --http HOST:PORT --redis-port P
           [--chats 1000] [--rate 1000] [--seconds 120] [--every 5]
           [--threads 4] [--text-bytes 100]

Sends `--rate` messages a second (spread over `--threads` keep-alive
connections) through the gateway at HOST:PORT to `--chats` chats in turn,
and every `--every` seconds prints the messages sent so far, Redis's
`used_memory` (INFO memory, on 127.0.0.1:P) and the mean ZCARD of 20
sampled chats. Start the server with `--retain-messages 100` (and/or
`--retain-age-s`): once every chat holds 100 messages (chats x 100 sends),
`used_memory` should stop growing. Without retention it grows by the
messages' size forever. Uses the standard library only.
"""
import argparse
import http.client
import json
import socket
import threading
import time


def redis_command(port, *args):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        out = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a), a) for a in (x.encode() for x in args)
        )
        sock.sendall(out)
        reader = sock.makefile("rb")
        line = reader.readline()
        if line[:1] == b"$":
            return reader.read(int(line[1:-2]) + 2)[:-2].decode()
        return line[1:-2].decode()


def used_memory(port):
    info = redis_command(port, "INFO", "memory")
    fields = dict(l.split(":", 1) for l in info.splitlines() if ":" in l)
    return int(fields["used_memory"])


def sender(opt, index, sent, stop):
    host, port = opt.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    per_thread = opt.rate / opt.threads
    text = "x" * opt.text_bytes
    n, start = 0, time.monotonic()
    while not stop.is_set():
        chat = "mem-%d" % ((n * opt.threads + index) % opt.chats)
        body = json.dumps({"chat": chat, "sender": "bench", "text": text})
        conn.request("POST", "/api/send", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            sent[index] += 1
        n += 1
        # Steady rate: sleep until this thread's next slot.
        delay = start + n / per_thread - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http", required=True)
    p.add_argument("--redis-port", type=int, required=True)
    p.add_argument("--chats", type=int, default=1000)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--every", type=float, default=5)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--text-bytes", type=int, default=100)
    opt = p.parse_args()
    sent = [0] * opt.threads
    stop = threading.Event()
    threads = [
        threading.Thread(target=sender, args=(opt, i, sent, stop), daemon=True)
        for i in range(opt.threads)
    ]
    start = time.monotonic()
    print("seconds  sent      used_memory  mean_zcard(20 chats)")
    for t in threads:
        t.start()
    while time.monotonic() - start < opt.seconds:
        time.sleep(opt.every)
        sample = [
            int(redis_command(opt.redis_port, "ZCARD", "im:{mem-%d}" % (i * opt.chats // 20)))
            for i in range(20)
        ]
        print(
            f"{time.monotonic() - start:7.1f}  {sum(sent):8d}  {used_memory(opt.redis_port):11d}  "
            f"{sum(sample) / len(sample):.1f}",
            flush=True,
        )
    stop.set()


if __name__ == "__main__":
    main()
