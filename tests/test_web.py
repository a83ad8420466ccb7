"""The chat page in a real browser: Playwright drives Debian's headless chromium (installed by runs/test.sh, never
downloaded by Playwright) against the server on loopback: it sends a message, sees the streamed answer and a
thinking block, and saves a screenshot."""

import os
import shutil

import pytest

pytest.importorskip("playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")

from tests.test_serve import Server, engine, tok  # noqa: E402,F401  (fixtures)


def test_chat_page_streams_answer_and_thinking(engine, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright
    server = Server(engine)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                              "--disable-background-networking", "--disable-component-update",
                                              "--disable-sync"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.port}/")
            assert "nanoseek" in page.title()
            page.fill("#budget", "4")
            page.fill("#maxtok", "24")
            page.fill("#q", "What is 2 + 3?")
            page.click("#send")
            page.wait_for_selector(".msg.user")
            page.wait_for_function("document.querySelector('#send').disabled === false", timeout=60_000)
            think = page.locator("details.think .tt")
            assert think.count() == 1 and len(think.text_content()) > 0  # the thinking block (collapsed once answering)
            answer = page.locator(".msg.assistant .answer").inner_text()
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
            assert page.locator(".err").count() == 0
            # a second turn keeps the conversation
            page.fill("#q", "And 4 + 4?")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.user').length === 2", timeout=30_000)
            page.wait_for_function("document.querySelector('#send').disabled === false", timeout=60_000)
            assert page.locator(".msg.assistant").count() == 2
            browser.close()
        print(f"screenshot: {shot} (answer {answer[:40]!r})")
    finally:
        server.stop()
