"""Headless Chromium (Debian's `chromium`) over the DevTools protocol, with the `websockets`
client: start it, open pages, evaluate JavaScript, send input. Every wait is bounded."""
import asyncio, json, os, re, subprocess, sys
from contextlib import asynccontextmanager

from websockets.asyncio.client import connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0"]


class Page:
    def __init__(self, browser, session):
        self.browser, self.session = browser, session

    async def value(self, expr):
        r = await self.browser.call("Runtime.evaluate",
                                    {"expression": expr, "returnByValue": True, "awaitPromise": True},
                                    self.session)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_for(self, what, expr, seconds=20):
        """Polls `expr` every 100 ms until it is truthy; fails naming `what` after `seconds`."""
        for _ in range(int(seconds * 10)):
            v = await self.value(expr)
            if v:
                return v
            await asyncio.sleep(0.1)
        raise TimeoutError(f"timed out after {seconds} s waiting for {what}")

    async def mouse(self, kind, x, y, button="none", buttons=0):
        await self.browser.call("Input.dispatchMouseEvent",
                                {"type": kind, "x": x, "y": y, "button": button,
                                 "buttons": buttons, "clickCount": 1 if button != "none" else 0},
                                self.session)


class Browser:
    def __init__(self, cdp):
        self.cdp = cdp
        self.ids = iter(range(1, 1_000_000))
        self.events = []  # every event seen while waiting for replies (after Network.enable…)

    async def call(self, method, params=None, session=None):
        msg_id = next(self.ids)
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.cdp.send(json.dumps(msg))
        while True:
            reply = json.loads(await asyncio.wait_for(self.cdp.recv(), 60))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    async def open(self, url, network=False):
        """A new tab at `url`; with `network`, the Network domain is on before it loads, so
        `events` gets its requests and WebSocket handshakes."""
        target = (await self.call("Target.createTarget",
                                  {"url": "about:blank" if network else url}))["targetId"]
        session = (await self.call("Target.attachToTarget",
                                   {"targetId": target, "flatten": True}))["sessionId"]
        page = Page(self, session)
        if network:
            await self.call("Network.enable", {}, session)
            await self.call("Page.navigate", {"url": url}, session)
        return page


@asynccontextmanager
async def chromium(executable, profile):
    """A running headless Chromium with its profile (and $HOME, for its NSS database) in
    `profile`; killed on exit."""
    proc = subprocess.Popen([executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "HOME": profile})
    try:
        address = None
        for _ in range(500):  # bounded: Chromium prints the DevTools address once up
            line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 60)
            if not line:
                break
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                address = m.group(1)
                break
        if not address:
            sys.exit("chromium did not start its DevTools endpoint")
        async with connect(address, max_size=None) as cdp:
            yield Browser(cdp)
    finally:
        proc.kill()
        proc.wait()
