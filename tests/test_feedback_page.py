"""The web page's "Wrong? Tell us" in a real headless Chromium: the consent text is the service's,
nothing is sent until the box is ticked, then the correction lands in the store."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_serve_browser import browser, serve_in_thread  # noqa: F401  (browser: a fixture)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real-photos"
KEY = "feedback-page-key-5d2e8a41"


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    base = tmp_path_factory.mktemp("page")
    keys = base / "keys.txt"
    keys.write_text(KEY + "\n")
    keys.chmod(0o600)
    for url in serve_in_thread(trained, api_keys_file=str(keys), rate_limit=0, feedback_dir=str(base / "store"),
                               retention_days=30):
        yield url, base / "store"


def stored(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))


def test_wrong_tell_us_sends_a_correction_only_with_consent(browser, served):  # noqa: F811
    import httpx
    from playwright.sync_api import expect

    url, store = served
    info = httpx.get(url + "/v1/feedback", headers={"Authorization": f"Bearer {KEY}"}, trust_env=False).json()
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    posted: list[str] = []
    page.on("request", lambda req: posted.append(req.url) if req.method == "POST" and "/v1/feedback" in req.url
            else None)
    page.goto(url + "/")
    page.fill("#api-key", KEY)
    page.click("#key-save")
    page.set_input_files("#file", str(sorted((REAL / "Apple").glob("*.jpg"))[7]))
    expect(page.locator("#result")).to_be_visible(timeout=30_000)
    expect(page.locator("#feedback")).to_be_visible()
    expect(page.locator("#privacy-note")).to_contain_text("unless you send a correction")
    page.click("#feedback summary")
    expect(page.locator("#feedback-consent-text")).to_have_text(info["consent_text"])  # the service's own words
    assert "30 days" in info["consent_text"]
    page.fill("#feedback-label", "Apple")
    page.click("#feedback-send")  # the box is not ticked: the browser does not even send the form
    page.wait_for_timeout(500)
    assert posted == [] and stored(store) == []
    page.check("#feedback-consent")
    page.click("#feedback-send")
    expect(page.locator("#feedback-note")).to_have_text("Thank you: stored as Apple.", timeout=30_000)
    assert len(posted) == 1 and [n.split("/")[:2] for n in stored(store)] == [["family", "Apple"]]
    context.close()
