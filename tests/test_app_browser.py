"""End to end in a real browser: ``streamlit run apps/chat.py`` on a free localhost port with a
tiny random checkpoint, driven by Playwright for Python in headless Debian Chromium.

Needs ``playwright`` (pip, in the ``test`` extra) and a Chromium: Debian's ``/usr/bin/chromium``
(``apt-get install chromium``, what CI uses), else Playwright's own (``python -m playwright install
chromium``); without either the test is skipped with that advice.  Set ``MLX_DSVL_APP_SCREENSHOT=docs/app.png`` to also write
the README's screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def find_chromium():
    """Debian's Chromium, else the one ``python -m playwright install chromium`` downloads."""
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(path).exists():
            return path
    preload = os.environ.pop("LD_PRELOAD", None)  # Playwright's driver crashes with OpenBLAS preloaded
    try:
        with sync_api.sync_playwright() as p:
            path = p.chromium.executable_path
        return path if path and Path(path).exists() else None
    except Exception:  # noqa: BLE001 -- no driver, no browser: skip below
        return None
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip("no Chromium for the real-browser test: apt-get install chromium (Debian/Ubuntu) or "
                "python -m playwright install chromium", allow_module_level=True)
pytest.importorskip("streamlit", minversion="1.64", reason="the app needs streamlit>=1.64 (pip install -e '.[app]')")
expect = sync_api.expect
expect.set_options(timeout=60_000)  # assertions wait up to a minute (slow CI machines)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def other_addresses():
    """This machine's non-loopback IPv4 addresses (to check that nobody else can connect)."""
    found = set()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))  # no packet is sent
            found.add(s.getsockname()[0])
    except OSError:
        pass
    try:
        found |= {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        pass
    return sorted(a for a in found if not a.startswith("127."))


@pytest.fixture
def server(tiny_dir, tmp_path):
    """The app as a user starts it, from the repository root."""
    port = free_port()
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "apps/chat.py", "--server.port", str(port),
         "--server.headless", "true", "--server.fileWatcherType", "none",
         "--", "--model", str(tiny_dir), "--max-tokens", "12", "--top-p", "0.9"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("streamlit did not start:\n" + (tmp_path / "streamlit.log").read_text())
        time.sleep(0.3)
    try:
        yield url, port, tmp_path / "streamlit.log"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def landscape(path: Path) -> Path:
    """A small synthetic picture (sky, sun, hills) to upload."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (480, 320))
    d = ImageDraw.Draw(img)
    for y in range(320):
        d.line([(0, y), (480, y)], fill=(40 + y // 3, 110 + y // 4, 220 - y // 3))
    d.ellipse([330, 40, 410, 120], fill=(255, 205, 60))
    d.polygon([(0, 320), (0, 210), (120, 150), (250, 230), (360, 170), (480, 240), (480, 320)], fill=(50, 120, 60))
    d.polygon([(0, 320), (0, 270), (200, 220), (480, 300), (480, 320)], fill=(30, 90, 45))
    img.save(path)
    return path


def attach(box, file, name: str) -> None:
    """Drop a file on the chat input (its hidden <input type=file>) and wait for the upload."""
    box.locator("input[type=file]").set_input_files(file)
    expect(box.get_by_text(name)).to_be_visible()


def ask(box, question: str) -> None:
    """Type into st.chat_input and send, once the send button is enabled (uploads finished)."""
    box.get_by_test_id("stChatInputTextArea").fill(question)
    send = box.get_by_test_id("stChatInputSubmitButton")
    expect(send).to_be_enabled()
    send.click()


def test_chat_in_a_real_browser(server, tiny_dir, tmp_path, monkeypatch):
    url, port, log = server
    # The suite runs with OpenBLAS in LD_PRELOAD (mlx_dsvl.blas; the app server keeps it);
    # Playwright's node driver and Chromium crash with it ("pthread_create: Invalid argument").
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for addr in other_addresses():  # apps/.streamlit/config.toml: server.address = 127.0.0.1
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((addr, port)) != 0, f"the app is reachable on {addr}"
    picture = landscape(tmp_path / "hills.png")

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(60_000)
            page.goto(url)
            box = page.get_by_test_id("stChatInput")
            messages = page.get_by_test_id("stChatMessage")
            regenerate = page.get_by_role("button", name="Regenerate")
            expect(page.get_by_role("heading", name="DeepSeek-VL chat")).to_be_visible()
            # the arguments after "--" reached the app: its model, its sidebar defaults
            expect(page.get_by_role("main")).to_contain_text(str(tiny_dir))
            expect(page.get_by_label("Max new tokens")).to_have_value("12")
            expect(page.get_by_role("slider", name=re.compile("Top-p"))).to_have_value("0.9")

            # 1. an image and a question: the reply streams in, with its statistics
            attach(box, str(picture), "hills.png")
            ask(box, "What is in this picture?")
            expect(regenerate).to_be_visible()  # drawn once the reply is complete
            expect(messages).to_have_count(2)
            expect(messages.nth(0)).to_contain_text("What is in this picture?")
            expect(messages.nth(0).locator("img")).to_have_count(1)  # the thumbnail
            reply = messages.nth(1).locator("[data-testid=stMarkdownContainer]").first.inner_text()
            assert reply.strip(), "empty reply"
            expect(messages.nth(1)).to_contain_text(re.compile(r"s to first token · [\d.]+ tokens/s · [\d.]+ GB peak"))
            expect(page.get_by_test_id("stSidebar")).to_contain_text("Tokens/s")

            # 2. a follow-up question about the same picture
            ask(box, "Which colours does it use?")
            expect(messages).to_have_count(4)
            expect(regenerate).to_be_visible()
            page.wait_for_timeout(300)
            page.screenshot(path=str(tmp_path / "app.png"))
            if os.environ.get("MLX_DSVL_APP_SCREENSHOT"):
                shutil.copyfile(tmp_path / "app.png", os.environ["MLX_DSVL_APP_SCREENSHOT"])

            # 3. stop a long reply half-way; the conversation goes on
            tokens = page.get_by_label("Max new tokens")
            tokens.fill("4000")
            tokens.press("Enter")
            expect(tokens).to_have_value("4000")
            page.wait_for_timeout(500)
            ask(box, "Tell me everything about it.")
            stop = page.get_by_role("button", name="Stop")
            expect(stop).to_be_visible()
            expect(messages.nth(5)).to_contain_text("▌")  # streaming: the reply has begun
            page.wait_for_timeout(500)
            stop.click()
            expect(messages.nth(5)).to_contain_text("· stopped")
            expect(regenerate).to_be_visible()
            tokens.fill("6")
            tokens.press("Enter")
            expect(tokens).to_have_value("6")
            page.wait_for_timeout(500)
            ask(box, "Thanks!")
            expect(messages).to_have_count(8)
            expect(messages.nth(7)).to_contain_text("tokens/s")
            expect(regenerate).to_be_visible()

            # 4. regenerate the last reply, then remove the last turn
            regenerate.click()
            expect(messages.nth(7)).to_contain_text("tokens/s")
            expect(messages).to_have_count(8)
            expect(regenerate).to_be_visible()
            page.get_by_role("button", name="Remove last turn").click()
            expect(messages).to_have_count(6)
            expect(messages.nth(5)).to_contain_text("· stopped")

            # 5. a file that is not an image: an error in the chat, the history stays
            attach(box, {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}, "notes.txt")
            ask(box, "And this?")
            expect(messages.nth(6)).to_contain_text("not a recognised image file: notes.txt")
            expect(messages).to_have_count(7)
            expect(messages.nth(0)).to_contain_text("What is in this picture?")

            # 6. a file over 20 MB: the browser refuses it (server.maxUploadSize / max_upload_size)
            huge = tmp_path / "huge.png"
            huge.write_bytes(b"\0" * (21 * 2**20))
            box.locator("input[type=file]").set_input_files(str(huge))
            expect(box).to_contain_text("File must be 20.0MB or smaller")
            box.get_by_role("button", name="Remove huge.png").click()
            expect(box).not_to_contain_text("huge.png")

            # 7. another browser session has its own, empty conversation
            other = browser.new_context().new_page()
            other.goto(url)
            expect(other.get_by_role("heading", name="DeepSeek-VL chat")).to_be_visible(timeout=60_000)
            expect(other.get_by_text("Drop one or more images")).to_be_visible(timeout=60_000)
            expect(other.get_by_test_id("stChatMessage")).to_have_count(0)
        finally:
            browser.close()
    server_log = log.read_text()
    assert "Traceback" not in server_log, server_log
