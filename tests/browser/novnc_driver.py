"""noVNC in headless Chromium against VNC servers behind wsgate: for each case, opens the
page, waits for the RFB connection and for the screen's colour on the canvas, moves the mouse
over the canvas and waits until the X server's pointer is there (read with tests/novnc/x11.py).
Prints one JSON result per case.

Usage: novnc_driver.py CHROMIUM PROFILE_DIR CASES_JSON
  CASES_JSON: [{"url": …, "display": ":N", "colour": "rrggbb", "at": [x, y]}, …]"""
import asyncio, json, os, subprocess, sys

from cdp import chromium

chromium_path, profile, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
x11 = os.path.join(os.path.dirname(__file__), "..", "novnc", "x11.py")

CENTRE_PIXEL = """(() => {
  const c = document.querySelector('#screen canvas');
  if (!c || c.width === 0) return null;
  const d = c.getContext('2d').getImageData(c.width >> 1, c.height >> 1, 1, 1).data;
  return [d[0], d[1], d[2]].map(v => v.toString(16).padStart(2, '0')).join('');
})()"""


def pointer(display):
    out = subprocess.run([sys.executable, x11, "pointer", display], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    return [int(v) for v in out.split()]


async def run_case(browser, case):
    page = await browser.open(case["url"])
    result = {"url": case["url"]}
    result["state"] = await page.wait_for("noVNC to connect", "window.vncState === 'connected' && window.vncState")
    result["size"] = await page.value("(() => { const c = document.querySelector('#screen canvas'); return [c.width, c.height]; })()")
    result["pixel"] = await page.wait_for(
        f"the canvas to show #{case['colour']}",
        f"(() => {{ const p = {CENTRE_PIXEL}; return p === '{case['colour']}' && p; }})()")
    x, y = case["at"]
    await page.mouse("mouseMoved", x, y)
    for _ in range(100):  # at most ~10 s
        result["pointer"] = await asyncio.to_thread(pointer, case["display"])
        if result["pointer"] == [x, y]:
            break
        await asyncio.sleep(0.1)
    return result


async def main():
    async with chromium(chromium_path, profile) as browser:
        results = []
        for case in cases:
            try:
                results.append(await run_case(browser, case))
            except Exception as e:  # reported, and the Rust test fails on it
                results.append({"url": case["url"], "error": str(e)})
        print(json.dumps(results))


asyncio.run(main())
