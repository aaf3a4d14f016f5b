"""Drives headless Chromium over the DevTools protocol (with the `websockets` client):
opens the test page, sends SIGTERM to wsgate when the page says its last session is open,
and prints the page's `results` as JSON.

Usage: cdp_driver.py CHROMIUM PAGE_URL WSGATE_PID PROFILE_DIR"""
import asyncio, json, os, re, signal, subprocess, sys

from websockets.asyncio.client import connect

chromium, url, pid, profile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]


async def main():
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "about:blank"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "HOME": profile})
    try:
        browser_ws = None
        for _ in range(500):  # bounded: Chromium prints the DevTools address once up
            line = await asyncio.to_thread(proc.stderr.readline)
            if not line:
                break
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                browser_ws = m.group(1)
                break
        if not browser_ws:
            sys.exit("chromium did not start its DevTools endpoint")
        async with connect(browser_ws, max_size=None) as cdp:
            ids = iter(range(1, 1_000_000))

            async def call(method, params=None, session=None):
                msg_id = next(ids)
                msg = {"id": msg_id, "method": method, "params": params or {}}
                if session:
                    msg["sessionId"] = session
                await cdp.send(json.dumps(msg))
                while True:
                    reply = json.loads(await cdp.recv())
                    if reply.get("id") == msg_id:
                        if "error" in reply:
                            raise RuntimeError(reply["error"])
                        return reply["result"]

            target = (await call("Target.createTarget", {"url": url}))["targetId"]
            session = (await call("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]

            async def value(expr):
                r = await call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
                return r["result"].get("value")

            signalled = False
            for _ in range(600):  # at most ~60 s
                if not signalled and await value("window.holdOpen === true"):
                    os.kill(pid, signal.SIGTERM)
                    signalled = True
                if await value("window.done === true"):
                    break
                await asyncio.sleep(0.1)
            print(json.dumps(await value("JSON.stringify(window.results)")))
    finally:
        proc.kill()
        proc.wait()


asyncio.run(main())
