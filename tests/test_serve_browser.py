"""`dmmi serve`'s Gradio page in a real headless browser: Debian's chromium driven through chromedriver.

Skipped (with the reason) when chromium, chromedriver or the selenium package is missing
(``apt-get install -y chromium chromium-driver``). ``DMMI_WRITE_SCREENSHOT=1`` also writes the
final screenshot to docs/web_demo.png (otherwise it goes to tmp_path only);
``DMMI_SERVE_CHECKPOINT=CKPT`` serves that model instead of a 1-step tiny one (a trained demo
model makes the screenshot meaningful).
"""

import json
import os
import pickle
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from dmmi.data.synthetic import generate
from dmmi.inference import Predictor
from test_serve import make_tiny_checkpoint, serving

pytestmark = pytest.mark.timeout(300)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package (pip install -e '.[dev]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1100", "--hide-scrollbars", "--force-device-scale-factor=1"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "web_demo.png"
CUT_CAPTIONS = """return [...document.querySelectorAll('#overlays .caption-label, #overlays .caption')]
    .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1).map(e => e.textContent);"""
BROKEN_IMAGES = """return [...document.querySelectorAll('img')]
    .filter(i => i.offsetWidth > 0 && i.offsetHeight > 0 && i.complete && i.naturalWidth === 0)
    .map(i => i.src.slice(0, 120))"""
LOADING_IMAGES = "return [...document.querySelectorAll('img')].filter(i => !i.complete).length"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = os.environ.get("DMMI_SERVE_CHECKPOINT")
    if not checkpoint:
        checkpoint, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("serve_browser"))
    with serving(Predictor.load(checkpoint, device="cpu"), ui=True) as server:
        yield server


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A synthetic image with one expression that refers to one object and one that refers to many."""
    root = tmp_path_factory.mktemp("scene")
    generate(root, n_images=6, seed=8, image_size=256, min_objects=3)
    refs = pickle.loads((root / "synthetic" / "refs(final).p").read_bytes())
    for name in sorted({r["file_name"] for r in refs}):
        mine = [r for r in refs if r["file_name"] == name]
        one = [r for r in mine if r.get("source") is None and not isinstance(r["ann_id"], list)]
        many = [r for r in mine if r.get("source") == "many"]
        if one and many:
            return root / "images" / name, one[0]["sentences"][0]["sent"], many[0]["sentences"][0]["sent"]
    raise AssertionError("no synthetic image with both a one- and a many-object expression")


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)  # never a downloaded driver
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what, seconds=90):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        text = driver.find_element(By.TAG_NAME, "body").text[:400]
        raise AssertionError(f"timed out waiting for {what} (page text: {text!r})") from None


def _requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls


def _overlays(driver):
    return [i for i in driver.find_elements(By.CSS_SELECTOR, "#overlays img")
            if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)]


def test_page_segments_an_uploaded_image_offline(server, scene, browser, tmp_path):
    image, one_text, many_text = scene
    d = browser
    d.get(server.url)
    button = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#segment"), "the Segment button")[0]
    assert d.title.startswith("dmmi")
    body = d.find_element(By.TAG_NAME, "body").text
    assert "zero, one or many" in body and "px input" in body
    note = server.service.domain_note
    if note:
        assert d.find_element(By.ID, "domain-note").text == note
    if server.service.synthetic:
        assert "Try a sample image" in body

    # before an image is chosen: no visible broken image (the sample thumbnails load)
    _wait(d, lambda d: d.execute_script(LOADING_IMAGES) == 0, "the page's images to load")
    assert d.execute_script(BROKEN_IMAGES) == []

    # no image yet: a readable error, no results
    button.click()
    _wait(d, lambda d: "Choose an image first" in d.find_element(By.TAG_NAME, "body").text, "the no-image error")
    assert not _overlays(d)
    for close in d.find_elements(By.CSS_SELECTOR, ".toast-close"):  # dismissed, as a user would
        close.click()
    _wait(d, lambda d: not [t for t in d.find_elements(By.CSS_SELECTOR, ".toast-body") if t.is_displayed()],
          "the error to close")

    # a real image, two expressions typed one per line -> two overlays and two rows, in order
    d.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
    _wait(d, lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "#image img")
                        if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)],
          "the image preview")
    box = d.find_element(By.CSS_SELECTOR, "#texts textarea")
    box.clear()
    box.send_keys(f"{one_text}\n{many_text}")
    d.find_element(By.ID, "segment").click()
    _wait(d, lambda d: len(_overlays(d)) == 2, "two overlays")
    _wait(d, lambda d: "2 results for a 256\u00d7256 image" in d.find_element(By.ID, "status").text, "the status line")
    rows = d.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    assert [r.find_element(By.CSS_SELECTOR, ".expr").text for r in rows] == [one_text, many_text]
    for row in rows:
        what = row.find_element(By.CSS_SELECTOR, ".what").text
        assert what == "no target" or (what.startswith("foreground ") and what.endswith("%"))
        assert 0 <= float(row.find_element(By.CSS_SELECTOR, ".num").text) <= 1
    for img in _overlays(d):
        assert img.size["width"] > 60 and img.size["height"] > 60  # shown, not a broken icon
    assert d.execute_script(CUT_CAPTIONS) == []  # every caption readable in full
    masks = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#masks a"), "the mask downloads")
    assert any("00_" in (a.get_attribute("href") or "") + a.text for a in masks)
    assert d.execute_script(BROKEN_IMAGES) == []

    # nothing left this machine: every http(s) / websocket request went to the server itself
    origin = urlsplit(server.url).netloc
    urls = _requested_urls(d)
    assert any(u.startswith(server.url) for u in urls)
    remote = [u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).netloc != origin]
    assert remote == []

    d.execute_script("window.scrollTo(0, 0); document.activeElement.blur();")
    time.sleep(0.3)  # let the last images paint
    shot = tmp_path / "web_demo.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("DMMI_WRITE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
