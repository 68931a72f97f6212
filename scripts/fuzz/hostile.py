#!/usr/bin/env python3
"""The hostile inputs of issue 24, sent to a live API after schemathesis.

Each case says what a careful service answers; any other answer (a 5xx
above all) is a failure. Standard library only.

    hostile.py BASE_URL API_KEY      (exit 0 when every case held)
"""

import base64
import http.client
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.parse
import zlib

BASE, KEY = sys.argv[1], sys.argv[2]
URL = urllib.parse.urlparse(BASE)
failures = []


def request(method, path, body=None, key=KEY, headers=None, timeout=60):
    conn = http.client.HTTPConnection(URL.hostname, URL.port, timeout=timeout)
    h = {"Content-Type": "application/json"}
    if key is not None:
        h["X-API-Key"] = key
    h.update(headers or {})
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    started = time.monotonic()
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {"raw": raw[:200].decode("latin-1")}
    return r.status, parsed, time.monotonic() - started


def expect(name, got, statuses, code=None, contains=None):
    status, body, took = got
    ok = status in statuses
    if ok and code is not None:
        ok = body.get("code") == code
    if ok and contains is not None:
        ok = contains in str(body.get("error", ""))
    print(f"hostile: {'ok  ' if ok else 'FAIL'} {name}: {status} {body.get('code', '')} in {took:.2f} s")
    if not ok:
        failures.append(f"{name}: {status} {json.dumps(body)[:300]}")


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width, height, extra_chunks=()):
    """A real RGB PNG (a gradient), with `extra_chunks` after IHDR."""
    rows = b"".join(b"\0" + bytes((x * 7 + y * 3) & 0xFF for x in range(width * 3)) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    for c in extra_chunks:
        out += c
    return out + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def zeros_deflated(inflated_mib):
    """A zlib stream of `inflated_mib` MiB of zeros (about 1 KB per MiB)."""
    c = zlib.compressobj(9)
    block = bytes(1 << 20)
    out = b"".join(c.compress(block) for _ in range(inflated_mib))
    return out + c.flush()


def save(user, content_b64, extra=None, key=KEY):
    body = {"user_id": user, "app_source": "imagegene", "project_type": "ai_artwork",
            "title": "hostile", "content": content_b64}
    body.update(extra or {})
    return request("POST", "/api/unified/save-project", body, key=key)


user = f"hostile-{os.getpid()}"
expect("grant", request("POST", "/api/unified/add-credits",
                        {"user_id": user, "amount": 1000, "reason": "hostile", "reference": f"h-{user}"}), {200})

# 1. Image bombs in metadata: refused before any decoder, naming content.
profile = zeros_deflated(2048)  # 2 GiB of zeros inflated
iccp = chunk(b"iCCP", b"bomb\0\0" + profile)
expect("iCCP bomb (2 GiB inflated)", save(user, base64.b64encode(png(64, 64, [iccp])).decode()),
       {400}, "invalid_request", "content:")
ztxt = chunk(b"zTXt", b"Comment\0\0" + profile)
expect("zTXt bomb", save(user, base64.b64encode(png(64, 64, [ztxt])).decode(), {"store_original": True}),
       {400}, "invalid_request", "content:")
small = chunk(b"tEXt", b"Comment\0a small, honest comment")
expect("a PNG with a small text chunk", save(user, base64.b64encode(png(64, 64, [small])).decode()), {202})

# 2. Stalled uploads hold no save slot: eight silent ones, then a real save.
silent = []
for _ in range(8):
    s = socket.create_connection((URL.hostname, URL.port), timeout=30)
    s.sendall(("POST /api/unified/save-project HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"X-API-Key: {KEY}\r\nContent-Length: 1000000\r\n\r\n").encode())
    silent.append(s)
time.sleep(0.5)
expect("a save while eight uploads stall", save(user, base64.b64encode(png(32, 32)).decode()), {202})
for s in silent:
    s.close()

# 3. Unauthenticated load: bogus keys are refused (401, or 429 once the
# address used up its failures), never a 5xx; /health keeps answering.
def flood(n, results):
    for i in range(n):
        status, _, _ = request("GET", f"/api/unified/user-info?user_id={user}", key=os.urandom(16).hex())
        results.append(status)


results = []
threads = [threading.Thread(target=flood, args=(60, results)) for _ in range(4)]
for t in threads:
    t.start()
health = [request("GET", "/health", key=None)[0] for _ in range(100)]
for t in threads:
    t.join()
bad = [s for s in results if s not in (401, 429)]
print(f"hostile: {'ok  ' if not bad else 'FAIL'} 240 bogus keys: {results.count(401)} x 401, {results.count(429)} x 429")
if bad:
    failures.append(f"bogus keys answered {sorted(set(bad))}")
if set(health) != {200}:
    failures.append(f"/health answered {sorted(set(health))} under the flood")

# 4. Free text that reads differently from what it stores.
expect("deduct", request("POST", "/api/unified/deduct-credits",
                         {"user_id": user, "amount": 5, "app_name": "imagegene", "project_code": "h-1"}), {200})
for reason in ["refund \u202e001\u202c", "a\u2066b\u2069", "zero\u200bwidth", "bom\ufeff"]:
    expect(f"reason {reason!r}", request("POST", "/api/unified/refund-credits",
                                         {"user_id": user, "project_code": "h-1", "reason": reason}),
           {400}, "invalid_request", "reason:")

# 5. Metadata: measured before it is parsed; deep nesting is a 400.
expect("2 MB of metadata", save(user, base64.b64encode(png(8, 8)).decode(),
                                {"metadata": {"x": "y" * 2_000_000}}), {400}, "invalid_request", "metadata:")
expect("metadata nested 100,000 deep", request(
    "POST", "/api/unified/save-project",
    b'{"user_id":"' + user.encode() + b'","app_source":"imagegene","project_type":"t","title":"t",'
    b'"content":"aGVsbG8=","metadata":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), {400})

# 6. Settling for less inside the window is a refund of the rest; without
# app_name it finds the reservation as refunds do.
expect("settle for 0 inside the window, no app_name", request(
    "POST", "/api/unified/settle-credits", {"user_id": user, "project_code": "h-1", "amount": 0}), {200})
expect("deduct", request("POST", "/api/unified/deduct-credits",
                         {"user_id": user, "amount": 5, "app_name": "imagegene", "project_code": "h-2"}), {200})
expect("settle for 2 of 5", request(
    "POST", "/api/unified/settle-credits", {"user_id": user, "project_code": "h-2", "amount": 2}), {200})
expect("settle again for another amount", request(
    "POST", "/api/unified/settle-credits", {"user_id": user, "project_code": "h-2", "amount": 1}),
       {409}, "idempotency_conflict")

if failures:
    print("hostile: FAILED:")
    for f in failures:
        print("  -", f)
    sys.exit(1)
print("hostile: every case held")
