"""Headless Chromium loads a page from wsgate over HTTP/2 and the page opens its WebSockets
(tests/browser/h2_page.html). Prints what the page saw, the protocol the page came over and
the status of every WebSocket handshake, from the DevTools Network events.

Usage: h2_driver.py CHROMIUM PROFILE_DIR PAGE_URL"""
import asyncio, json, sys

from cdp import chromium

chromium_path, profile, url = sys.argv[1], sys.argv[2], sys.argv[3]


async def main():
    async with chromium(chromium_path, profile) as browser:
        page = await browser.open(url, network=True)
        await page.wait_for("every socket to close", "window.done === true", seconds=30)
        results = await page.value("JSON.stringify(window.results)")
        # One more round trip, so the last events have arrived.
        await page.value("1")
        page_protocol = [e["params"]["response"].get("protocol") for e in browser.events
                         if e["method"] == "Network.responseReceived"
                         and e["params"]["response"]["url"].startswith(url.split("?")[0])]
        handshakes = [e["params"]["response"]["status"] for e in browser.events
                      if e["method"] == "Network.webSocketHandshakeResponseReceived"]
        print(json.dumps({"page": json.loads(results), "page_protocol": page_protocol,
                          "handshakes": handshakes}))


asyncio.run(main())
