"""Python `websockets` (permessage-deflate on by default) against a wsgate route: reports the
extension agreed and checks that every message comes back as sent.

Usage: deflate_client.py URL
Prints one JSON line: {"extensions": …, "sent": N, "intact": true|false, "bytes": N}"""
import asyncio, hashlib, json, random, sys

from websockets.asyncio.client import connect


async def main():
    url = sys.argv[1]
    rng = random.Random(7)
    messages = [json.dumps({"type": "user", "id": i, "to_id": i % 7, "message": f"héllo {i} ✓ " * (i % 40)})
                for i in range(300)]
    messages.append("größer ✓ 🎉 " * 80_000)                 # ~1.2 MB of non-ASCII text
    messages.append(bytes(range(256)) * 4096)                # 1 MiB, compressible binary
    messages.append(rng.randbytes(64 * 1024))                # 64 KiB that does not compress
    async with connect(url, max_size=None) as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
        intact, total = True, 0
        for m in messages:
            await ws.send(m)
            got = await asyncio.wait_for(ws.recv(), 30)
            intact &= got == m
            total += len(m.encode() if isinstance(m, str) else m)
        print(json.dumps({"extensions": extensions, "sent": len(messages), "intact": intact,
                          "bytes": total}))


asyncio.run(main())
