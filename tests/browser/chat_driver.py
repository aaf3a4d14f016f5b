"""examples/chat in headless Chromium: three pages register ids 1, 2 and 3; page 1 sends a
message over 64 KiB of non-ASCII text to id 2; then 2 sends to 3 and 3 to 1 (each sent only
after the one before arrived, so a misrouted earlier message would already be there). Prints
what each page received, with the long message replaced by whether it arrived intact.

Usage: chat_driver.py CHROMIUM PROFILE_DIR PAGE_URL"""
import asyncio, json, sys

from cdp import chromium

chromium_path, profile, url = sys.argv[1], sys.argv[2], sys.argv[3]
LONG = "héllo wörld ✓ 你好 🎉 — " * 3500  # ~95 KiB of UTF-8


async def main():
    async with chromium(chromium_path, profile) as browser:
        pages = [await browser.open(url) for _ in range(3)]
        for i, page in enumerate(pages, 1):
            await page.wait_for(f"page {i}'s WebSocket to open", "window.chat && chat.state === 'open'")
            await page.value(f"chat.register('{i}', {json.dumps(['one', 'two', 'three'][i - 1])})")
        for i, page in enumerate(pages, 1):
            await page.wait_for(f"page {i}'s registration answer",
                                "chat.received.some(m => m.type === 'system' && m.message === 'Initial message received')")

        def got(text):
            return f"chat.received.some(m => m.type === 'usermsg' && m.message === {json.dumps(text)})"

        await pages[0].value(f"chat.send('2', {json.dumps(LONG)}, '#ff0000')")
        await pages[1].wait_for("the long message on page 2", got(LONG))
        await pages[1].value("chat.send('3', 'from two', '#00aa00')")
        await pages[2].wait_for("page 2's message on page 3", got("from two"))
        await pages[2].value("chat.send('1', 'from three — ✓', '#0000ff')")
        await pages[0].wait_for("page 3's message on page 1", got("from three — ✓"))

        results = []
        for page in pages:
            received = await page.value("JSON.stringify(chat.received)")
            results.append([
                {**m, "message": "<long message, intact>" if m.get("message") == LONG else m.get("message")}
                for m in json.loads(received)])
        print(json.dumps({"long_utf8_bytes": len(LONG.encode()), "pages": results}))


asyncio.run(main())
