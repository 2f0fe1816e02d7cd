"""The web page in a real headless Chromium: pick and drop real fruit photos, see the right family and
class; a picture of no fruit reads "Unknown"."""

from __future__ import annotations

import base64
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import skimage

from canestra.config import Settings

CHROMIUM = os.environ.get("CANESTRA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


KEY = "browser-key-7f3a9c"


def serve_in_thread(trained, **settings):
    """The app under a real uvicorn server on 127.0.0.1 (a free port), in a thread; yields its URL."""
    import uvicorn

    from canestra.serve.app import create_app

    app = create_app(os.path.join(trained.out_dir, "model"), Settings.load(serve_threads=1, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def base_url(trained):
    yield from serve_in_thread(trained, rate_limit=0)


@pytest.fixture(scope="module")
def keyed_url(trained, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# browser test\n{KEY}\n")
    yield from serve_in_thread(trained, api_keys_file=str(keys), rate_limit=0)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CANESTRA_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def test_page_classifies_a_picked_and_a_dropped_image(browser, base_url, sample_dir, tmp_path, record_property):
    from playwright.sync_api import expect

    # A phone-sized screen: the page must fit without horizontal scrolling.
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)

    page.goto(base_url + "/")
    # Locator assertions, not wait_for_function: the page's CSP forbids eval, as it should.
    expect(page.locator("#model-info")).to_contain_text("10 classes in 10 families")
    expect(page.locator("#key-form")).to_be_hidden()  # no keys on this server: no key field

    # 1. pick a file with the file input
    banana = sorted((sample_dir / "Banana").glob("*.jpg"))[5]
    page.set_input_files("#file", str(banana))
    expect(page.locator("#prediction")).to_have_text("Banana", timeout=30_000)
    expect(page.locator("#answer")).to_have_text(re.compile(r"^\s*Banana \(\d+\.\d\s%\)\s*$"))  # family = variety: once
    expect(page.locator("#unknown")).to_be_hidden()
    assert page.locator("#top5 li").count() == 5
    widths = page.eval_on_selector_all("#top5 .fill", "els => els.map(e => parseFloat(e.style.width))")
    assert widths[0] > 50 and widths == sorted(widths, reverse=True)
    assert page.eval_on_selector("#preview", "img => img.naturalWidth") == 100  # the preview shows the photo
    shot = tmp_path / "serve-page-phone.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000  # a rendered page, not an empty image
    print(f"\nscreenshot: {shot}")
    record_property("screenshot", str(shot))  # in --junitxml reports too

    # 2. a variety of a larger family: "Apple — Apple Granny Smith (…)", and the family's probability
    apple = sorted((sample_dir / "Apple Granny Smith").glob("*.jpg"))[2]
    page.set_input_files("#file", str(apple))
    expect(page.locator("#prediction")).to_have_text("Apple Granny Smith", timeout=30_000)
    expect(page.locator("#answer")).to_have_text(re.compile(r"^\s*Apple — Apple Granny Smith \(\d+\.\d\s%\)\s*$"))
    expect(page.locator("#family-line")).to_contain_text("Apple (all its varieties together)")
    shot_apple = tmp_path / "serve-page-phone-family.png"
    page.screenshot(path=str(shot_apple), full_page=True)
    record_property("screenshot_family", str(shot_apple))

    # 3. drag and drop another photo onto the drop zone
    kiwi = sorted((sample_dir / "Kiwi").glob("*.jpg"))[3]
    payload = base64.b64encode(kiwi.read_bytes()).decode()
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/jpeg"}));
            const zone = document.getElementById("drop");
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
            }
        }""",
        [payload, kiwi.name],
    )
    expect(page.locator("#prediction")).to_have_text("Kiwi", timeout=30_000)
    expect(page.locator("#family-line")).to_be_hidden()

    # 4. a picture of no fruit (a cat): "Unknown", no variety, no family
    cat = Path(skimage.__file__).parent / "data" / "chelsea.png"
    page.set_input_files("#file", str(cat))
    expect(page.locator("#unknown")).to_be_visible(timeout=30_000)
    expect(page.locator("#unknown")).to_have_text("Unknown: this does not look like a fruit the model knows.")
    expect(page.locator("#answer")).to_be_hidden()
    expect(page.locator("#family-line")).to_be_hidden()
    expect(page.locator("#top5-title")).to_have_text("Closest classes the model knows")
    shot_unknown = tmp_path / "serve-page-phone-unknown.png"
    page.screenshot(path=str(shot_unknown), full_page=True)
    print(f"screenshot: {shot_unknown}")
    record_property("screenshot_unknown", str(shot_unknown))
    # and a fruit again: the unknown box goes away
    page.set_input_files("#file", str(banana))
    expect(page.locator("#prediction")).to_have_text("Banana", timeout=30_000)
    expect(page.locator("#unknown")).to_be_hidden()

    # 5. a file that is not an image gives a plain message, not a broken page
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a picture\n" * 10)
    page.set_input_files("#file", str(notes))
    expect(page.locator("#error")).to_contain_text("not an image", timeout=30_000)
    expect(page.locator("#result")).to_be_hidden()

    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert all(u.startswith(base_url) or u.startswith(("blob:", "data:")) for u in requested), requested
    assert not [e for e in console_errors if "415" not in e], console_errors  # the 415 is the expected failure
    shot2 = tmp_path / "serve-page-phone-error.png"
    page.screenshot(path=str(shot2), full_page=True)
    print(f"screenshot: {shot2}")
    record_property("screenshot_error", str(shot2))
    context.close()


def test_page_asks_for_the_api_key_and_keeps_it_for_the_tab(browser, keyed_url, sample_dir, tmp_path):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    sent_auth: list[str | None] = []
    page.on("request", lambda req: sent_auth.append(req.headers.get("authorization"))
            if "/v1/" in req.url else None)
    page.goto(keyed_url + "/")
    expect(page.locator("#key-form")).to_be_visible()  # /v1/model answered 401
    expect(page.locator("#model-info")).to_have_text("")
    banana = sorted((sample_dir / "Banana").glob("*.jpg"))[4]
    page.set_input_files("#file", str(banana))
    expect(page.locator("#error")).to_have_text("This service needs an API key: enter it above.")
    expect(page.locator("#result")).to_be_hidden()

    page.fill("#api-key", "not-the-key")
    page.click("#key-save")
    expect(page.locator("#error")).to_have_text("The API key was not accepted: check it and enter it again above.")

    page.fill("#api-key", KEY)
    page.click("#key-save")  # the refused photo is sent again, with the key
    expect(page.locator("#prediction")).to_have_text("Banana", timeout=30_000)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#model-info")).to_contain_text("10 classes in 10 families")
    assert f"Bearer {KEY}" in sent_auth and None in sent_auth
    assert page.evaluate("sessionStorage.getItem('canestra-api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0  # not kept beyond the tab
    shot = tmp_path / "serve-page-phone-key.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")

    page.reload()  # same tab: the key is still there and used at once
    expect(page.locator("#model-info")).to_contain_text("10 classes", timeout=30_000)
    expect(page.locator("#api-key")).to_have_value(KEY)
    kiwi = sorted((sample_dir / "Kiwi").glob("*.jpg"))[1]
    page.set_input_files("#file", str(kiwi))
    expect(page.locator("#prediction")).to_have_text("Kiwi", timeout=30_000)
    context.close()

    other = browser.new_context()  # another tab/session has no key
    page2 = other.new_page()
    page2.goto(keyed_url + "/")
    expect(page2.locator("#key-form")).to_be_visible()
    expect(page2.locator("#api-key")).to_have_value("")
    other.close()
