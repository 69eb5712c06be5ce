"""GET /api/ws through another implementation of RFC 6455: the Python
`websockets` client (strict: it fails on any frame a server must not send),
against the real im-server binary on a free port (embedded store).

Run by .ci/test from its virtualenv:  python -m unittest discover -s tests/websocket -v
Environment: IM_SERVER_BIN (default target/debug/im-server). Raw frames that
break the protocol are sent from Rust instead (tests/ws.rs).
"""

import asyncio
import json
import os
import re
import subprocess
import threading
import time
import unittest

import websockets
from websockets.exceptions import ConnectionClosedError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER_BIN = os.environ.get("IM_SERVER_BIN", os.path.join(ROOT, "target", "debug", "im-server"))


def drain(pipe):
    with pipe:
        pipe.read()


def start_server(*args):
    proc = subprocess.Popen(
        [SERVER_BIN, "all", "--rpc-listen", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        match = re.search(r"http listening on (\S+)", line)
        if match:
            threading.Thread(target=drain, args=(proc.stderr,), daemon=True).start()
            return proc, "ws://" + match.group(1) + "/api/ws"
    proc.kill()
    raise RuntimeError("im-server did not start")


async def call(ws, request):
    """Sends `request`; its reply (frames before it are returned too)."""
    await ws.send(json.dumps(request))
    before = []
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg.get("id") == request["id"]:
            return msg, before
        before.append(msg)


class WebSocket(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server, cls.url = start_server("--ws-max-message", "4096", "--ws-ping-interval-s", "1")

    @classmethod
    def tearDownClass(cls):
        cls.server.kill()
        cls.server.wait()

    def run_async(self, coro):
        asyncio.run(asyncio.wait_for(coro, 60))

    def test_subscribe_then_send_from_another_connection(self):
        async def go():
            async with websockets.connect(self.url) as sub, websockets.connect(self.url) as pub:
                sent, _ = await call(pub, {"id": 1, "op": "send", "chat": "py", "text": "first", "sender": "a"})
                self.assertTrue(sent["ok"], sent)
                reply, _ = await call(sub, {"id": "s", "op": "subscribe", "chat": "py"})
                self.assertEqual(reply, {"id": "s", "ok": True})
                history = json.loads(await sub.recv())
                self.assertEqual(history["event"], "message")
                self.assertEqual(history["message"]["send_time"], sent["send_time"])
                live_sent, _ = await call(pub, {"id": 2, "op": "send", "chat": "py", "text": "live", "sender": "b"})
                live = json.loads(await asyncio.wait_for(sub.recv(), 10))
                self.assertEqual(live["message"], {"chat": "py", "text": "live", "sender": "b",
                                                   "send_time": live_sent["send_time"]})
                page, _ = await call(pub, {"id": 3, "op": "pull", "chat": "py", "reverse": True})
                self.assertEqual([m["text"] for m in page["messages"]], ["first", "live"])
        self.run_async(go())

    def test_pipelined_requests_are_answered_by_id(self):
        async def go():
            async with websockets.connect(self.url) as ws:
                for i in range(100):
                    await ws.send(json.dumps({"id": i, "op": "send", "chat": "pipe-py", "text": f"m{i}", "sender": "a"}))
                replies = {}
                while len(replies) < 100:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    replies[msg["id"]] = msg
                self.assertEqual(sorted(replies), list(range(100)))
                self.assertTrue(all(r["ok"] for r in replies.values()))
                times = [replies[i]["send_time"] for i in range(100)]
                self.assertEqual(len(set(times)), 100)
        self.run_async(go())

    def test_ping_pong_idle_pings_and_a_clean_close(self):
        async def go():
            # The library answers the server's idle pings (every 1 s here):
            # the connection outlives several intervals.
            ws = await websockets.connect(self.url, ping_interval=None)
            pong = await ws.ping(b"py")
            await asyncio.wait_for(pong, 5)
            await asyncio.sleep(3.5)
            reply, _ = await call(ws, {"id": 1, "op": "pull", "chat": "idle"})
            self.assertTrue(reply["ok"])
            await ws.close()
            self.assertEqual(ws.close_code, 1000)
            self.assertEqual(ws.protocol.close_rcvd.code, 1000)
        self.run_async(go())

    def test_a_message_over_the_limit_closes_with_1009(self):
        async def go():
            async with websockets.connect(self.url) as ws:
                await ws.send(json.dumps({"id": 1, "op": "send", "chat": "big", "text": "x" * 5000}))
                with self.assertRaises(ConnectionClosedError):
                    await asyncio.wait_for(ws.recv(), 10)
                self.assertEqual(ws.protocol.close_rcvd.code, 1009)
        self.run_async(go())

    def test_a_bad_request_fails_alone(self):
        async def go():
            async with websockets.connect(self.url) as ws:
                await ws.send("not json")
                err = json.loads(await ws.recv())
                self.assertEqual(err["id"], None)
                self.assertEqual(err["error"]["code"], "invalid_request")
                reply, _ = await call(ws, {"id": 2, "op": "pull", "chat": ""})
                self.assertEqual(reply["error"]["code"], "invalid_request")
                reply, _ = await call(ws, {"id": 3, "op": "pull", "chat": "ok"})
                self.assertTrue(reply["ok"])
        self.run_async(go())


if __name__ == "__main__":
    unittest.main()
