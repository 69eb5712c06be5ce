#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/<target>/ (run from anywhere).

Each target's input starts with a few control bytes (see the doc comment of
fuzz_targets/<target>.rs); the seeds prepend them to realistic wire bytes.
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- http_request: [chunk seed, limits mode, head, headers, body, line] ----
SEND_BODY = b'{\n\t"chat": "chatroom12345",\n\t"text": "hi guys! :) ",\n\t"sender": "kylie"\n}'
PULL_BODY = b'{\n\t"chat": "chatroom12345",\n\t"cursor": 0,\n\t"limit": 3,\n\t"reverse": false\n}'
CURL_HEADERS = b"Host: localhost:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n"


def curl(method, path, body=None):
    head = b"%s %s HTTP/1.1\r\n" % (method, path) + CURL_HEADERS
    if body is None:
        return head + b"\r\n"
    return (head + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body)


def chunked(body, sizes):
    out, i = b"", 0
    for n in sizes:
        out += b"%x\r\n" % n + body[i:i + n] + b"\r\n"
        i += n
    if i < len(body):
        out += b"%x;ext=1\r\n" % (len(body) - i) + body[i:] + b"\r\n"
    return out + b"0\r\nX-Trailer: yes\r\n\r\n"


http = {
    "curl-send": curl(b"POST", b"/api/send", SEND_BODY),
    "curl-pull-body": curl(b"GET", b"/api/pull", PULL_BODY),
    "curl-pull-query": curl(b"GET", b"/api/pull?chat=chatroom12345&cursor=0&limit=3&reverse=false"),
    "ping-http10": b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "absolute-form": b"GET http://localhost:8080/api/pull?chat=a%3Ab HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "chunked": (b"POST /api/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: application/json\r\n\r\n" + chunked(SEND_BODY, [5, 16])),
    "expect-continue": (b"POST /api/send HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(SEND_BODY) + SEND_BODY),
    "pipelined": (curl(b"POST", b"/api/send", SEND_BODY) + b"\r\n"
                  + curl(b"GET", b"/api/pull?chat=chatroom12345")
                  + b"GET /ping HTTP/1.1\r\nConnection: close\r\n\r\n"),
    "smuggle": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bare-lf": b"GET /ping HTTP/1.1\nHost: x\n\nPOST /x HTTP/1.1\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n",
}
for name, wire in http.items():
    write("http_request", name, bytes([0, 0, 0, 0, 0, 0]) + wire)
    write("http_request", name + "-split", bytes([0x41, 0, 0, 0, 0, 0]) + wire)
    write("http_request", name + "-tiny", bytes([0x85, 1, 90, 4, 40, 30]) + wire)


# ---- rpc_frame: [max_frame selector, split seed] ----
def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_str(field, s):
    return varint(field << 3 | 2) + varint(len(s)) + s


def pb_int(field, n):
    return varint(field << 3) + varint(n)


def pb_msg(chat, text, sender, send_time):
    return pb_str(1, chat) + pb_str(2, text) + pb_str(3, sender) + pb_int(4, send_time)


def frame(id_, kind, body):
    return struct.pack(">IQB", 9 + len(body), id_, kind) + body


msg = pb_msg(b"chatroom12345", "hi guys! :) 🌍".encode(), b"kylie", 1795800669078820)
send_req = frame(1, 1, pb_str(1, msg))
pull_req = frame(2, 2, pb_str(1, b"chatroom12345") + pb_int(2, 0) + pb_int(3, 3) + pb_int(4, 0))
send_resp = frame(1, 0, pb_int(1, 0) + pb_str(2, b"") + pb_int(3, 1795800669078820))
pull_resp = frame(2, 0, pb_int(1, 0) + pb_str(3, msg) + pb_str(3, msg) + pb_int(4, 1)
                  + pb_int(5, 1795800669078819))
bad_frame = frame(3, 1, b"unknown method 9")
rpc = {
    "send-request": send_req,
    "pull-request": pull_req,
    "send-response": send_resp,
    "pull-response": pull_resp,
    "pipelined": send_req + pull_req + send_resp + pull_resp + bad_frame + frame(2**64 - 1, 2, b""),
    "negative-limit": frame(9, 2, pb_str(1, b"a:b") + pb_int(2, -1) + pb_int(3, -5)),
    "too-short": struct.pack(">I", 3) + b"abc",
    "too-large": struct.pack(">I", 0xFFFFFFFF) + b"x" * 8,
}
for name, wire in rpc.items():
    write("rpc_frame", name, bytes([0, 7]) + wire)
    write("rpc_frame", name + "-small-max", bytes([0x80 | 40, 13]) + wire)


# ---- resp_reply: [split seed] ----
resp = {
    "ok": b"+OK\r\n",
    "integer": b":123\r\n",
    "array-with-nil": b"*2\r\n$3\r\nabc\r\n$-1\r\n",
    "error": b"-ERR x\r\n",
    "pipelined": (b"+OK\r\n:1732723200000001\r\n*2\r\n$3\r\nabc\r\n$-1\r\n-ERR boom\r\n"
                  b"*-1\r\n*0\r\n$0\r\n\r\n:-42\r\n"),
    "nested": (b"*3\r\n:1795800669078820\r\n*2\r\n$13\r\nchatroom12345\r\n$5\r\nkylie\r\n"
               b"*1\r\n*1\r\n$-1\r\n"),
    "noscript": b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
}
for name, wire in resp.items():
    write("resp_reply", name, b"\x00" + wire)
    write("resp_reply", name + "-split", b"\x43" + wire)


# ---- json_request: body NUL query ----
json_seeds = {
    "send": SEND_BODY,
    "pull-body": PULL_BODY,
    "pull-query": b"\x00chat=chatroom12345&cursor=0&limit=3&reverse=false",
    "pull-query-escapes": b"\x00chat=hello+world%F0%9F%98%80&cursor=-9223372036854775808&limit=2147483647&reverse=1&x=y",
    "both": PULL_BODY + b"\x00chat=a",
    "escapes": '{"chat":"a:b","text":"quote \\" backslash \\\\ nl \\n \\u00e9 \\ud83d\\ude00 😀","sender":"s"}'.encode(),
    "wrong-types": b'{"chat":5,"text":null,"sender":"s","limit":"3"}',
}
for name, data in json_seeds.items():
    write("json_request", name, data)


# ---- jwt: [mode, bytes] (fuzz_targets/jwt.rs) ----
# Mode 0: the bytes are a token (and a header value). Valid tokens are signed
# as the target's rules expect (HS256 with b"fuzz secret", EdDSA with the
# Ed25519 key whose seed is 32 bytes of 9, valid at NOW), so the fuzzer
# starts from tokens that pass and mutates from there. Mode 1: a `sub` to mint.
import base64
import hashlib
import hmac
import json

JWT_NOW = 1_795_800_000
JWT_SECRET = b"fuzz secret"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signing_input(header, claims):
    return (b64url(json.dumps(header, separators=(",", ":")).encode()) + b"."
            + b64url(json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode()))


def hs256(claims, header=None):
    head = signing_input(header or {"alg": "HS256", "typ": "JWT"}, claims)
    return head + b"." + b64url(hmac.new(JWT_SECRET, head, hashlib.sha256).digest())


def eddsa(claims):
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        raise SystemExit("the jwt seeds need Python's `cryptography` (apt-get install python3-cryptography)")
    key = Ed25519PrivateKey.from_private_bytes(bytes([9] * 32))
    head = signing_input({"alg": "EdDSA", "typ": "JWT"}, claims)
    return head + b"." + b64url(key.sign(head))


alice = {"sub": "alice", "exp": JWT_NOW + 60}
full = {"sub": "bob", "exp": JWT_NOW + 3600, "nbf": JWT_NOW - 10, "iat": JWT_NOW - 10,
        "iss": "https://issuer.example", "aud": ["im", "other"], "chats": ["a:b", "*"]}
valid_hs = hs256(alice)
jwt_seeds = {
    "hs256": valid_hs,
    "hs256-all-claims": hs256(full),
    "hs256-unicode-sub": hs256({"sub": "zoë 😀", "exp": JWT_NOW + 60}),
    "eddsa": eddsa(alice),
    "eddsa-all-claims": eddsa(full),
    "expired": hs256({"sub": "alice", "exp": JWT_NOW - 3600}),
    "not-yet-valid": hs256({"sub": "alice", "exp": JWT_NOW + 60, "nbf": JWT_NOW + 600}),
    "alg-none": signing_input({"alg": "none"}, alice) + b".",
    "wrong-signature": valid_hs[:-4] + b"AAAA",
    "four-segments": valid_hs + b".x",
    "bearer-header": b"Bearer " + valid_hs,
}
for name, token in jwt_seeds.items():
    write("jwt", name, b"\x00" + token)
for name, sub in {"mint-alice": b"alice", "mint-unicode": "zoë 😀".encode(),
                  "mint-quotes": b'a"b\\c', "mint-empty": b""}.items():
    write("jwt", name, b"\x01" + sub)

# ---- ws_frame: [split seed, max selector] + client frames ----
def ws_frame(op, payload, fin=True, mask=b"\x37\xfa\x21\x3d", rsv=0):
    head = bytes([(0x80 if fin else 0) | rsv | op])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


WS_SEND = b'{"id":1,"op":"send","chat":"chatroom12345","text":"hi guys! :) ","sender":"kylie"}'
ws = {
    "rfc-hello": ws_frame(1, b"Hello"),
    "requests": (ws_frame(1, WS_SEND) + ws_frame(1, b'{"id":2,"op":"subscribe","chat":"room","cursor":0}')
                 + ws_frame(1, b'{"id":3,"op":"pull","chat":"room","limit":3}')),
    "fragmented-with-ping": (ws_frame(1, "héllo ".encode(), fin=False) + ws_frame(9, b"p")
                             + ws_frame(0, "wö".encode()[:2], fin=False) + ws_frame(0, "wö".encode()[2:])),
    "ping-pong-close": ws_frame(9, b"abc") + ws_frame(10, b"") + ws_frame(8, struct.pack(">H", 1000) + b"bye"),
    "medium": ws_frame(1, b" " * 300),
    "binary": ws_frame(2, b"\x00\xff"),
    "bad-utf8": ws_frame(1, b"ok \xff"),
    "reserved-bit": ws_frame(1, b"x", rsv=0x40),
    "unmasked": b"\x81\x02hi",
    "bad-close-code": ws_frame(8, struct.pack(">H", 1005)),
}
for name, wire in ws.items():
    write("ws_frame", name, bytes([0, 255]) + wire)
    write("ws_frame", name + "-split", bytes([0x41, 3]) + wire)
