#!/usr/bin/env python3
"""Screenshot of the running demo page after a message round trip.

Usage: hack/screenshot-demo.py URL OUT.png   (needs Debian's chromium and the
`websockets` package, e.g. the venv of hack/python-env.sh). Drives headless
Chromium over the DevTools protocol, waiting in real time for the reply
(--virtual-time-budget does not wait for real sockets).
"""
import asyncio, base64, json, subprocess, sys, tempfile, time, urllib.request

import websockets


async def main(url: str, out: str) -> None:
    port = 9333
    profile = tempfile.mkdtemp()
    chrome = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--window-size=900,640",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
                page = next(t for t in targets if t["type"] == "page")
                break
            except Exception:
                time.sleep(0.2)
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            n = 0

            async def call(method, **params):
                nonlocal n
                n += 1
                await ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("id") == n:
                        return msg.get("result", {})

            await call("Page.navigate", url=url)
            await asyncio.sleep(6)
            shot = await call("Page.captureScreenshot", format="png")
            with open(out, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
    finally:
        chrome.terminate()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
