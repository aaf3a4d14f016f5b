"""The admin listener's page in headless Chromium: opens it (with the admin token in its URL),
waits for the live session the test holds to appear as a row, clicks its close button, and
waits for the row to go. Prints what it saw.

Usage: admin_driver.py CHROMIUM PROFILE_DIR PAGE_URL SESSION_ID"""
import asyncio, json, sys

from cdp import chromium

chromium_path, profile, url, session_id = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ROW = f"document.getElementById('session-{session_id}')"


async def main():
    async with chromium(chromium_path, profile) as browser:
        page = await browser.open(url)
        await page.wait_for(f"session {session_id}'s row", f"!!{ROW}")
        cells = await page.value(f"[...{ROW}.cells].map(c => c.textContent)")
        await page.value(f"{ROW}.querySelector('button').click()")
        await page.wait_for(f"session {session_id}'s row to go after its close button",
                            f"!{ROW} && document.getElementById('status').textContent.includes('refreshed')")
        status = await page.value("document.getElementById('status').textContent")
        print(json.dumps({"row": cells, "status": status}))


asyncio.run(main())
