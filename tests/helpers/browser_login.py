"""A page's text in headless Chromium after logging in to HTTP basic authentication, as a person
does in the browser's login prompt: Chromium driven over its DevTools protocol answers each
authentication challenge (the page's own and its scripts' requests) with the user and password.
(Credentials in the URL do not work: the MLflow UI's scripts refuse to fetch from such a URL.)"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable


def page_text_after_login(chromium: str, url: str, user: str, password: str,
                          ready: Callable[[str], bool], timeout: float = 120) -> str:
    """The page's ``document.body.innerText`` (whitespace collapsed) once ``ready`` accepts it,
    or at ``timeout`` seconds; also returns the number of challenges answered, as
    ``text + "\\n[challenges: N]"``."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
                                    f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            began = time.monotonic()
            while not port_file.exists() or not port_file.read_text().strip():
                if time.monotonic() - began > 60:
                    raise AssertionError("Chromium opened no DevTools port within 60 s")
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            page = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
            return asyncio.run(_drive(page, url, user, password, ready, timeout))
        finally:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.wait()


async def _drive(page: str, url: str, user: str, password: str, ready, timeout: float) -> str:
    import websockets

    ids = itertools.count(1)
    challenges = 0
    async with websockets.connect(page, max_size=None) as ws:
        async def send(method: str, **params) -> int:
            number = next(ids)
            await ws.send(json.dumps({"id": number, "method": method, "params": params}))
            return number

        async def pump(until_id: int | None, seconds: float):
            """Answer paused requests and challenges; return the result of ``until_id``."""
            nonlocal challenges
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while loop.time() < end:
                try:
                    message = json.loads(await asyncio.wait_for(ws.recv(), timeout=max(0.05, end - loop.time())))
                except asyncio.TimeoutError:
                    break
                method = message.get("method")
                if method == "Fetch.requestPaused":
                    await send("Fetch.continueRequest", requestId=message["params"]["requestId"])
                elif method == "Fetch.authRequired":
                    challenges += 1
                    await send("Fetch.continueWithAuth", requestId=message["params"]["requestId"],
                               authChallengeResponse={"response": "ProvideCredentials", "username": user,
                                                      "password": password})
                elif until_id is not None and message.get("id") == until_id:
                    return message.get("result", {})
            return None

        await send("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
        await send("Page.navigate", url=url)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        text = ""
        while loop.time() < end:
            await pump(None, 2.0)
            asked = await send("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                               returnByValue=True)
            result = await pump(asked, 30.0) or {}
            text = re.sub(r"\s+", " ", str(result.get("result", {}).get("value", "")))
            if ready(text):
                break
        return f"{text}\n[challenges: {challenges}]"
