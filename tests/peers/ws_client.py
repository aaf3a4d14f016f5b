"""A WebSocket client built on Python `websockets`, driven by tests/python_peer.rs.

Usage: ws_client.py SCENARIO URL
Prints one JSON object with what it observed; the Rust test asserts on it."""
import asyncio, hashlib, json, sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def echo(url):
    out = {}
    async with connect(url, max_size=None) as ws:
        await ws.send("héllo wörld")
        out["text"] = await ws.recv()
        await ws.send(bytes(range(256)) * 300)
        b = await ws.recv()
        out["binary_sha256"] = hashlib.sha256(b).hexdigest()
        out["binary_expected"] = hashlib.sha256(bytes(range(256)) * 300).hexdigest()
        await ws.close(code=1000, reason="bye")
        out["close_rcvd"] = ws.close_code
    return out


async def read_until_closed(ws):
    """Read everything until wsgate closes; report size and close code and reason."""
    out = {"bytes": 0}
    try:
        async for m in ws:
            out["bytes"] += len(m)
    except ConnectionClosed:
        pass
    out["close_rcvd"] = ws.close_code
    out["close_reason"] = ws.close_reason
    return out


async def drain(url):
    """Read everything the backend sends until wsgate closes."""
    async with connect(url, max_size=None) as ws:
        return await read_until_closed(ws)


async def send_then_read(url):
    """Send one message, then read until closed (for backends that fail)."""
    async with connect(url, max_size=None) as ws:
        await ws.send(b"trigger")
        return await read_until_closed(ws)


async def subprotocol(url):
    async with connect(url, subprotocols=["chat", "binary"]) as ws:
        return {"subprotocol": ws.subprotocol}


async def refused(url):
    try:
        async with connect(url):
            return {"status": 101}
    except Exception as e:  # InvalidStatus carries the HTTP response
        resp = getattr(e, "response", None)
        return {"status": getattr(resp, "status_code", None), "error": type(e).__name__}


async def echo_tls(url):
    """wss with an ssl context that trusts only the test CA (argv[3])."""
    import ssl
    ctx = ssl.create_default_context(cafile=sys.argv[3])
    async with connect(url, ssl=ctx) as ws:
        await ws.send("over wss")
        out = {"text": await ws.recv(), "cn": dict(x[0] for x in ws.transport.get_extra_info("peercert")["subject"])["commonName"]}
        await ws.close()
        out["close_rcvd"] = ws.close_code
    return out


scenario, url = sys.argv[1], sys.argv[2]
result = asyncio.run(asyncio.wait_for(globals()[scenario](url), timeout=20))
print(json.dumps(result))
