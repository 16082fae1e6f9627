"""A headless Chromium driven over the DevTools protocol (Debian's chromium, no downloads).

Just enough for the UI tests: log in with an Airflow JWT as the UI's session cookie, open
a page, wait for text to appear, read the page text, save a screenshot as a test artefact.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websockets

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"


class Browser:
    def __init__(self, port: int = 9333) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if not exe:
            raise RuntimeError("chromium is not installed (make install adds it)")
        self.port = port
        self.profile = tempfile.mkdtemp(prefix="bdr-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile}", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def visit(self, url: str, *, cookie: tuple[str, str] | None = None, wait_for: str | None = None,
              screenshot: str | None = None, timeout: float = 60, click: str | None = None,
              then_wait_for: str | None = None) -> str:
        """Open url (with an optional cookie), wait until the page text contains `wait_for`, return the text.

        `click`: then click the first button whose text is exactly that, and wait for `then_wait_for`.
        """
        return asyncio.run(self._visit(url, cookie, wait_for, screenshot, timeout, click, then_wait_for))

    async def _visit(self, url: str, cookie: tuple[str, str] | None, wait_for: str | None, screenshot: str | None,
                     timeout: float, click: str | None = None, then_wait_for: str | None = None) -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        target = json.loads(urllib.request.urlopen(req, timeout=10).read())
        async with websockets.connect(target["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024) as ws:
            ids = iter(range(1, 10_000))

            async def call(method: str, **params: Any) -> dict[str, Any]:
                msg_id = next(ids)
                await ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("id") == msg_id:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg.get("result", {})

            await call("Network.enable")
            await call("Network.clearBrowserCookies")  # every visit starts logged out
            if cookie:
                await call("Network.setCookie", name=cookie[0], value=cookie[1], url=url)
            await call("Page.enable")
            await call("Page.navigate", url=url)
            async def text_now() -> str:
                res = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                 returnByValue=True)
                return res.get("result", {}).get("value") or ""

            async def wait_text(needle: str | None) -> str:
                deadline = time.monotonic() + timeout
                text = ""
                while time.monotonic() < deadline:
                    text = await text_now()
                    if (needle is None and text) or (needle and needle in text):
                        break
                    await asyncio.sleep(0.5)
                return text

            text = await wait_text(wait_for)
            if click:
                js = ("(() => { const b = [...document.querySelectorAll('button')].find(x => x.innerText.trim() === "
                      + json.dumps(click) + "); if (b) { b.click(); return true } return false })()")
                await call("Runtime.evaluate", expression=js, returnByValue=True)
                text = await wait_text(then_wait_for)
            await asyncio.sleep(1.0)  # let late fonts and layout settle for the screenshot
            if screenshot:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                (ARTIFACTS / screenshot).write_bytes(base64.b64decode(shot["data"]))
            res = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                             returnByValue=True)
            return res.get("result", {}).get("value") or text
