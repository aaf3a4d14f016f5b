"""The browser's own WebSocket with permessage-deflate (Chromium offers it on every
connection) through wsgate bridge routes to a TCP echo: reports `ws.extensions`, and whether
a 1 MiB non-ASCII text and a 1 MiB binary message came back intact (the echo's bytes may come
back in several messages; they are joined).

Usage: deflate_driver.py CHROMIUM PROFILE_DIR WS_BASE_URL   (e.g. ws://127.0.0.1:1234)"""
import asyncio, json, sys

from cdp import chromium

chromium_path, profile, base = sys.argv[1], sys.argv[2], sys.argv[3]

SCRIPT = """
(async (base) => {
  const roundTrip = (path, payload, binary) => new Promise((resolve, reject) => {
    const ws = new WebSocket(base + path);
    ws.binaryType = "arraybuffer";
    const parts = [];
    let got = 0;
    const want = binary ? payload.byteLength : payload.length;
    ws.onopen = () => ws.send(payload);
    ws.onerror = () => reject(new Error("websocket error on " + path));
    ws.onmessage = (e) => {
      parts.push(e.data);
      got += binary ? e.data.byteLength : e.data.length;
      if (got < want) return;
      let same;
      if (binary) {
        const all = new Uint8Array(got);
        let at = 0;
        for (const p of parts) { all.set(new Uint8Array(p), at); at += p.byteLength; }
        const sent = new Uint8Array(payload);
        same = all.length === sent.length && all.every((v, i) => v === sent[i]);
      } else {
        same = parts.join("") === payload;
      }
      const extensions = ws.extensions;
      ws.close(1000);
      resolve({ extensions, same, messages: parts.length });
    };
  });
  const text = "größer ✓ 🎉 héllo wörld — ".repeat(40000);          // > 1 MiB of UTF-8
  const bytes = new Uint8Array(1 << 20);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7) % 251;  // compressible binary
  return JSON.stringify({
    textBytes: new TextEncoder().encode(text).length,
    text: await roundTrip("/text", text, false),
    binary: await roundTrip("/bin", bytes.buffer, true),
  });
})
"""


async def main():
    async with chromium(chromium_path, profile) as browser:
        page = await browser.open("about:blank")
        print(await page.value(f"({SCRIPT})({json.dumps(base)})"))


asyncio.run(asyncio.wait_for(main(), 120))
