"""Drives headless Chromium over the DevTools protocol (tests/browser/cdp.py): opens the test
page, sends SIGTERM to wsgate when the page says its last session is open, and prints the
page's `results` as JSON.

Usage: cdp_driver.py CHROMIUM PAGE_URL WSGATE_PID PROFILE_DIR"""
import asyncio, json, os, signal, sys

from cdp import chromium

chromium_path, url, pid, profile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]


async def main():
    async with chromium(chromium_path, profile) as browser:
        page = await browser.open(url)
        signalled = False
        for _ in range(600):  # at most ~60 s
            if not signalled and await page.value("window.holdOpen === true"):
                os.kill(pid, signal.SIGTERM)
                signalled = True
            if await page.value("window.done === true"):
                break
            await asyncio.sleep(0.1)
        print(json.dumps(await page.value("JSON.stringify(window.results)")))


asyncio.run(main())
